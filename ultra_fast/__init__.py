"""ultra_fast: exact ULTra explanation maps for every latent token of a transformer, fast."""
from .engine import LearnedScalar, explain, explain_authors, explain_naive
from .models import Adapter, UnsupportedModelError, create_model, load_images, preprocess, wrap
from .segmentation import Segmentation, segment

__version__ = "0.1.0"
__all__ = ["explain", "explain_naive", "explain_authors", "LearnedScalar", "Adapter", "UnsupportedModelError",
           "create_model", "wrap", "preprocess", "load_images", "segment", "Segmentation", "__version__"]
