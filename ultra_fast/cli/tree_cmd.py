"""``ultra-fast tree``: the clustering dendrogram of one image beside its segmentations at several thresholds
(the paper's Figure 1)."""
from __future__ import annotations

import argparse
import time

import numpy as np

from ..errors import ConfigError
from .common import add_clustering_args, add_fast_mode_args, add_method_args, load_model, one_image_parser

DEFAULT_SIZE = 168


def add_parser(sub) -> None:
    p = one_image_parser(sub, "tree", "dendrogram of one image's token clustering beside segmentations at "
                                      "several thresholds (PNG)")
    add_method_args(p, size=DEFAULT_SIZE)
    add_fast_mode_args(p, stride=False)  # the dendrogram's leaves are all patch tokens
    p.add_argument("--thresholds", default="0.2,0.3,0.4,0.5",
                   help="comma-separated distance thresholds to cut at (default: %(default)s)")
    add_clustering_args(p)
    p.add_argument("--assign", default="argmax", choices=["argmax", "token"])
    p.add_argument("--color-threshold", type=float, default=None,
                   help="colour the dendrogram's clusters at this threshold (default: the middle one of --thresholds, "
                        "so they match its panel)")
    p.add_argument("--out", default="ultra_fast_tree.png", help="PNG to write (default: %(default)s)")


def parse_thresholds(text: str, metric: str):
    try:
        ts = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--thresholds {text!r}: expected comma-separated numbers, e.g. 0.2,0.3,0.4") from None
    if not ts:
        raise ConfigError("--thresholds is empty")
    upper = 2.0 if metric in ("cosine", "correlation") else float("inf")
    bad = [t for t in ts if not 0 < t <= upper]
    if bad:
        raise ConfigError(f"--thresholds {bad} impossible for {metric} distances (need 0 < t <= {upper:g})")
    return ts


def link_colours(Z: np.ndarray, leaf_cluster: np.ndarray, colours, other="#303030"):
    """Per dendrogram node id: the cluster's colour when all its leaves share one cluster, else grey."""
    n = len(leaf_cluster)
    node = list(int(c) for c in leaf_cluster) + [-1] * (n - 1)
    for i, (a, b, _, _) in enumerate(Z):
        ca, cb = node[int(a)], node[int(b)]
        node[n + i] = ca if ca == cb and ca >= 0 else -1
    hexes = ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in colours]
    return lambda k: hexes[node[k]] if node[k] >= 0 else other


def tree_figure(image, maps, thresholds, metric="cosine", method="average", assign="argmax",
                color_threshold=None, title=""):
    """A matplotlib Figure: dendrogram (left) and one overlay per threshold (right)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from scipy.cluster.hierarchy import dendrogram

    from ..segmentation import segment_maps
    from ..viz.labels import label_overlay, palette

    scale = min(1.0, 512 / max(image.size))
    disp = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    segs = [segment_maps(maps, (disp.height, disp.width), t, None, metric, method, assign) for t in thresholds]
    Z = segs[0].linkage
    ct = color_threshold if color_threshold is not None else sorted(thresholds)[len(thresholds) // 2]
    ref = segment_maps(maps, (maps.shape[1], maps.shape[2]), ct, None, metric, method, "token")
    colours = palette(int(ref.token_clusters.max()) + 1)

    k = len(thresholds)
    cols = 2 if k > 1 else 1
    rows = (k + cols - 1) // cols
    aspect = disp.height / disp.width
    fig = plt.figure(figsize=(7 + 3.2 * cols, max(4.5, 3.2 * rows * aspect + 0.6 * rows)), dpi=110)
    gs = fig.add_gridspec(rows, 1 + cols, width_ratios=[2.2] + [1] * cols)
    ax = fig.add_subplot(gs[:, 0])
    if len(Z):
        dendrogram(Z, ax=ax, no_labels=True, link_color_func=link_colours(Z, ref.token_clusters.reshape(-1), colours))
    styles = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (t, s) in enumerate(zip(thresholds, segs)):
        ax.axhline(t, color=styles[i % len(styles)], ls="--", lw=1.2,
                   label=f"ζ = {t:g}: {int(s.token_clusters.max()) + 1} clusters")
        sub = fig.add_subplot(gs[i // cols, 1 + i % cols])
        sub.imshow(label_overlay(disp, s.labels))
        sub.set_title(f"ζ = {t:g}: {s.num_segments} segments", fontsize=9, color=styles[i % len(styles)])
        sub.axis("off")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel(f"{metric} distance ({method} linkage)")
    ax.set_xlabel(f"{maps.shape[0]} patch tokens (leaves coloured by the ζ = {ct:g} cut)")
    ax.set_title(title or "token-map clustering", fontsize=10)
    fig.tight_layout()
    return fig


def run(args: argparse.Namespace) -> int:
    import io as _io

    from PIL import Image

    from ..demo_images import demo_image
    from ..io import save_image
    from ..segmentation.run import SegmentSettings, segment_image

    thresholds = parse_thresholds(args.thresholds, args.metric)
    from ..data import load_rgb
    image = demo_image(args.demo_image) if args.demo_image else load_rgb(args.image)
    adapter = load_model(args)
    s = SegmentSettings(size=args.size, layer=args.layer, scalar=args.scalar, order=args.order,
                        start_block=args.start_block, threshold=thresholds[0], metric=args.metric,
                        method=args.linkage, assign=args.assign, compute_dtype=args.compute_dtype)
    s.validate()
    t0 = time.perf_counter()
    res = segment_image(adapter, image, s, backend=args.backend)
    dt = time.perf_counter() - t0
    import torch
    maps = torch.from_numpy(res.maps)
    fig = tree_figure(image, maps, thresholds, args.metric, args.linkage, args.assign, args.color_threshold,
                      title=f"{args.demo_image or args.image}: {adapter.name}, {maps.shape[1]}x{maps.shape[2]} "
                            f"patches, " + ("last layer" if args.layer == -1 else f"layer {args.layer}"))
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    import matplotlib.pyplot as plt
    plt.close(fig)
    buf.seek(0)
    save_image(Image.open(buf), args.out)
    print(f"{adapter.name}: {maps.shape[0]} token maps clustered in {dt:.1f} s -> {args.out}")
    return 0
