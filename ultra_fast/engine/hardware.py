"""What the device at hand computes fast: native reduced-precision arithmetic, and facts for benchmarks.

A bfloat16 matrix product is about 4x faster than float32 on a CPU with AVX512_BF16 or AMX, and about
500x *slower* on one without (AVX2-only CPUs: every AMD before Zen 4, Intel client CPUs, many cloud
instances), where PyTorch falls back to a scalar loop. So a reduced-precision mode is allowed on CPU only
where the CPU computes that dtype natively, and refused with a clear error elsewhere.

The probes are torch's own (``torch.backends.cpu.get_cpu_capability()`` and the ``torch.cpu._is_*``
feature checks). Where they cannot tell (a CPU that is not x86), a one-time micro-benchmark decides.

``ULTRA_FAST_CPU_CAPABILITY`` (e.g. ``AVX2``) makes the package treat the CPU as having only that
capability; it exists to check the refusal path and the ``auto`` choice on any machine.
"""
from __future__ import annotations

import functools
import os
import platform
import time
from typing import Dict, Optional, Tuple

import torch

#: Environment variable that overrides the CPU capability the probes report (for testing the refusal).
CAPABILITY_ENV = "ULTRA_FAST_CPU_CAPABILITY"
#: Half-precision dtypes the engine's ``compute_dtype`` mode can run in.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``lscpu``'s "Model name"), or the platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _probe(name: str) -> Optional[bool]:
    fn = getattr(torch.cpu, name, None)
    if fn is None:
        return None
    try:
        return bool(fn())
    except Exception:  # a probe torch has but cannot run here (e.g. not x86) says nothing
        return None


#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) under which its bf16 kernels are not native.
_ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@functools.lru_cache(maxsize=None)
def _torch_cpu_features() -> Tuple[str, Dict[str, Optional[bool]]]:
    capability = torch.backends.cpu.get_cpu_capability()
    features = {
        "avx2": _probe("_is_avx2_supported"),
        "avx512": _probe("_is_avx512_supported"),
        "avx512_bf16": _probe("_is_avx512_bf16_supported"),
        "amx_tile": _probe("_is_amx_tile_supported"),
        "amx_fp16": _probe("_is_amx_fp16_supported"),
        "avx512_fp16": None,  # torch has no probe; amx_fp16 or the micro-benchmark decide
    }
    # The hardware flags say what the silicon has; what torch and oneDNN will *use* can be capped
    # (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2): a bf16 product then runs the slow path
    # (measured: < 1 GFLOP/s on an AVX512_BF16 CPU capped so), so the caps count as absent features.
    below_avx512 = capability in ("DEFAULT", "AVX2")
    onednn_capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _ONEDNN_BELOW_BF16
    if below_avx512:
        features["avx512"] = False
    if below_avx512 or onednn_capped:
        for k in ("avx512_bf16", "amx_tile", "amx_fp16"):
            if features[k]:  # None (torch cannot tell) stays None
                features[k] = False
    return capability, features


def cpu_features() -> Tuple[str, Dict[str, Optional[bool]]]:
    """(capability, {feature: True/False/None}) as torch sees this CPU; None = torch cannot tell.

    With ``ULTRA_FAST_CPU_CAPABILITY`` set, that capability is reported and every feature above it is
    reported absent (so ``AVX2`` reads as a CPU without AVX-512, AVX512_BF16 or AMX).
    """
    capability, features = _torch_cpu_features()
    forced = os.environ.get(CAPABILITY_ENV)
    if forced:
        level = forced.strip().upper()
        features = dict(features)
        if level in ("DEFAULT", "AVX2", "NONE"):
            for k in ("avx512", "avx512_bf16", "amx_tile", "amx_fp16", "avx512_fp16"):
                features[k] = False
            if level != "AVX2":
                features["avx2"] = False
        elif level == "AVX512":
            for k in ("avx512_bf16", "amx_tile", "amx_fp16", "avx512_fp16"):
                features[k] = False
        capability = level
    return capability, features


def _matmul_seconds(dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    t0 = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - t0


@functools.lru_cache(maxsize=None)
def _half_beats_float32(dtype: torch.dtype) -> bool:
    """A 768² product in ``dtype`` takes at most 1.5x the float32 one (a non-native dtype: 15-500x; smaller
    products can take a fallback path that hides the difference)."""
    return _matmul_seconds(dtype, 768) <= 1.5 * _matmul_seconds(torch.float32, 768)


def cpu_native(dtype: torch.dtype) -> Tuple[bool, str]:
    """Whether this CPU computes ``dtype`` natively, and what decided it (for messages and benchmarks)."""
    if dtype not in HALF_DTYPES:
        return True, f"{dtype} is native everywhere"
    capability, f = cpu_features()
    if dtype == torch.bfloat16:
        probes = (f["avx512_bf16"], f["amx_tile"])
        units = "AVX512_BF16 or AMX"
    else:
        probes = (f["avx512_fp16"], f["amx_fp16"])
        units = "AVX512_FP16 or AMX-FP16"
    if any(p is True for p in probes):
        return True, f"CPU capability {capability} with {units}"
    if os.environ.get(CAPABILITY_ENV) or (platform.machine() in ("x86_64", "AMD64") and
                                          all(p is False for p in probes)):
        return False, f"CPU capability {capability}, without {units}"
    fast = _half_beats_float32(dtype)
    verdict = "as fast as" if fast else "much slower than"
    return fast, f"CPU capability {capability}: a {dtype} matrix product measured {verdict} float32"


def supports_fast(dtype: torch.dtype, device: torch.device) -> Tuple[bool, str]:
    """Whether ``device`` runs a ``dtype`` backward at least as fast as float32, and why."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if dtype == torch.bfloat16 and major < 8:
            return False, f"{torch.cuda.get_device_name(device)} (sm_{major}x) has no bfloat16 tensor cores"
        return True, f"CUDA device {torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return cpu_native(dtype)
    return True, f"device {device.type}"


def hardware_info(device: Optional[torch.device] = None) -> Dict[str, object]:
    """What a benchmark must record to be read on other machines: CPU model, capability, cores, torch,
    and (for CUDA) the GPU. Matrix-product rates are measured by ``profiling.flops.matmul_rate``."""
    capability, features = cpu_features()
    info: Dict[str, object] = {
        "cpu_model": cpu_model(),
        "cpu_capability": capability,
        "cpu_features": {k: v for k, v in features.items() if v is not None},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "machine": platform.machine(),
        "bf16_native_cpu": cpu_native(torch.bfloat16)[0],
    }
    if os.environ.get(CAPABILITY_ENV):
        info["capability_forced_by"] = f"{CAPABILITY_ENV}={os.environ[CAPABILITY_ENV]}"
    if device is not None and torch.device(device).type == "cuda":
        d = torch.device(device)
        info["gpu"] = torch.cuda.get_device_name(d)
        info["gpu_capability"] = "sm_%d%d" % torch.cuda.get_device_capability(d)
    return info
