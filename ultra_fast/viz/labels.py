"""Pictures of segmentations: a palette PNG of segment ids and a colour overlay on the image."""
from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image

from ..errors import ConfigError, InputError


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 distinct colours: matplotlib's tab20 first, then golden-ratio hues. Deterministic."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    tab20 = colormaps["tab20"]
    assert isinstance(tab20, ListedColormap)  # a qualitative map: its 20 colours are listed
    base = (np.asarray(tab20.colors)[[0, 2, 4, 6, 8, 10, 12, 14, 16, 18,
                                      1, 3, 5, 7, 9, 11, 13, 15, 17, 19]] * 255).round()
    out = [tuple(int(v) for v in c) for c in base[:n]]
    i = 0
    while len(out) < n:
        h = (i * 0.618033988749895) % 1.0
        s = 0.55 + 0.4 * ((i * 7) % 5) / 4
        v = 0.65 + 0.35 * ((i * 3) % 4) / 3
        out.append(tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v)))
        i += 1
    return np.asarray(out[:n], dtype=np.uint8)


def label_image(labels: np.ndarray) -> Image.Image:
    """Segment ids as an image that stores them losslessly: a palette ('P') PNG when ids < 256
    (pixel value = segment id, coloured by ``palette``), else a 16-bit grayscale image."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InputError(f"labels must be (H, W); got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 65535):
        raise ConfigError("segment ids must lie in 0..65535")
    if labels.size == 0 or labels.max() < 256:
        im = Image.fromarray(labels.astype(np.uint8), mode="P")
        im.putpalette(palette(256).reshape(-1).tolist())
        return im
    return Image.fromarray(labels.astype(np.uint16))  # mode I;16


def read_labels(path) -> np.ndarray:
    """The segment ids of a PNG written from ``label_image`` as (H, W) int32."""
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.int32) if im.mode != "P" else np.asarray(im).astype(np.int32)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another segment id."""
    b = np.zeros(labels.shape, dtype=bool)
    b[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    b[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return b


def label_overlay(image, labels: np.ndarray, alpha: float = 0.5, edges: bool = True) -> Image.Image:
    """The image with each segment tinted by its palette colour (and segment borders drawn in white)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    labels = np.asarray(labels)
    if rgb.shape[:2] != labels.shape:
        raise InputError(f"image {rgb.shape[:2]} and labels {labels.shape} differ in size")
    colours = palette(int(labels.max()) + 1 if labels.size else 1)
    tint = colours[labels]
    a = int(round(min(max(alpha, 0.0), 1.0) * 256))  # integer blend: fast and exact on huge images
    out = ((rgb.astype(np.uint16) * (256 - a) + tint.astype(np.uint16) * a + 128) >> 8).astype(np.uint8)
    if edges:
        out[boundaries(labels)] = 255
    return Image.fromarray(out)
