"""Adapter for open_clip ``VisionTransformer`` towers (ViT-B-32, ViT-B-16, ViT-L-14, ...).

open_clip runs attention through ``nn.MultiheadAttention(need_weights=False)``, which never
materialises the probabilities; the adapter recomputes the same attention explicitly from
``in_proj_weight`` / ``out_proj`` so the probabilities are in the graph.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ._common import patch_grid, resample_pos_embed
from .base import Adapter, Preprocessing, UnsupportedModelError, explicit_attention, layer_scale
from .block_spec import PreNormBlock


def _visual_tower(model: nn.Module):
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return None
    visual = getattr(model, "visual", model)
    return visual if isinstance(visual, VisionTransformer) else None


def is_open_clip_vit(model: nn.Module) -> bool:
    return _visual_tower(model) is not None


class OpenClipViTAdapter(Adapter):
    """Explains the image tower of an open_clip CLIP model (or a bare ``VisionTransformer``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        visual = _visual_tower(model)
        if visual is None:
            raise UnsupportedModelError(
                f"expected an open_clip model with a VisionTransformer image tower, got {type(model).__name__}"
                f" (visual: {type(getattr(model, 'visual', None)).__name__})")
        for i, blk in enumerate(visual.transformer.resblocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
                raise UnsupportedModelError(
                    f"open_clip block {i} ({type(blk).__name__}) does not use a standard nn.MultiheadAttention; "
                    f"custom/scaled-cosine attention blocks are not supported")
            if hasattr(blk, "ln_1_kv"):
                raise UnsupportedModelError(f"open_clip block {i} is a cross-attention block")
        if getattr(visual, "attn_pool", None) is not None:
            raise UnsupportedModelError("open_clip towers with attentional pooling are not supported")
        self.model = model
        self.visual = visual
        self.num_blocks = len(visual.transformer.resblocks)
        self.num_heads = visual.transformer.resblocks[0].attn.num_heads
        self.num_prefix_tokens = 1
        self.embed_dim = visual.conv1.out_channels
        self.name = getattr(model, "ultra_fast_name", None) or "open_clip." + type(visual).__name__

    @property
    def preprocessing(self) -> Preprocessing:
        cfg = getattr(self.visual, "preprocess_cfg", {}) or {}
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        return Preprocessing(mean=tuple(cfg.get("mean", OPENAI_DATASET_MEAN)),
                             std=tuple(cfg.get("std", OPENAI_DATASET_STD)),
                             input_size=tuple(self.visual.image_size),
                             patch_size=tuple(self.visual.patch_size),
                             interpolation=cfg.get("interpolation", "bicubic"))

    def grid_size(self, images: torch.Tensor) -> Tuple[int, int]:
        return patch_grid(images, tuple(self.visual.patch_size), self.name)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        grid = self.grid_size(images)
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resample_pos_embed(v.positional_embedding.unsqueeze(0), grid, tuple(v.grid_size), 1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return v.ln_pre(x)

    def block(self, index: int, x: torch.Tensor):
        blk = self.visual.transformer.resblocks[index]
        mha: nn.MultiheadAttention = blk.attn
        head_dim = mha.embed_dim // mha.num_heads
        out, attn = explicit_attention(blk.ln_1(x), mha.in_proj_weight, mha.in_proj_bias,
                                       mha.num_heads, head_dim ** -0.5)
        x = x + blk.ls_1(mha.out_proj(out))
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        return x, attn

    def block_spec(self, index: int):
        blk = self.visual.transformer.resblocks[index]
        mha, mlp = blk.attn, blk.mlp
        ok1, ls1 = layer_scale(blk.ls_1)
        ok2, ls2 = layer_scale(blk.ls_2)
        if not (ok1 and ok2 and all(isinstance(n, nn.LayerNorm) for n in (blk.ln_1, blk.ln_2))
                and all(hasattr(mlp, n) for n in ("c_fc", "gelu", "c_proj")) and len(mlp) == 3):
            return None
        return PreNormBlock(
            blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps, mha.in_proj_weight, mha.in_proj_bias, mha.num_heads,
            (mha.embed_dim // mha.num_heads) ** -0.5, mha.out_proj.weight, mha.out_proj.bias, ls1,
            blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps, mlp.c_fc.weight, mlp.c_fc.bias, mlp.gelu,
            mlp.c_proj.weight, mlp.c_proj.bias, ls2)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.visual._pool(z)
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled
