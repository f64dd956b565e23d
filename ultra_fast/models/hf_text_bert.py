"""Adapter for BERT-family encoders (``bert`` and BERT-shaped ``roberta``/``xlm-roberta``/``electra``):
post-LayerNorm blocks ``x1 = LN(x + attn(x))``, ``x2 = LN(x1 + mlp(x1))`` through the model's own
``attention.output`` and ``output`` modules; no mask (causal when ``config.is_decoder``)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Tuple

import torch
from torch import nn

from ._common import dynamic
from .base import UnsupportedModelError
from .hf_text_attention import attention_probs
from .hf_text_base import HFTextAdapter


class BertTextAdapter(HFTextAdapter):
    """BERT-family encoders: post-LayerNorm blocks, no mask (or causal when ``config.is_decoder``)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = dynamic(self.base)
        if not (hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer")):
            raise UnsupportedModelError(f"{type(base).__name__} lacks embeddings / encoder.layer: not BERT-shaped")
        pet = getattr(self.config, "position_embedding_type", "absolute")
        if pet not in (None, "absolute"):
            raise UnsupportedModelError(f"position_embedding_type={pet!r} is not supported (absolute only)")
        for i, layer in enumerate(base.encoder.layer):
            sa = getattr(getattr(layer, "attention", None), "self", None)
            missing = [f"attention.self.{p}" for p in ("query", "key", "value") if not hasattr(sa, p)]
            missing += [p for p in ("intermediate", "output") if not hasattr(layer, p)]
            if not hasattr(getattr(layer, "attention", None), "output"):
                missing.append("attention.output")
            if missing:
                raise UnsupportedModelError(f"BERT layer {i} lacks {', '.join(missing)}")
        self.num_blocks = len(base.encoder.layer)
        self.causal = bool(getattr(self.config, "is_decoder", False))
        self.head_dim = self.embed_dim // self.num_heads

    def embed(self, inputs) -> torch.Tensor:
        ids = self.input_ids(inputs)
        kw: Dict[str, torch.Tensor] = {}
        if isinstance(inputs, Mapping) and inputs.get("token_type_ids") is not None:
            tt = torch.as_tensor(inputs["token_type_ids"])
            kw["token_type_ids"] = (tt.unsqueeze(0) if tt.dim() == 1 else tt).to(ids.device)
        return dynamic(self.base).embeddings(input_ids=ids, **kw)

    def block(self, index: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        layer = dynamic(self.base).encoder.layer[index]
        sa = layer.attention.self
        B, N, _ = x.shape
        q, k, v = (m(x).view(B, N, -1, self.head_dim).transpose(1, 2) for m in (sa.query, sa.key, sa.value))
        scale = float(getattr(sa, "scaling", self.head_dim ** -0.5))
        attn = attention_probs(q, k, scale, causal=self.causal)
        ctx = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x1 = layer.attention.output(ctx, x)
        x2 = layer.output(layer.intermediate(x1), x1)
        return x2, attn


__all__ = ["BertTextAdapter"]
