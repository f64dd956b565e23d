"""Model adapters: the one protocol the engine talks to, and how models are created and wrapped."""
from .base import Adapter, Forward, Preprocessing, TokenAdapter, UnsupportedModelError
from .factory import OFFLINE_MODELS, create_model
from .preprocess import load_images, preprocess
from .registry import REGISTRY, AdapterEntry, register, wrap

__all__ = ["Adapter", "TokenAdapter", "Forward", "Preprocessing", "UnsupportedModelError", "OFFLINE_MODELS",
           "create_model", "wrap", "register", "REGISTRY", "AdapterEntry", "load_images", "preprocess"]
