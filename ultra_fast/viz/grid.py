"""Heat-map overlays of explanation maps on the image, laid out as a grid with the token marked."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw


def colorize(m: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Min-max scale a 2-D map and colour it: (H, W) -> (H, W, 3) uint8."""
    from matplotlib import colormaps
    m = np.asarray(m, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    return (colormaps[cmap](m)[..., :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, m: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Image.Image:
    """Blend the coloured map (resized to the image) over the image."""
    heat = Image.fromarray(colorize(m, cmap)).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, alpha)


def token_grid(image: Image.Image, maps: np.ndarray, boxes: Sequence[Optional[Tuple[int, int, int, int]]],
               titles: Optional[Sequence[str]] = None, columns: int = 4, tile: int = 224,
               alpha: float = 0.5) -> Image.Image:
    """One tile per map: the image with the map overlaid and the explained token's patch outlined.

    ``maps``: (T, h, w) or (T, H, W); ``boxes``: per map the token's (left, top, right, bottom) in
    image pixels, or None for a prefix token.
    """
    T = len(maps)
    columns = max(1, min(columns, T))
    rows = (T + columns - 1) // columns
    label_h = 16 if titles else 0
    scale = tile / max(image.size)
    tw, th = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    sheet = Image.new("RGB", (columns * tw, rows * (th + label_h)), "white")
    for t in range(T):
        cell = overlay(image, maps[t], alpha).resize((tw, th), Image.Resampling.BILINEAR)
        draw = ImageDraw.Draw(cell)
        box = boxes[t]
        if box is not None:
            l, tp, r, b = (v * scale for v in box)
            draw.rectangle([l, tp, r - 1, b - 1], outline="white", width=2)
            draw.rectangle([l - 1, tp - 1, r, b], outline="black", width=1)
        x, y = (t % columns) * tw, (t // columns) * (th + label_h)
        sheet.paste(cell, (x, y + label_h))
        if titles:
            ImageDraw.Draw(sheet).text((x + 3, y + 2), titles[t], fill="black")
    return sheet
