"""Adapter for timm ``VisionTransformer`` models: CLIP, DINO, DINOv2 (with and without registers), DeiT..."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ._common import dynamic, patch_grid, resample_pos_embed
from .base import Adapter, Preprocessing, UnsupportedModelError, explicit_attention, layer_scale
from .block_spec import PreNormBlock

_BLOCK_PARTS = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")
_ATTN_PARTS = ("qkv", "num_heads", "scale", "q_norm", "k_norm", "proj")


def is_timm_vit(model: nn.Module) -> bool:
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(model, VisionTransformer)


class TimmViTAdapter(Adapter):
    """Runs a timm ``VisionTransformer`` block by block with explicit attention probabilities.

    Any input size the patch embedding tiles is accepted, non-square included: the absolute
    position embedding is resampled the way timm's ``dynamic_img_size`` does it.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not is_timm_vit(model):
            raise UnsupportedModelError(f"expected a timm VisionTransformer, got {type(model).__name__}")
        vit = dynamic(model)
        for i, blk in enumerate(vit.blocks):
            missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)]
            missing += [f"attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(blk, "attn", None), p)]
            if missing:
                raise UnsupportedModelError(
                    f"timm block {i} ({type(blk).__name__}) lacks {', '.join(missing)}: only pre-norm "
                    f"ViT blocks with a fused qkv projection are supported")
            if getattr(blk.attn, "gate", None) is not None:
                raise UnsupportedModelError(f"timm block {i}: gated attention is not supported")
        if vit.pos_embed is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no absolute position embedding (RoPE ViTs are not supported)")
        if not isinstance(vit.patch_embed.proj, nn.Conv2d):
            raise UnsupportedModelError("timm patch embedding without a Conv2d projection is not supported")
        self.model = model
        self.num_blocks = len(vit.blocks)
        self.num_heads = vit.blocks[0].attn.num_heads
        self.num_prefix_tokens = vit.num_prefix_tokens
        self.embed_dim = vit.embed_dim
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.name = getattr(model, "ultra_fast_name", None) or cfg.get("architecture") or type(model).__name__
        if cfg.get("tag"):
            self.name = f"{self.name}.{cfg['tag']}"

    @property
    def preprocessing(self) -> Preprocessing:
        from timm.data import resolve_data_config
        cfg = resolve_data_config({}, model=self.model)
        return Preprocessing(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                             input_size=tuple(cfg["input_size"][-2:]),
                             patch_size=tuple(dynamic(self.model).patch_embed.patch_size),
                             interpolation=cfg.get("interpolation", "bicubic"))

    def grid_size(self, images: torch.Tensor) -> Tuple[int, int]:
        return patch_grid(images, tuple(dynamic(self.model).patch_embed.patch_size), self.name)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = dynamic(self.model)
        pe = m.patch_embed
        grid = self.grid_size(images)
        x = pe.proj(images).flatten(2).transpose(1, 2)
        x = pe.norm(x)
        pos = resample_pos_embed(m.pos_embed, grid, tuple(pe.grid_size),
                                 0 if m.no_embed_class else m.num_prefix_tokens)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        # Same order as timm's VisionTransformer._pos_embed.
        if m.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return m.norm_pre(x)

    def block(self, index: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        blk = dynamic(self.model).blocks[index]
        at = blk.attn
        h = blk.norm1(x)
        out, attn = explicit_attention(h, at.qkv.weight, at.qkv.bias, at.num_heads, at.scale,
                                       at.q_norm, at.k_norm)
        out = at.proj(getattr(at, "norm", nn.Identity())(out))
        x = x + blk.ls1(out)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        return x, attn

    def head(self, z: torch.Tensor) -> torch.Tensor:
        m = dynamic(self.model)
        return m.forward_head(m.norm(z))

    def block_spec(self, index: int) -> Optional[PreNormBlock]:
        blk = dynamic(self.model).blocks[index]
        at, mlp = blk.attn, blk.mlp
        ok1, ls1 = layer_scale(blk.ls1)
        ok2, ls2 = layer_scale(blk.ls2)
        plain = all(isinstance(getattr(at, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
        plain &= all(type(n) is nn.LayerNorm or type(n).__name__ == "LayerNorm" for n in (blk.norm1, blk.norm2))
        plain &= all(hasattr(mlp, n) for n in ("fc1", "act", "fc2"))
        plain &= isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
        if not (ok1 and ok2 and plain and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)):
            return None
        return PreNormBlock(
            blk.norm1.weight, blk.norm1.bias, blk.norm1.eps, at.qkv.weight, at.qkv.bias, at.num_heads, at.scale,
            at.proj.weight, at.proj.bias, ls1, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps,
            mlp.fc1.weight, mlp.fc1.bias, mlp.act, mlp.fc2.weight, mlp.fc2.bias, ls2)
