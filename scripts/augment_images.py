"""Grow a small image set to a training set of a given size with seeded augmentations (for ULTra_W).

The paper trains W on 256 images; the shared CamVid split has 101, of which the first 50 are kept for
training and the other 51 held out for evaluation. This writes the originals, then their horizontal
flips, then random resized crops (70-100 % of the area, aspect 3:4 to 4:3, flipped at random) of them,
in that order, until ``--count`` images exist. Every draw comes from ``--seed``, so the set is the same
on every run; each PNG is written to a temporary name and renamed (an interrupted run leaves no half
file, and a rerun skips what exists).

    python scripts/augment_images.py --images train50.txt --count 256 --out results/train256
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from ultra_fast.data import list_inputs
from ultra_fast.data.inputs import load_rgb


def random_resized_crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of 70-100 % of the area with aspect in [3/4, 4/3], resized back to the original size."""
    w, h = img.size
    for _ in range(20):
        area = rng.uniform(0.7, 1.0) * w * h
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
    return img.copy()


def plan(count: int, n: int) -> List[tuple]:
    """(source index, kind, variant) for each output: originals, flips, then crops cycling over the sources."""
    out = [(k, "orig", 0) for k in range(n)] + [(k, "flip", 0) for k in range(n)]
    variant = 0
    while len(out) < count:
        out += [(k, "crop", variant) for k in range(n)]
        variant += 1
    return out[:count]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", required=True, help="image files, folders, globs or .txt lists")
    p.add_argument("--count", type=int, default=256, help="images to write (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    items = list_inputs(args.images)
    if not items:
        print(f"augment_images: no images found in {' '.join(args.images)}", file=sys.stderr)
        return 2
    if args.count < 1:
        print(f"augment_images: --count {args.count} is impossible (>= 1)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (k, kind, variant) in enumerate(tqdm(plan(args.count, len(items)), desc="augment", unit="img")):
        path = out / f"{i:04d}_{kind}{variant}_{Path(items[k].name).stem}.png"
        if path.exists():
            continue
        img = load_rgb(str(items[k].path))
        if kind == "flip":
            img = ImageOps.mirror(img)
        elif kind == "crop":
            rng = np.random.default_rng([args.seed, k, variant])
            img = random_resized_crop(img, rng)
            if rng.random() < 0.5:
                img = ImageOps.mirror(img)
        tmp = path.with_name(path.name + ".tmp")
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    print(f"{args.count} images from {len(items)} sources -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
