"""Chooses who runs the chain steps: the native C++/CUDA ops or the pure-PyTorch references."""
from __future__ import annotations

from types import ModuleType

import torch

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
    try:
        from .. import ops
    except ImportError:
        return False
    dtypes = _NATIVE_DTYPES.get(device.type, ())
    if order == "rollout":
        dtypes = dtypes + _NATIVE_ROLLOUT_DTYPES.get(device.type, ())
    return ops.is_available(device.type) and dtype in dtypes


def get_ops(backend: str, device: torch.device, dtype: torch.dtype, order: str = "paper") -> ModuleType:
    """A module with the chain steps (``contribution``, ``rollout_step``, ``paper_step``) and the
    fused backward pieces (``softmax_backward_``, ``layer_norm_backward_``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return reference_ops
    if native_supports(device, dtype, order):
        from .. import ops
        return ops
    if backend == "native":
        from .. import ops
        raise RuntimeError(
            f"backend='native' but the native ops do not support {device.type}/{dtype} in this build "
            f"({ops.build_info()}); build with `pip install --no-build-isolation -e .` or use backend='torch'")
    return reference_ops
