"""Validation of the engine's options and the state it borrows from the model."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError, UnsupportedHardwareError
from .hardware import HALF_DTYPES, supports_fast

ORDERS = ("rollout", "paper")

#: Names of the backward dtypes a fast run may ask for (``explain(compute_dtype=...)``); None = exact.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: What ``compute_dtype`` accepts by name: ``"auto"`` (the fastest this device supports) and the above.
COMPUTE_DTYPE_CHOICES = ("auto",) + tuple(sorted(COMPUTE_DTYPES))
#: Target stride of the fast preset where no reduced-precision backward pays (about 4x fewer targets).
FAST_STRIDE = 2

ComputeDtype = Union[None, str, torch.dtype]


def resolve_layer(layer: int, num_blocks: int) -> int:
    """Our ``layer`` is "the tokens after block l", 1..L; negative counts from the end (-1 = L)."""
    if not isinstance(layer, int):
        raise TypeError(f"layer must be an int; got {type(layer).__name__}")
    l = layer + num_blocks + 1 if layer < 0 else layer
    if not 1 <= l <= num_blocks:
        raise ConfigError(f"layer={layer} is out of range for a model with {num_blocks} blocks "
                          f"(1..{num_blocks}, or -1..-{num_blocks})")
    return l


def resolve_start(start_block: int, layer: int) -> int:
    if not isinstance(start_block, int) or not 1 <= start_block <= layer:
        raise ConfigError(f"start_block={start_block!r} must be an int in 1..layer ({layer})")
    return start_block


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; expected one of {ORDERS}")
    return order


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every sub-module in eval mode and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training


def default_memory_budget(device: torch.device) -> int:
    """Bytes the per-chunk backward may use: a quarter of RAM (max 4 GiB) on CPU, half the free GPU memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return int(min(total // 4, 4 << 30))


def bytes_per_target(batch: int, num_tokens: int, num_heads: int, dim: int, elem: int, order: str,
                     compute_elem: Optional[int] = None, casts_G: bool = False) -> int:
    """Peak bytes one target adds to a chunk during one block's batched backward.

    Counts the (H, N, N) gradient and the softmax backward's temporaries, the token-gradient
    activations (MLP hidden 4d, qkv 3d, and a few d-wide tensors) in the backward's element size
    ``compute_elem`` (default ``elem``), and the chain state in the model's ``elem``. ``casts_G``: a
    half-precision backward whose chain step needs G in the state's dtype (``paper_step``, the torch
    ops) keeps a full-precision copy of G (H, N, N) as well.
    """
    ce = elem if compute_elem is None else compute_elem
    attn = 4 * num_heads * num_tokens * num_tokens * ce
    acts = 16 * num_tokens * dim * ce
    state = (num_tokens * num_tokens if order == "paper" else num_tokens) * elem
    copy = num_heads * num_tokens * num_tokens * elem if casts_G else 0
    return batch * (attn + acts + state + copy)


def chunk_size(budget: Optional[int], per_target: int, total: int, device: torch.device) -> int:
    budget = default_memory_budget(device) if budget is None else int(budget)
    if budget <= 0:
        raise ConfigError(f"memory_budget must be a positive number of bytes; got {budget}")
    return max(1, min(total, budget // max(per_target, 1)))


def parse_compute_dtype(value: ComputeDtype) -> Union[None, str, torch.dtype]:
    """Name check only: None / ``"exact"`` -> None, ``"auto"`` -> ``"auto"``, a name -> its dtype."""
    if value is None or value == "exact":
        return None
    if isinstance(value, torch.dtype):
        if value not in COMPUTE_DTYPES.values():
            raise ConfigError(f"compute_dtype={value} is not supported; expected one of {COMPUTE_DTYPE_CHOICES}")
        return value
    if value == "auto":
        return "auto"
    if value not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown compute_dtype {value!r}; expected one of {COMPUTE_DTYPE_CHOICES} or None (exact)")
    return COMPUTE_DTYPES[value]


def auto_compute_dtype(device: torch.device, model_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The reduced-precision backward that pays on ``device``: bfloat16 where it is native (CUDA sm_80+, CPUs
    with AVX512_BF16 or AMX), else None (exact). Its agreement with exact float32 is measured in README."""
    if model_dtype in HALF_DTYPES:
        return None
    return torch.bfloat16 if supports_fast(torch.bfloat16, device)[0] else None


def resolve_compute_dtype(value: ComputeDtype, device: torch.device,
                          model_dtype: torch.dtype = torch.float32) -> Optional[torch.dtype]:
    """The backward dtype to run, or None for the exact mode; refuses, before any work, a half-precision
    dtype that ``device`` does not compute natively (it would be many times slower than float32)."""
    device = torch.device(device)
    v = parse_compute_dtype(value)
    if v == "auto":
        return auto_compute_dtype(device, model_dtype)
    if v is None or v == model_dtype:
        return None
    assert isinstance(v, torch.dtype)
    if v in HALF_DTYPES:
        ok, why = supports_fast(v, device)
        if not ok:
            name = str(v).replace("torch.", "")
            raise UnsupportedHardwareError(
                f"compute_dtype={name} would be far slower than exact float32 here: {why}. Use the exact mode, "
                f"compute_dtype='auto' (--fast: the fastest mode this device runs well), or a target stride "
                f"(--target-stride {FAST_STRIDE}: about {FAST_STRIDE ** 2}x fewer tokens explained)")
    return v


@dataclass(frozen=True)
class FastMode:
    """The ``--fast`` preset for one device: a reduced-precision backward where it is native, else a
    target stride (segmentation and benchmarks; ``explain`` of given tokens then stays exact)."""

    compute_dtype: Optional[torch.dtype]
    target_stride: int
    reason: str

    @property
    def compute_dtype_name(self) -> Optional[str]:
        return None if self.compute_dtype is None else str(self.compute_dtype).replace("torch.", "")


def fast_mode(device: torch.device, model_dtype: torch.dtype = torch.float32) -> FastMode:
    """What ``--fast`` / ``compute_dtype="auto"`` means on ``device`` (see ``FastMode``)."""
    device = torch.device(device)
    dtype = auto_compute_dtype(device, model_dtype)
    if dtype is not None:
        return FastMode(dtype, 1, f"bfloat16 backward: {supports_fast(dtype, device)[1]}")
    why = supports_fast(torch.bfloat16, device)[1]
    return FastMode(None, FAST_STRIDE, f"exact float32 backward with target stride {FAST_STRIDE} "
                                       f"(bfloat16 does not pay here: {why})")
