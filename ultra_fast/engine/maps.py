"""From chained rows S̄_i[i, :] to image maps (docs/method.md §2 steps 5-7)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError

Size = Union[None, str, Tuple[int, int]]
INTERPOLATIONS = ("bilinear", "bicubic")


def finalize(rows: torch.Tensor, idx: torch.Tensor, num_prefix: int, grid: Tuple[int, int],
             self_max: bool = True) -> torch.Tensor:
    """rows (B, T, N) -> maps (B, T, h, w): drop prefix columns, replace a patch target's self entry.

    The self entry is replaced by the max of the other n-1 entries because the skip connections make
    it dominate every map.
    """
    maps = rows[..., num_prefix:].clone()
    if self_max:
        own = idx - num_prefix
        is_patch = own >= 0
        if bool(is_patch.any()) and maps.shape[-1] > 1:
            own_c = own.clamp(min=0).unsqueeze(-1)
            masked = maps.scatter(-1, own_c, float("-inf"))
            other_max = masked.amax(-1, keepdim=True)
            replaced = maps.scatter(-1, own_c, other_max)
            maps = torch.where(is_patch.unsqueeze(-1), replaced, maps)
    return maps.reshape(*maps.shape[:-1], *grid)


def upsample(maps: torch.Tensor, size: Optional[Tuple[int, int]], interpolation: str = "bilinear") -> torch.Tensor:
    """(B, T, h, w) -> (B, T, H, W), align_corners=False as in docs/method.md §2 step 7."""
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {interpolation!r}; expected one of {INTERPOLATIONS}")
    if size is None or tuple(size) == tuple(maps.shape[-2:]):
        return maps
    B, T, h, w = maps.shape
    out = F.interpolate(maps.reshape(B * T, 1, h, w), size=tuple(size), mode=interpolation, align_corners=False)
    return out.reshape(B, T, *out.shape[-2:])


def resolve_size(size: Size, images: torch.Tensor) -> Optional[Tuple[int, int]]:
    if size is None:
        return None
    if size == "input":
        return int(images.shape[-2]), int(images.shape[-1])
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(int(s) > 0 for s in size):
        return (int(size[0]), int(size[1]))
    raise ConfigError(f"size must be None, 'input', an int or (H, W); got {size!r}")
