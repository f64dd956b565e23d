"""Peak memory of ``explain`` vs image size and number of targets, for the CLIP-L/14 geometry.

    python benchmarks/memory_curve.py --out results/memory_curve --max-chunks 1

Model: ``vit_large_patch14_clip_224`` with random weights (memory does not depend on them); other
sizes work because the adapter resamples the position embedding (timm's dynamic-size rule). Every
point runs in a fresh Python process, so that one point's allocator state cannot hide another's
peak. For each memory budget (the engine's default, and a smaller explicit one) and image size,
the first T patch tokens are explained for each T; memory is sampled with
``ultra_fast.profiling.memory.PeakMemory`` (process RSS on CPU, allocator peak on CUDA).

Targets are processed in chunks of ``chunk`` (fixed by the budget), and the peak is reached inside
the first chunk, so ``--max-chunks K`` explains only the first min(T, K·chunk) targets (the chunk
size is unchanged by this: it is min(T, budget / bytes per target)). A full all-1,024-token run at
448 px takes ~45 min on a 2-core CPU; the ``--flat-k`` sweep (K = 1, 2, 3 chunks at the largest
size and the last budget) shows the peak is flat in K. Writes DIR/memory_curve.json and DIR/memory_curve.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

GB = 1e9
# Run from a checkout: this checkout's package, also in the per-point subprocesses.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_budget(text: str) -> Optional[int]:
    """``default`` -> None (the engine's rule); otherwise bytes, with K/M/G binary suffixes."""
    if text == "default":
        return None
    from ultra_fast.cli.bench_cmd import parse_bytes
    return parse_bytes(text)


def measure_point(model: str, size: int, targets: str, budget: Optional[int], max_chunks: Optional[int],
                  device: str, dtype: str) -> dict:
    """One point, in this process: load the model, explain, and report the peak."""
    import torch

    from ultra_fast import create_model, explain
    from ultra_fast.cli.common import DTYPES
    from ultra_fast.engine.options import default_memory_budget
    from ultra_fast.profiling import explain_flops
    from ultra_fast.profiling.memory import PeakMemory

    adapter = create_model(model, pretrained=False, device=device, dtype=DTYPES[dtype])
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(adapter.device, adapter.dtype)
    h, w = adapter.grid_size(x)
    n, P = h * w, adapter.num_prefix_tokens
    requested = n if targets == "all" else min(int(targets), n)
    full = explain_flops(adapter, size, targets=requested, memory_budget=budget)
    explained = requested if max_chunks is None else min(requested, max_chunks * full.chunk)
    idx = list(range(P, P + explained))
    t0 = time.perf_counter()
    with PeakMemory(adapter.device) as pm:
        explain(adapter, x, targets=idx, memory_budget=budget)
    seconds = time.perf_counter() - t0
    return dict(model=model, size=size, grid=[h, w], tokens=n + P, targets_requested=requested,
                targets_explained=explained, chunk=full.chunk, chunks_full=full.chunks,
                chunks_explained=-(-explained // full.chunk), max_chunks=max_chunks,
                budget_bytes=budget if budget is not None else default_memory_budget(adapter.device),
                budget_is_default=budget is None, device=str(adapter.device), dtype=dtype,
                peak_bytes=pm.peak_bytes, peak_total_bytes=pm.peak_rss, entry_bytes=pm.start_bytes,
                seconds=seconds)


def run_point(args: argparse.Namespace, size: int, targets: str, budget: str, max_chunks: Optional[int]) -> dict:
    """``measure_point`` in a fresh subprocess; returns its JSON line."""
    point = dict(model=args.model, size=size, targets=targets, budget=budget, max_chunks=max_chunks,
                 device=args.device, dtype=args.dtype)
    cmd = [sys.executable, os.path.abspath(__file__), "--point", json.dumps(point)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"point {point} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(records: List[dict], path: Path) -> None:
    """Peak GB vs targets per size, one panel per budget, plus the flat-in-K panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [r for r in records if r["kind"] == "curve"]
    flat = [r for r in records if r["kind"] == "flat_k"]
    budgets = sorted({(r["budget_is_default"], r["budget_bytes"]) for r in curves}, reverse=True)
    fig, axes = plt.subplots(1, len(budgets) + bool(flat), figsize=(5.5 * (len(budgets) + bool(flat)), 4.2),
                             squeeze=False)
    for ax, (is_default, budget) in zip(axes[0], budgets):
        for size in sorted({r["size"] for r in curves}):
            pts = sorted((r for r in curves if r["size"] == size and r["budget_bytes"] == budget),
                         key=lambda r: r["targets_requested"])
            xs = [r["targets_requested"] for r in pts]
            line, = ax.plot(xs, [r["peak_total_bytes"] / GB for r in pts], "o-", label=f"{size} px, process")
            ax.plot(xs, [r["peak_bytes"] / GB for r in pts], "s--", color=line.get_color(), alpha=0.7,
                    label=f"{size} px, explain only")
        ax.axhline(budget / GB, color="gray", ls=":", label=f"budget {budget / GB:.3g} GB")
        ax.axhline(16, color="red", ls="-.", label="16 GB")
        ax.set_xscale("log")
        ax.set_xlabel("targets (patch tokens explained)")
        ax.set_ylabel("peak memory (GB)")
        ax.set_title(f"{'default' if is_default else 'explicit'} budget")
        ax.legend(fontsize=7)
    if flat:
        ax = axes[0][-1]
        pts = sorted(flat, key=lambda r: r["chunks_explained"])
        ax.plot([r["chunks_explained"] for r in pts], [r["peak_total_bytes"] / GB for r in pts], "o-",
                label="process")
        ax.plot([r["chunks_explained"] for r in pts], [r["peak_bytes"] / GB for r in pts], "s--",
                label="explain only")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("chunks explained (K)")
        ax.set_ylabel("peak memory (GB)")
        ax.set_title(f"{pts[0]['size']} px, chunk {pts[0]['chunk']}: flat in K")
        ax.legend(fontsize=7)
    fig.suptitle(f"ultra_fast explain peak memory, {records[0]['model']} ({records[0]['device']}, "
                 f"{records[0]['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--model", default="vit_large_patch14_clip_224")
    p.add_argument("--sizes", default="224,336,448", help="comma-separated square sizes (default: %(default)s)")
    p.add_argument("--targets", default="1,16,64,256,all",
                   help="comma-separated target counts, 'all' = every patch token (default: %(default)s)")
    p.add_argument("--budgets", default="default,1G",
                   help="comma-separated memory budgets: 'default' or bytes like 1G (default: %(default)s)")
    p.add_argument("--max-chunks", type=int, default=None,
                   help="explain only the first K chunks' targets of each point (the peak is in the first)")
    p.add_argument("--flat-k", default="1,2,3",
                   help="chunk counts K for the flatness check at the largest size, the last budget, all "
                        "targets; empty to skip (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point in this process
    args = p.parse_args(argv)
    if args.point:
        pt = json.loads(args.point)
        print(json.dumps(measure_point(pt["model"], pt["size"], pt["targets"], parse_budget(pt["budget"]),
                                       pt["max_chunks"], pt["device"], pt["dtype"])))
        return 0
    if args.out is None:
        p.error("--out is required")
    if args.max_chunks is not None and args.max_chunks < 1:
        p.error("--max-chunks must be >= 1")
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = [t.strip() for t in args.targets.split(",")]
    budgets = [b.strip() for b in args.budgets.split(",")]
    for b in budgets:
        parse_budget(b)  # fail before the first subprocess
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    jobs = [("curve", size, t, b, args.max_chunks) for b in budgets for size in sizes for t in targets]
    # The flatness check uses the last (smallest explicit) budget, so that all targets need several chunks.
    jobs += [("flat_k", max(sizes), "all", budgets[-1], int(k)) for k in args.flat_k.split(",") if k.strip()]
    for kind, size, t, b, k in jobs:
        rec = dict(kind=kind, **run_point(args, size, t, b, k))
        records.append(rec)
        print(f"{kind:6s} {size} px, targets {rec['targets_explained']}/{rec['targets_requested']} "
              f"(chunk {rec['chunk']}), budget {rec['budget_bytes'] / GB:.3g} GB: peak "
              f"{rec['peak_bytes'] / GB:.2f} GB above {rec['entry_bytes'] / GB:.2f} GB "
              f"({rec['seconds']:.1f} s)", flush=True)
        (args.out / "memory_curve.json").write_text(json.dumps(records, indent=1))
    plot(records, args.out / "memory_curve.png")
    print(f"wrote {args.out / 'memory_curve.json'} and {args.out / 'memory_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
