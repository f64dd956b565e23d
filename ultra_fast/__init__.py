"""ultra_fast: exact ULTra explanation maps for every latent token of a transformer, fast.

Importing the package also loads the compiled ops when they are built (``torch.ops.ultra_fast.*``;
see ``ultra_fast.ops``); heavy optional libraries (timm, open_clip, transformers) load only when used.
"""
from . import ops
from .engine import ExplainConfig, LearnedScalar, explain, explain_authors, explain_naive, explain_with
from .errors import (
    CheckpointError,
    ConfigError,
    InputError,
    NativeOpsUnavailableError,
    UltraFastError,
    UnsupportedHardwareError,
    UnsupportedModelError,
)
from .models import Adapter, create_model, load_images, preprocess, wrap
from .segmentation import Segmentation, segment

__version__ = "0.1.0"
__all__ = ["explain", "explain_with", "ExplainConfig", "explain_naive", "explain_authors", "LearnedScalar", "Adapter", "create_model", "wrap",
           "preprocess", "load_images", "segment", "Segmentation", "ops", "UltraFastError", "ConfigError",
           "InputError", "CheckpointError", "UnsupportedModelError", "UnsupportedHardwareError",
           "NativeOpsUnavailableError", "__version__"]
