"""Which tokens to explain: names or indices -> a (B, T) index tensor into the N tokens."""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from ..errors import ConfigError, InputError

Targets = Union[str, Sequence[int], torch.Tensor]
TARGET_NAMES = ("patches", "all", "prefix")


def stride_targets(grid: Tuple[int, int], num_prefix: int, stride: int) -> List[int]:
    """Token indices of every ``stride``-th patch along rows and columns of the (h, w) patch grid.

    Tokens are ordered prefix first, then patches row-major, so patch (r, c) is token P + r·w + c.
    """
    if not isinstance(stride, int) or stride < 1:
        raise ConfigError(f"stride must be a positive int; got {stride!r}")
    h, w = grid
    return [num_prefix + r * w + c for r in range(0, h, stride) for c in range(0, w, stride)]


def resolve_targets(targets: Targets, batch: int, num_tokens: int, num_prefix: int,
                    device: torch.device) -> torch.Tensor:
    """(B, T) long tensor of token indices (prefix tokens first, then patches row-major).

    ``"patches"``: every patch token; ``"all"``: prefix and patch tokens; ``"prefix"``: CLS/registers;
    a sequence or 1-D tensor: the same token indices for every image; a (B, T) tensor: per image.
    """
    if isinstance(targets, str):
        if targets == "patches":
            idx = torch.arange(num_prefix, num_tokens)
        elif targets == "all":
            idx = torch.arange(num_tokens)
        elif targets == "prefix":
            if num_prefix == 0:
                raise ConfigError('targets="prefix" but the model has no prefix tokens')
            idx = torch.arange(num_prefix)
        else:
            raise ConfigError(f"unknown targets {targets!r}; expected one of {TARGET_NAMES} or token indices")
        idx = idx.expand(batch, -1)
    else:
        idx = torch.as_tensor(targets)
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise TypeError(f"target indices must be integers; got dtype {idx.dtype}")
        if idx.dim() == 1:
            idx = idx.expand(batch, -1)
        elif idx.dim() != 2 or idx.shape[0] != batch:
            raise InputError(f"target indices must be (T,) or (B={batch}, T); got shape {tuple(idx.shape)}")
    if idx.numel() == 0:
        raise ConfigError("no targets to explain")
    if int(idx.min()) < 0 or int(idx.max()) >= num_tokens:
        raise IndexError(f"target indices must lie in [0, {num_tokens}) (N = {num_prefix} prefix + "
                         f"{num_tokens - num_prefix} patch tokens); got [{int(idx.min())}, {int(idx.max())}]")
    return idx.to(device=device, dtype=torch.long).contiguous()
