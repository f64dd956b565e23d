"""Real photographs that need no download: the ones scikit-image ships (``skimage.data``)."""
from __future__ import annotations

from PIL import Image

from .errors import ConfigError

DEMO_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "cat")


def demo_image(name: str) -> Image.Image:
    if name not in DEMO_IMAGES:
        raise ConfigError(f"unknown demo image {name!r}; expected one of {DEMO_IMAGES}")
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError("demo images come from scikit-image: pip install scikit-image") from e
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
