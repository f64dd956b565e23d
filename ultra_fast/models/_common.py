"""Small pieces the adapters share."""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import nn

from ..errors import InputError


def dynamic(module: nn.Module) -> Any:
    """``module`` typed as ``Any``, to read the sub-modules and attributes a third-party model defines.

    timm / transformers / open_clip modules resolve them at runtime (``nn.Module.__getattr__``), which the
    type checker sees as ``Tensor | Module``; this is the one place the adapters say so. No runtime effect.
    """
    return module


def patch_grid(images: torch.Tensor, patch_size: Tuple[int, int], name: str) -> Tuple[int, int]:
    """The (h, w) patch grid, with a clear error for sizes the patch embedding cannot tile."""
    H, W = images.shape[-2:]
    ph, pw = patch_size
    if H % ph or W % pw:
        raise InputError(
            f"{name}: image size {H}x{W} is not a multiple of the patch size {ph}x{pw}; "
            f"resize or crop to a multiple (ultra_fast.preprocess does)")
    return H // ph, W // pw


def resample_pos_embed(pos: torch.Tensor, grid: Tuple[int, int], native: Tuple[int, int],
                       num_prefix_tokens: int) -> torch.Tensor:
    """Position embedding for another grid; timm's own bicubic resampling (what dynamic_img_size does)."""
    if tuple(grid) == tuple(native):
        return pos
    # Imported here, not at the top: timm pulls in torchvision and torch._dynamo (seconds), and
    # `import ultra_fast` must stay cheap; timm is loaded anyway by the time a timm model is wrapped.
    from timm.layers import resample_abs_pos_embed
    return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(native),
                                  num_prefix_tokens=num_prefix_tokens)
