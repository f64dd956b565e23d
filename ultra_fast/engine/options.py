"""Validation of the engine's options and the state it borrows from the model."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import nn

ORDERS = ("rollout", "paper")


def resolve_layer(layer: int, num_blocks: int) -> int:
    """Our ``layer`` is "the tokens after block l", 1..L; negative counts from the end (-1 = L)."""
    if not isinstance(layer, int):
        raise TypeError(f"layer must be an int; got {type(layer).__name__}")
    l = layer + num_blocks + 1 if layer < 0 else layer
    if not 1 <= l <= num_blocks:
        raise ValueError(f"layer={layer} is out of range for a model with {num_blocks} blocks "
                         f"(1..{num_blocks}, or -1..-{num_blocks})")
    return l


def resolve_start(start_block: int, layer: int) -> int:
    if not isinstance(start_block, int) or not 1 <= start_block <= layer:
        raise ValueError(f"start_block={start_block!r} must be an int in 1..layer ({layer})")
    return start_block


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {ORDERS}")
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


def bytes_per_target(batch: int, num_tokens: int, num_heads: int, dim: int, elem: int, order: str) -> int:
    """Peak bytes one target adds to a chunk during one block's batched backward.

    Counts the (H, N, N) gradient and the softmax backward's temporaries, the token-gradient
    activations (MLP hidden 4d, qkv 3d, and a few d-wide tensors), and the chain state.
    """
    attn = 4 * num_heads * num_tokens * num_tokens
    acts = 16 * num_tokens * dim
    state = num_tokens * num_tokens if order == "paper" else num_tokens
    return batch * elem * (attn + acts + state)


def chunk_size(budget: Optional[int], per_target: int, total: int, device: torch.device) -> int:
    budget = default_memory_budget(device) if budget is None else int(budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes; got {budget}")
    return max(1, min(total, budget // max(per_target, 1)))
