"""``ultra-fast explain``: maps of chosen tokens of one image as a PNG grid, or one token across layers."""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ..errors import ConfigError
from .common import add_method_args, explain_config, load_model, one_image_parser, target_stride


def add_parser(sub) -> None:
    p = one_image_parser(sub, "explain", "explanation maps of tokens of one image, as a PNG grid")
    add_method_args(p, fast_modes=True)
    p.add_argument("--tokens", default=None,
                   help="patches to explain as 'row,col;row,col' (default: an even lattice of --num-tokens; "
                        "with --target-stride K > 1: every K-th patch)")
    p.add_argument("--num-tokens", type=int, default=8)
    p.add_argument("--progression", action="store_true",
                   help="show the first token at every layer instead of several tokens at one layer")
    p.add_argument("--out", default="ultra_fast_explain.png", help="PNG to write (default: %(default)s)")


def lattice(grid, count):
    """``count`` patch positions spread evenly over the grid, row-major."""
    h, w = grid
    k = max(1, int(np.ceil(np.sqrt(count))))
    rows = np.linspace(0, h - 1, k + 2)[1:-1].round().astype(int)
    cols = np.linspace(0, w - 1, k + 2)[1:-1].round().astype(int)
    return [(int(r), int(c)) for r in rows for c in cols][:count]


def parse_tokens(text, grid):
    out = []
    for part in text.split(";"):
        r, c = (int(v) for v in part.split(","))
        if not (0 <= r < grid[0] and 0 <= c < grid[1]):
            raise ConfigError(f"token {r},{c} is outside the {grid[0]}x{grid[1]} patch grid")
        out.append((r, c))
    return out


def run(args: argparse.Namespace) -> int:
    from ..demo_images import demo_image
    from ..engine import explain_with
    from ..io import save_image
    from ..models import load_images, preprocess
    from ..viz import token_grid

    image = demo_image(args.demo_image) if args.demo_image else load_images([args.image])[0].convert("RGB")
    adapter = load_model(args)
    x = preprocess(image, adapter.preprocessing, size=args.size).to(args.device)
    grid = adapter.grid_size(x)
    ph, pw = adapter.preprocessing.patch_size
    stride = target_stride(args)
    if stride > 1 and args.tokens:
        raise ConfigError("--tokens and --target-stride both choose the tokens; give one of them")
    if args.tokens:
        cells = parse_tokens(args.tokens, grid)
    elif stride > 1:
        cells = [(r, c) for r in range(0, grid[0], stride) for c in range(0, grid[1], stride)]
    else:
        cells = lattice(grid, args.num_tokens)
    P = adapter.num_prefix_tokens
    idx = [P + r * grid[1] + c for r, c in cells]
    sx, sy = image.width / x.shape[-1], image.height / x.shape[-2]
    box = lambda r, c: (c * pw * sx, r * ph * sy, (c + 1) * pw * sx, (r + 1) * ph * sy)  # noqa: E731
    config = explain_config(args, scalar=args.scalar)
    t0 = time.perf_counter()
    if args.progression:
        layers = list(range(max(args.start_block, 1), adapter.num_blocks + 1))
        maps = torch.cat([explain_with(adapter, x, config.replace(layer=l, targets=idx[:1]))[0] for l in layers])
        titles = [f"token {cells[0]} layer {l}" for l in layers]
        boxes = [box(*cells[0])] * len(layers)
    else:
        maps = explain_with(adapter, x, config.replace(layer=args.layer, targets=idx))[0]
        titles = [f"token {rc}" for rc in cells]
        boxes = [box(*rc) for rc in cells]
    dt = time.perf_counter() - t0
    sheet = token_grid(image, maps.float().cpu().numpy(), boxes, titles)
    save_image(sheet, args.out)
    print(f"{adapter.name}: {len(maps)} maps on a {grid[0]}x{grid[1]} grid in {dt:.2f} s -> {args.out}")
    return 0
