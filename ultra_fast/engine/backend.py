"""Chooses who runs the chain steps: the native C++/CUDA ops or the pure-PyTorch references."""
from __future__ import annotations

from types import ModuleType

import torch

from . import reference_ops

BACKENDS = ("auto", "native", "torch")
_NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def native_supports(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        from .. import ops
    except ImportError:
        return False
    return ops.is_available(device.type) and dtype in _NATIVE_DTYPES.get(device.type, ())


def get_ops(backend: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """A module with ``contribution``, ``rollout_step`` and ``paper_step``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return reference_ops
    if native_supports(device, dtype):
        from .. import ops
        return ops
    if backend == "native":
        from .. import ops
        raise RuntimeError(
            f"backend='native' but the native ops do not support {device.type}/{dtype} in this build "
            f"({ops.build_info()}); build with `pip install --no-build-isolation -e .` or use backend='torch'")
    return reference_ops
