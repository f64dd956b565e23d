"""What an adapter tells the engine about a plain pre-norm ViT block, for the hand-written backward.

The block (timm ``Block``, open_clip ``ResidualAttentionBlock``, Hugging Face ViT/DINOv2/CLIP layers)::

    x1 = x  + ls1 * proj(attn(LN1(x)))
    x2 = x1 + ls2 * fc2(act(fc1(LN2(x1))))

An adapter's ``block_spec(index)`` returns one of these (the module's own parameter tensors, not
copies) or None for a block of another form, which the engine then differentiates with autograd.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class PreNormBlock:
    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    ln1_eps: float
    qkv_weight: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    num_heads: int
    scale: float
    proj_weight: torch.Tensor
    proj_bias: Optional[torch.Tensor]
    ls1: Optional[torch.Tensor]
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor
    ln2_eps: float
    fc1_weight: torch.Tensor
    fc1_bias: Optional[torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    fc2_weight: torch.Tensor
    fc2_bias: Optional[torch.Tensor]
    ls2: Optional[torch.Tensor]
