"""The attention arithmetic the Hugging Face text adapters share: masks, softmax precision, rotary halves.

The softmax is computed in ``max(dtype, float32)``. For float32 / half / bfloat16 models this is
exactly what ``transformers`` does (upcast to float32, cast back); for float64 models, where
``transformers`` would round through float32, it stays in float64 so that float64 runs are exact (what
the float64 exactness tests rely on).
"""
from __future__ import annotations

import torch


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax and RMS norms are computed in: float64 for float64 models, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(n: int, device, dtype) -> torch.Tensor:
    """(N, N) additive mask: 0 on and below the diagonal, the dtype's minimum above (as ``transformers``)."""
    keep = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) in max(dtype, float32), cast back: (B, H, N, N), in the graph."""
    ct = softmax_dtype(q.dtype)
    scores = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * scale
    if causal:
        scores = scores + causal_mask(scores.shape[-1], scores.device, ct)
    return scores.softmax(dim=-1).to(q.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the two halves of the head dimension: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


__all__ = ["softmax_dtype", "causal_mask", "attention_probs", "rotate_half"]
