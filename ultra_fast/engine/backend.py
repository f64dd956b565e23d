"""Chooses who runs the chain steps: the native C++/CUDA ops or the pure-PyTorch references.

On CUDA, ``backend="auto"`` takes the native kernels only once they have passed a one-time self-check
against the torch references on that device and dtype (``cuda_ops_trusted``): no CUDA kernel of this
package had run on a GPU when this was written, and a wrong kernel must not silently give wrong maps.
``ULTRA_FAST_TRUST_CUDA_OPS=1`` skips the check, ``=0`` always uses the torch ops; ``backend="native"``
always uses the kernels.
"""
from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType
from typing import Callable, Dict, Tuple

import torch

from .. import ops
from ..errors import ConfigError, NativeOpsUnavailableError
from . import reference_ops

BACKENDS = ("auto", "native", "torch")
_NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
}
# bfloat16 on CPU: rollout_step and the fused backward pieces only (not contribution / paper_step).
_NATIVE_ROLLOUT_DTYPES = {"cpu": (torch.bfloat16,)}


def native_supports(device: torch.device, dtype: torch.dtype, order: str = "paper") -> bool:
    """Whether the native ops cover ``dtype`` on ``device`` for the chain ``order``."""
    dtypes = _NATIVE_DTYPES.get(device.type, ())
    if order == "rollout":
        dtypes = dtypes + _NATIVE_ROLLOUT_DTYPES.get(device.type, ())
    return ops.is_available(device.type) and dtype in dtypes


def get_ops(backend: str, device: torch.device, dtype: torch.dtype, order: str = "paper") -> ModuleType:
    """A module with the chain steps (``contribution``, ``rollout_step``, ``paper_step``) and the
    fused backward pieces (``softmax_backward_``, ``layer_norm_backward_``)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return reference_ops
    if native_supports(device, dtype, order) and (backend == "native" or device.type != "cuda"
                                                  or cuda_ops_trusted(device, dtype)):
        return ops
    if backend == "native":
        raise NativeOpsUnavailableError(
            f"backend='native' but the native ops do not support {device.type}/{dtype} in this build "
            f"({ops.build_info()}); build with `pip install --no-build-isolation -e .` or use backend='torch'")
    return reference_ops


TRUST_ENV = "ULTRA_FAST_TRUST_CUDA_OPS"


def _self_check_cases(device: torch.device, dtype: torch.dtype) -> Dict[str, Tuple[Callable, Callable, tuple]]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, positive=False):
        t = torch.randn(*shape, generator=g)
        return (t.abs() if positive else t).to(device=device, dtype=dtype)

    B, T, H, N, D = 2, 5, 3, 17, 24
    A = rand(B, H, N, N, positive=True).softmax(-1)
    G = rand(B, T, H, N, N)
    v, P = rand(B, T, N), rand(B, T, N, N)
    grad, xhat, rstd, res = rand(T, B, N, D), rand(B, N, D), rand(B, N, positive=True), rand(T, B, N, D)
    Gs = rand(B, H, T, N, N)  # (..., T, R, M) against attn (..., R, M)
    return {
        "contribution": (ops.contribution, reference_ops.contribution, (G, A)),
        "rollout_step": (ops.rollout_step, reference_ops.rollout_step, (v, G, A)),
        "paper_step": (ops.paper_step, reference_ops.paper_step, (P, G, A)),
        "softmax_backward_": (ops.softmax_backward_, reference_ops.softmax_backward_,
                              (Gs, A)),
        "layer_norm_backward_": (ops.layer_norm_backward_, reference_ops.layer_norm_backward_,
                                 (grad, xhat, rstd, res)),
    }


@functools.lru_cache(maxsize=None)
def _self_check(device: torch.device, dtype: torch.dtype) -> Tuple[bool, str]:
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    for name, (native, ref, args) in _self_check_cases(device, dtype).items():
        try:
            got = native(*[a.clone() for a in args])
            want = ref(*[a.clone() for a in args])
        except Exception as e:  # a kernel that cannot run here is as untrustworthy as a wrong one
            return False, f"{name} failed to run: {e}"
        err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
        if not err <= tol:
            return False, f"{name} differs from the torch reference by {err:.2e} (relative; tolerance {tol:.0e})"
    return True, "passed"


def cuda_ops_trusted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend="auto"`` may use the CUDA kernels on ``device`` for ``dtype`` (see the module doc)."""
    flag = os.environ.get(TRUST_ENV)
    if flag is not None and flag.strip() in ("0", "1"):
        return flag.strip() == "1"
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok, why = _self_check(torch.device("cuda", index), dtype)
    if not ok:
        warnings.warn(f"ultra_fast: the native CUDA ops failed their self-check on {device}/{dtype} ({why}); "
                      f"backend='auto' uses the torch ops instead", RuntimeWarning, stacklevel=3)
    return ok
