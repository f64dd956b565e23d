"""Turn PIL images into the tensors a model expects: RGB, resized to a patch multiple, normalised.

Policy (documented in README): EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped) and
16-bit images are converted to 8-bit RGB; the image is resized
(bicubic by default) so both sides are multiples of the patch size; aspect ratio is kept when
``size`` is an int (shorter side), not when it is an (h, w) pair or None (the model's input size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InputError

Size = Union[None, int, Tuple[int, int]]


@dataclass(frozen=True)
class Preprocessing:
    """How the model wants its pixels: resize policy, normalisation and patch size."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    input_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    interpolation: str = "bicubic"


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with EXIF orientation applied, whatever the source mode."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        image = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8))
    return image.convert("RGB")


def target_size(image_size: Tuple[int, int], size: Size, cfg: Preprocessing) -> Tuple[int, int]:
    """(h, w) in pixels, both multiples of the patch size and at least one patch."""
    ph, pw = cfg.patch_size
    h: float
    w: float
    if size is None:
        h, w = cfg.input_size
    elif isinstance(size, int):
        ih, iw = image_size
        scale = size / min(ih, iw)
        h, w = ih * scale, iw * scale
    else:
        h, w = size
    # Half-up rounding to the nearest patch multiple (round() would round halves to even).
    return max(ph, int(h / ph + 0.5) * ph), max(pw, int(w / pw + 0.5) * pw)


def preprocess(images: Union[Image.Image, Sequence[Image.Image]], cfg: Preprocessing,
               size: Size = None) -> torch.Tensor:
    """PIL image(s) -> normalised (B, 3, h, w) float32 tensor. All images must map to one size."""
    if isinstance(images, Image.Image):
        images = [images]
    tensors = []
    for img in images:
        img = to_rgb(img)
        h, w = target_size((img.height, img.width), size, cfg)
        img = img.resize((w, h), _RESAMPLE.get(cfg.interpolation, Image.Resampling.BICUBIC))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        tensors.append(arr)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise InputError(f"images map to different sizes {sorted(shapes)}; pass size=(h, w) to batch them")
    x = torch.stack(tensors)
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return (x - mean) / std


def load_images(paths: Iterable[str]) -> list:
    """Open image files, with an error naming the file that could not be read."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                out.append(im.copy() if im.mode != "P" else im.convert("RGBA"))
        except (OSError, ValueError) as e:
            raise OSError(f"cannot read image {p}: {e}") from e
    return out
