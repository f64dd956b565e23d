"""Timed explanation runs with FLOPs, utilisation and peak memory (what ``ultra-fast bench`` prints)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..engine.hardware import hardware_info, supports_fast
from ..engine.options import ComputeDtype, resolve_compute_dtype
from ..engine.targets import stride_targets
from ..errors import ConfigError
from ..models import Adapter
from .flops import explain_flops, matmul_rate
from .memory import PeakMemory

TargetArg = Union[str, List[int]]


def parse_targets(spec: str, grid: Tuple[int, int], num_prefix: int) -> TargetArg:
    """``"patches"``, ``"all"``, ``"N"`` (the first N patch tokens) or ``"stride:K"`` -> ``explain`` targets."""
    spec = str(spec).strip()
    n = grid[0] * grid[1]
    if spec in ("patches", "all"):
        return spec
    if spec.startswith("stride:"):
        value = spec[len("stride:"):]
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"targets {spec!r}: expected stride:K with a positive integer K")
        return stride_targets(grid, num_prefix, int(value))
    if spec.isdigit():
        count = int(spec)
        if not 1 <= count <= n:
            raise ConfigError(f"targets {spec!r}: the count must lie in 1..{n} (patch tokens of the {grid[0]}x"
                              f"{grid[1]} grid)")
        return list(range(num_prefix, num_prefix + count))
    raise ConfigError(f"targets {spec!r}: expected patches, all, a count N or stride:K")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> List[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (device synchronised)."""
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats must be >= 1 and warmup >= 0; got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
        _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def random_images(adapter: Adapter, batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """(batch, 3, size, size) standard-normal pixels on the model's device and dtype (speed does not
    depend on the content)."""
    ph, pw = adapter.preprocessing.patch_size
    if size % ph or size % pw or size < max(ph, pw):
        raise ConfigError(f"--size {size} is not a positive multiple of {adapter.name}'s {ph}x{pw} patch size")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g).to(device=adapter.device, dtype=adapter.dtype)


def chain_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which chain ops ``explain(backend=...)`` will use here: ``"native"`` or ``"torch"``."""
    from ..engine import reference_ops
    from ..engine.backend import get_ops
    return "torch" if get_ops(backend, device, dtype, "rollout") is reference_ops else "native"


def run_bench(adapter: Adapter, size: int, targets: str = "patches", layer: int = -1, start_block: int = 1,
              batch: int = 1, repeats: int = 3, warmup: int = 1, segment: bool = False, backend: str = "auto",
              memory_budget: Optional[int] = None, matmul_n: int = 4096,
              compute_dtype: ComputeDtype = None) -> dict:
    """Time ``explain`` on random images and report speed, FLOPs, utilisation and peak memory.

    Seconds per image are the call's wall time divided by ``batch``. Utilisation is the achieved
    FLOP/s (``explain_flops`` total / best time) over the FLOP/s of one ``matmul_n``² matrix product in
    the model's dtype on the same device, measured in this run. Peak memory comes from one extra
    call after the timed ones (``PeakMemory``: CUDA allocator peak, or the process RSS growth on CPU).
    ``segment`` adds the end-to-end segmentation (explain all patches + ``segment_maps``) images/s.
    ``compute_dtype`` (e.g. bfloat16): the engine's lower-precision backward mode; utilisation is then
    also given against the matrix product in that dtype.
    """
    from ..engine import explain
    device = adapter.device
    # Refuses a half dtype this device does not compute natively, before any timing or matmul probe.
    compute_dtype = resolve_compute_dtype(compute_dtype, device, adapter.dtype)
    x = random_images(adapter, batch, size)
    grid = adapter.grid_size(x)
    P = adapter.num_prefix_tokens
    tgt = parse_targets(targets, grid, P)
    kw: Dict[str, Any] = dict(layer=layer, start_block=start_block, targets=tgt, backend=backend,
                              memory_budget=memory_budget, compute_dtype=compute_dtype)
    fc = explain_flops(adapter, (int(x.shape[-2]), int(x.shape[-1])), targets=tgt, layer=layer, start_block=start_block,
                       batch=batch, memory_budget=memory_budget)
    times = time_calls(lambda: explain(adapter, x, **kw), repeats, warmup, device)
    with PeakMemory(device) as pm:
        explain(adapter, x, **kw)
    best, median = min(times), statistics.median(times)
    rates = same_run_matmul_rates(device, n=matmul_n, dtypes=(adapter.dtype, torch.float32, torch.bfloat16)
                                  + ((compute_dtype,) if compute_dtype is not None else ()))
    rate = rates[_name(adapter.dtype)]["flops_per_second"]
    achieved = fc.total / best
    out = {
        "model": adapter.name, "device": str(device), "dtype": str(adapter.dtype).replace("torch.", ""),
        "image_size": list(x.shape[-2:]), "grid": list(grid), "tokens": fc.tokens, "targets": fc.targets,
        "batch": batch, "layer": layer, "start_block": start_block,
        "chain_backend": chain_backend(backend, device, compute_dtype or adapter.dtype),
        "chunk": fc.chunk, "chunks": fc.chunks, "repeats": repeats, "warmup": warmup,
        "seconds_per_image_best": best / batch, "seconds_per_image_median": median / batch,
        "images_per_second": batch / best,
        "flops": fc.total, "flops_per_image": fc.total / batch, "flops_breakdown": fc.as_dict(),
        "achieved_flops_per_second": achieved, "matmul_flops_per_second": rate, "matmul_n": matmul_n,
        "utilisation": achieved / rate,
        "compute_dtype": None if compute_dtype is None else str(compute_dtype).replace("torch.", ""),
        "peak_memory_bytes": pm.peak_bytes,
        "peak_memory_kind": "cuda max_memory_allocated growth" if device.type == "cuda" else "process RSS growth",
        "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "hardware": hardware_info(device), "matmul_rates": rates,
    }
    if compute_dtype is not None and compute_dtype != adapter.dtype:
        same = rates[_name(compute_dtype)]["flops_per_second"]
        out.update(matmul_compute_dtype_flops_per_second=same, utilisation_compute_dtype=achieved / same)
    if segment:
        out["segment_images_per_second"] = segment_rate(adapter, x, repeats, warmup, layer=layer,
                                                        start_block=start_block, backend=backend,
                                                        memory_budget=memory_budget, compute_dtype=compute_dtype)
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def same_run_matmul_rates(device: torch.device, n: int = 4096,
                          dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16)) -> Dict[str, dict]:
    """{dtype name: {"flops_per_second", "n", "native"}}: the square matrix-product rate of each dtype,
    measured now on ``device``. A half dtype the CPU does not compute natively is timed on a 512² product
    once (a 4096² one would take minutes there), and marked ``native: False``."""
    out: Dict[str, dict] = {}
    for dtype in dict.fromkeys(dtypes):
        native, why = supports_fast(dtype, device)
        side, repeats = (n, 3) if native else (min(n, 512), 1)
        out[_name(dtype)] = {"flops_per_second": matmul_rate(dtype, n=side, device=device, repeats=repeats),
                             "n": side, "native": native, "why": why}
    return out


def segment_rate(adapter: Adapter, x: torch.Tensor, repeats: int, warmup: int, **explain_kwargs) -> float:
    """Images/s of explain (all patch tokens) + ``segment_maps`` per image, best of ``repeats``."""
    from ..engine import explain
    from ..segmentation import segment_maps
    size = (int(x.shape[-2]), int(x.shape[-1]))

    def run() -> None:
        maps = explain(adapter, x, targets="patches", **explain_kwargs)
        for m in maps:
            segment_maps(m, size)

    return x.shape[0] / min(time_calls(run, repeats, warmup, adapter.device))


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_table(r: dict) -> str:
    """The result as aligned ``name  value`` lines."""
    rows: Sequence[Tuple[str, str]] = [
        ("model", r["model"]),
        ("device / dtype", f"{r['device']} / {r['dtype']}"
                           + (f", backward in {r['compute_dtype']}" if r.get("compute_dtype") else "")
                           + f" ({r['torch_threads']} torch threads, "
                           f"torch {r['torch_version']})"),
        ("image / grid / tokens", f"{r['image_size'][0]}x{r['image_size'][1]} / {r['grid'][0]}x{r['grid'][1]}"
                                  f" / N={r['tokens']}"),
        ("targets x batch", f"{r['targets']} x {r['batch']} (layer {r['layer']}, start block "
                            f"{r['start_block']})"),
        ("chunk", f"{r['chunk']} targets, {r['chunks']} chunk(s); chain ops: {r['chain_backend']}"),
        ("s / image", f"best {r['seconds_per_image_best']:.4g}, median {r['seconds_per_image_median']:.4g} "
                      f"({r['repeats']} repeats, {r['warmup']} warm-up)"),
        ("images / s", f"{r['images_per_second']:.4g}"),
        ("FLOPs / image", _si(r["flops_per_image"], "FLOP")),
        ("achieved", _si(r["achieved_flops_per_second"], "FLOP/s")),
        (f"matmul {r['matmul_n']}^2", _si(r["matmul_flops_per_second"], "FLOP/s")),
        ("matmul rates", ", ".join(f"{k} {_si(v['flops_per_second'], 'FLOP/s')} ({v['n']}^2"
                                   + ("" if v["native"] else ", not native") + ")"
                                   for k, v in r.get("matmul_rates", {}).items())),
        ("hardware", f"{r['hardware']['cpu_model']}, CPU capability {r['hardware']['cpu_capability']}, "
                     f"{r['hardware']['cpu_count']} cores" + (f", {r['hardware']['gpu']}" if 'gpu' in r['hardware']
                                                              else "") if "hardware" in r else "?"),
        ("utilisation", f"{100 * r['utilisation']:.1f} %" + (
            f" of fp32; {100 * r['utilisation_compute_dtype']:.1f} % of {r['compute_dtype']}"
            if "utilisation_compute_dtype" in r else "")),
        ("peak memory", f"{r['peak_memory_bytes'] / 2 ** 20:.1f} MiB ({r['peak_memory_kind']})"),
    ]
    if "segment_images_per_second" in r:
        rows = list(rows) + [("segment images / s", f"{r['segment_images_per_second']:.4g}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
