"""Pure-PyTorch reference implementations of the three native ops.

These are the oracles the C++/CUDA kernels are tested against, and the ``backend="torch"`` path
of the engine. Layouts (B images, T targets, H heads, N tokens):

- ``A``: (B, H, N, N) attention probabilities of one block.
- ``G``: (B, T, H, N, N) gradients dF_t/dA of the same block, one per target.
- ``v``: (B, T, N) rollout row vectors; ``P``: (B, T, N, N) paper-order running products.
"""
from __future__ import annotations

from typing import Optional

import torch


def contribution(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``mean_h(relu(G_h) * A_h)`` -> (B, T, N, N). The clamp is per head, before the mean."""
    return (G.clamp(min=0) * A.unsqueeze(1)).mean(dim=2)


def rollout_step(v: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``v + v @ contribution(G, A)``: one block of the rollout-order chain, streamed as rows."""
    return v + torch.einsum("btn,btnm->btm", v, contribution(G, A))


def paper_step(P: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``(I + contribution(G, A)) @ P``: one block of the paper-order chain (earliest block leftmost)."""
    return P + contribution(G, A) @ P


def softmax_backward_(grad: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """In place: grad (..., T, R, M) <- attn * (grad - rowsum(grad * attn)), attn (..., R, M)."""
    a = attn.unsqueeze(-3)
    # The row sums stay float32 under a bfloat16/float16 backward (as the native kernels' accumulators).
    acc = torch.promote_types(grad.dtype, torch.float32)
    return grad.sub_((grad * a).sum(-1, keepdim=True, dtype=acc)).mul_(a)


def layer_norm_backward_(grad: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor,
                         residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In place: rstd * (grad - mean(grad) - xhat * mean(grad * xhat)) + residual; grad already carries
    the LayerNorm weight; xhat (and rstd, one per xhat row) repeat over grad's extra leading dims.
    rstd may be float32 for a bfloat16/float16 grad."""
    rstd = rstd.reshape(xhat.shape[:-1] + (1,))
    acc = torch.promote_types(grad.dtype, torch.float32)  # float32 means under a bf16/fp16 backward
    m1 = grad.mean(-1, keepdim=True, dtype=acc)
    m2 = (grad * xhat).mean(-1, keepdim=True, dtype=acc)
    out = grad.sub_(m1).sub_(xhat * m2).mul_(rstd)
    return out if residual is None else out.add_(residual)
