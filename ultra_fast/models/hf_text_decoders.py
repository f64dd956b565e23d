"""Adapters for Hugging Face decoder language models: the Llama family (pre-RMSNorm, RoPE, grouped KV heads)
and GPT-2 (learned positions, pre-LayerNorm, fused ``c_attn``). Causal attention, computed explicitly."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import InputError
from ._common import dynamic
from .base import UnsupportedModelError
from .hf_text_attention import attention_probs, rotate_half, softmax_dtype
from .hf_text_base import HFTextAdapter, require_block_parts, require_parts

#: RMSNorm classes whose formula the adapter computes itself (in max(dtype, float32), see hf_text_attention).
PLAIN_RMS_NORMS = tuple(f"{p}RMSNorm" for p in ("Llama", "Mistral", "Qwen2", "Qwen3"))


class LlamaTextAdapter(HFTextAdapter):
    """Llama-family decoders (Llama, SmolLM2, Mistral, Qwen2, Qwen3): pre-RMSNorm blocks, RoPE, GQA."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = dynamic(self.base)
        require_parts(base, ("embed_tokens", "layers", "norm", "rotary_emb"), "Llama-shaped")
        require_block_parts(base.layers, ("input_layernorm", "post_attention_layernorm", "mlp"), "self_attn",
                            ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim"), "decoder layer")
        cfg = self.config
        self.num_blocks = len(base.layers)
        self.head_dim = int(base.layers[0].self_attn.head_dim)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads")

    def _window(self, index: int) -> Optional[int]:
        cfg = self.config
        types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        if types is not None:
            return window if types[index] == "sliding_attention" else None
        if cfg.model_type == "mistral":
            return window
        return window if getattr(cfg, "use_sliding_window", False) else None

    def _norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if type(module).__name__ in PLAIN_RMS_NORMS and hasattr(module, "variance_epsilon"):
            # The transformers formula, computed in max(dtype, float32) (identical for float32 and below).
            h = x.to(softmax_dtype(x.dtype))
            norm = dynamic(module)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            return norm.weight * h.to(x.dtype)
        return module(x)

    def embed(self, inputs) -> torch.Tensor:
        return dynamic(self.base).embed_tokens(self.input_ids(inputs))

    def _rope(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        cos, sin = dynamic(self.base).rotary_emb(x, position_ids=pos)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def block(self, index: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        layer = dynamic(self.base).layers[index]
        at = layer.self_attn
        B, N, _ = x.shape
        window = self._window(index)
        if window is not None and N > window:
            raise InputError(f"layer {index} of {self.name} uses sliding-window attention ({window} tokens); "
                             f"sequences longer than the window ({N}) are not supported")
        h = self._norm(layer.input_layernorm, x)
        shape = (B, N, -1, self.head_dim)
        q, k, v = at.q_proj(h).view(shape), at.k_proj(h).view(shape), at.v_proj(h).view(shape)
        if getattr(at, "q_norm", None) is not None:  # Qwen3: RMSNorm over the head dimension
            q, k = self._norm(at.q_norm, q), self._norm(at.k_norm, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = self._rope(x)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn = attention_probs(q, k, at.scaling, causal=True)
        out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + at.o_proj(out)
        x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        return x, attn

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self._norm(dynamic(self.base).norm, z)


class GPT2TextAdapter(HFTextAdapter):
    """GPT-2 family decoders: learned positions, pre-LayerNorm blocks, fused ``c_attn`` (Conv1D)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        base = dynamic(self.base)
        require_parts(base, ("wte", "wpe", "h", "ln_f"), "GPT-2-shaped")
        require_block_parts(base.h, ("ln_1", "attn", "ln_2", "mlp"), "attn",
                            ("c_attn", "c_proj", "split_size", "head_dim"), "GPT-2 block")
        self.num_blocks = len(base.h)

    def embed(self, inputs) -> torch.Tensor:
        ids = self.input_ids(inputs)
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        base = dynamic(self.base)
        x = base.wte(ids) + base.wpe(pos)
        return base.drop(x)

    def _scale(self, attention: nn.Module) -> float:
        at = dynamic(attention)
        if hasattr(at, "scaling"):
            return float(at.scaling)
        s = at.head_dim ** -0.5 if getattr(at, "scale_attn_weights", True) else 1.0
        if getattr(at, "scale_attn_by_inverse_layer_idx", False):
            s /= float(at.layer_idx + 1)
        return s

    def block(self, index: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        blk = dynamic(self.base).h[index]
        at = blk.attn
        B, N, _ = x.shape
        h = blk.ln_1(x)
        q, k, v = at.c_attn(h).split(at.split_size, dim=2)
        q, k, v = (t.view(B, N, -1, at.head_dim).transpose(1, 2) for t in (q, k, v))
        attn = attention_probs(q, k, self._scale(at), causal=True)
        out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + at.resid_dropout(at.c_proj(out))
        x = x + blk.mlp(blk.ln_2(x))
        return x, attn

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return dynamic(self.base).ln_f(z)


__all__ = ["LlamaTextAdapter", "GPT2TextAdapter", "PLAIN_RMS_NORMS"]
