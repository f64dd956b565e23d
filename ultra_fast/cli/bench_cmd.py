"""``ultra-fast bench``: time the engine on random images; FLOPs, utilisation and peak memory."""
from __future__ import annotations

import argparse
import json
import re

from ..engine.options import FAST_STRIDE
from ..errors import ConfigError
from .common import add_fast_mode_args, add_model_args, load_model

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"512M"``, ``"2G"``, ``"1.5GiB"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 1073741824, 512M, 2G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the explanation engine: s/image, FLOP/s, utilisation, peak memory",
                       description="Explain random images (speed does not depend on the pixels; --pretrained 0 "
                                   "gives random weights, so any timm name works offline) and report seconds "
                                   "per image, FLOPs, achieved FLOP/s, this machine's matmul rate in the same "
                                   "dtype, utilisation and peak memory.")
    add_model_args(p)
    p.add_argument("--size", type=int, default=224, help="square image side, a multiple of the patch size "
                                                         "(default: %(default)s)")
    p.add_argument("--targets", default="patches",
                   help="patches | all | N (the first N patch tokens) | stride:K (every K-th patch along rows "
                        "and columns) (default: %(default)s)")
    p.add_argument("--layer", type=int, default=-1, help="explain tokens after this block (default: last)")
    p.add_argument("--start-block", type=int, default=1)
    p.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])
    p.add_argument("--memory-budget", type=parse_bytes, default=None,
                   help="bytes per chunk of targets, e.g. 2G (default: the engine's)")
    add_fast_mode_args(p, stride=False)
    p.add_argument("--batch", type=int, default=1, help="images per call (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default: %(default)s)")
    p.add_argument("--segment", action="store_true", help="also time explain + segmentation end to end")
    p.add_argument("--matmul-n", type=int, default=4096,
                   help="side of the square matrix product the utilisation is relative to (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def run(args: argparse.Namespace) -> int:
    from ..profiling.bench import format_table, run_bench
    for name in ("batch", "repeats", "matmul_n"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0; got {args.warmup}")
    adapter = load_model(args)  # refuses a --compute-dtype this device does not run natively, before any work
    if args.fast and args.compute_dtype is None and args.targets == "patches":
        args.targets = f"stride:{FAST_STRIDE}"  # no reduced-precision backward pays here: fewer targets
    result = run_bench(adapter, args.size, targets=args.targets, layer=args.layer, start_block=args.start_block,
                       batch=args.batch, repeats=args.repeats, warmup=args.warmup, segment=args.segment,
                       backend=args.backend, memory_budget=args.memory_budget, matmul_n=args.matmul_n,
                       compute_dtype=args.compute_dtype)
    print(json.dumps(result) if args.json else format_table(result))
    return 0
