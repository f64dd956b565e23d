"""``ultra-fast explore``: one self-contained HTML page to explore every patch token's map of one image,
layer by layer, with the token clustering recut in the page."""
from __future__ import annotations

import argparse
import os
import time

from .common import add_chain_args, add_clustering_args, add_fast_mode_args, compute_dtype, load_model, one_image_parser

DEFAULT_SIZE = 224


def add_parser(sub) -> None:
    p = one_image_parser(sub, "explore", "interactive HTML page: hover any patch to see its map at every layer, "
                                         "recut the segmentation at any threshold")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="shorter image side fed to the model (default: %(default)s)")
    p.add_argument("--layers", default="all",
                   help="layers to explain: 'all' (default; one explanation per layer), 'last', or e.g. '4,8,12' "
                        "or '6:12'")
    p.add_argument("--scalar", default="sum", choices=["sum", "energy", "norm"])
    add_chain_args(p)
    p.add_argument("--threshold", type=float, default=0.4, help="initial ζ of the page's segmentation (default: 0.4)")
    add_clustering_args(p)
    p.add_argument("--cmap", default="jet", help="matplotlib colour map of the overlays (default: %(default)s)")
    add_fast_mode_args(p, stride=False)  # the page needs every token's map: no target stride
    p.add_argument("--title", default=None, help="page title (default: 'ULTra explorer: IMAGE')")
    p.add_argument("--out", default="ultra_fast_explore.html", help="HTML page to write (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from ..demo_images import demo_image
    from ..models import load_images
    from ..viz.explorer import explorer

    image = demo_image(args.demo_image) if args.demo_image else load_images([args.image])[0]
    name = args.demo_image or os.path.basename(args.image)
    t0 = time.perf_counter()
    adapter = load_model(args)
    print(f"{adapter.name} loaded in {time.perf_counter() - t0:.1f} s")
    data = explorer(adapter, image, out=args.out, size=args.size, layers=args.layers, scalar=args.scalar,
                    order=args.order, start_block=args.start_block, threshold=args.threshold, metric=args.metric,
                    method=args.linkage, title=args.title or f"ULTra explorer: {name}", cmap=args.cmap,
                    backend=args.backend, compute_dtype=compute_dtype(args))
    h, w = data.grid
    mib = os.path.getsize(args.out) / (1 << 20)
    print(f"{h * w} tokens ({h}x{w} patches) at {len(data.layers)} layer(s) in {data.settings['seconds']:.1f} s "
          f"-> {args.out} ({mib:.2f} MiB)")
    return 0


def demo_page(adapter, image, res, s, path, layers: str = "last", backend: str = "auto", title=None):
    """The explorer page of a demo photo that ``ultra-fast demo`` just segmented, reusing the maps of its
    segmentation layer (``res.maps``; other ``layers`` are explained). None (no page) when only a strided
    subset of tokens was explained, since the page needs every token's map."""
    from ..viz.explorer import explorer_data, save_explorer
    if res.positions is not None:
        return None
    threshold = s.threshold if s.threshold is not None else 0.4
    data = explorer_data(adapter, image, size=s.size, layers=layers, scalar=s.scalar, order=s.order,
                         start_block=s.start_block, threshold=threshold, metric=s.metric, method=s.method,
                         max_tokens=s.max_tokens, backend=backend, compute_dtype=compute_dtype(s),
                         known={s.layer: res.maps})
    return save_explorer(data, path, title=title)
