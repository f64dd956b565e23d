"""A hand-written batched backward through one pre-norm ViT block (SPEC §3).

``torch.autograd.grad(..., is_grads_batched=True)`` runs the backward under vmap, and several of
its kernels (GELU, LayerNorm and softmax backward) have no batching rule: vmap then loops over the
targets one by one. Written out by hand, every step is a broadcast over the target dimension and
the large products are single matrix multiplies over all targets at once.

The block (timm ``Block`` and open_clip ``ResidualAttentionBlock`` both have this form)::

    x1 = x  + ls1 * proj(attn(LN1(x)))
    x2 = x1 + ls2 * fc2(act(fc1(LN2(x1))))

Adapters describe their blocks with ``PreNormBlock``; blocks that differ (q/k norms, a norm
after attention, an MLP norm) return None and the engine uses autograd instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F


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


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    return xhat * weight + bias, xhat, rstd


def _layer_norm_backward(g: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor):
    gx = g * weight
    return rstd * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))


def _merge_heads(*grads: torch.Tensor) -> torch.Tensor:
    """(T, B, H, N, dh) gradients of consecutive qkv parts -> (T, B, N, parts*H*dh), the qkv column layout."""
    T, B, _, N, _ = grads[0].shape
    return torch.stack(grads, dim=3).permute(0, 1, 4, 3, 2, 5).reshape(T, B, N, -1)


def _scaled(g: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
    return g if gamma is None else g * gamma


@torch.no_grad()
def block_forward(p: PreNormBlock, x: torch.Tensor) -> Tuple[torch.Tensor, dict]:
    """The block's attention probabilities (B, H, N, N) and what its backward needs."""
    B, N, D = x.shape
    H = p.num_heads
    h1, xhat1, rstd1 = _layer_norm(x, p.ln1_weight, p.ln1_bias, p.ln1_eps)
    q, k, v = F.linear(h1, p.qkv_weight, p.qkv_bias).view(B, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((q * p.scale) @ k.transpose(-2, -1)).softmax(-1)
    o = (attn @ v).transpose(1, 2).reshape(B, N, -1)
    x1 = x + _scaled(F.linear(o, p.proj_weight, p.proj_bias), p.ls1)
    h2, xhat2, rstd2 = _layer_norm(x1, p.ln2_weight, p.ln2_bias, p.ln2_eps)
    u = F.linear(h2, p.fc1_weight, p.fc1_bias)
    with torch.enable_grad():  # the activation's derivative, whatever elementwise activation it is
        u_ = u.detach().requires_grad_(True)
        (dact,) = torch.autograd.grad(p.act(u_).sum(), u_)
    saved = dict(xhat1=xhat1, rstd1=rstd1, q=q, k=k, v=v, xhat2=xhat2, rstd2=rstd2, dact=dact)
    return attn, saved


@torch.no_grad()
def block_backward(p: PreNormBlock, attn: torch.Tensor, saved: dict, g: torch.Tensor,
                   need_input_grad: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Batched vector-Jacobian product of the block for T cotangents at once.

    Args:
        g: (T, B, N, D) cotangents of the block output.
    Returns:
        G: (T, B, H, N, N) gradients with respect to the attention probabilities;
        the (T, B, N, D) cotangents of the block input (None unless ``need_input_grad``).
    """
    T, B, N, D = g.shape
    H = p.num_heads
    q, k, v = saved["q"], saved["k"], saved["v"]
    # MLP branch.
    gu = F.linear(_scaled(g, p.ls2), p.fc2_weight.t()) * saved["dact"]
    gx1 = g + _layer_norm_backward(F.linear(gu, p.fc1_weight.t()), saved["xhat2"], saved["rstd2"], p.ln2_weight)
    del gu
    # Attention branch: the gradient with respect to A is what ULTra consumes.
    go = F.linear(_scaled(gx1, p.ls1), p.proj_weight.t()).view(T, B, N, H, -1).transpose(2, 3)
    G = go @ v.transpose(-2, -1)
    if not need_input_grad:
        return G, None
    gv = attn.transpose(-2, -1) @ go
    del go
    gs = attn * (G - (G * attn).sum(-1, keepdim=True))
    gq = (gs @ k) * p.scale
    gk = (gs.transpose(-2, -1) @ q) * p.scale
    del gs
    gqkv = _merge_heads(gq, gk, gv)
    del gq, gk, gv
    gh1 = F.linear(gqkv, p.qkv_weight.t())
    del gqkv
    gx = gx1 + _layer_norm_backward(gh1, saved["xhat1"], saved["rstd1"], p.ln1_weight)
    return G, gx


@torch.no_grad()
def block_backward_one_row(p: PreNormBlock, attn: torch.Tensor, saved: dict, g_row: torch.Tensor,
                           idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``block_backward`` for cotangents that are non-zero in one row only: the explained block itself.

    Target t of image b has its cotangent ``g_row[t, b]`` at row ``idx[b, t]``. Everything before
    the attention mixes rows (the MLP, the output projection, the query path, the gradient of A)
    then runs on that one row instead of all N, which removes most of this block's work.
    """
    T, B, D = g_row.shape
    H = p.num_heads
    q, k, v = saved["q"], saved["k"], saved["v"]
    N = q.shape[-2]
    ti = torch.arange(T, device=idx.device).unsqueeze(1).expand(T, B)
    bi = torch.arange(B, device=idx.device).unsqueeze(0).expand(T, B)
    tok = idx.t()  # (T, B)
    at = lambda name: saved[name][bi, tok]  # noqa: E731  (T, B, ...) values of a saved (B, N, ...) tensor

    gu = F.linear(_scaled(g_row, p.ls2), p.fc2_weight.t()) * at("dact")
    gx1 = g_row + _layer_norm_backward(F.linear(gu, p.fc1_weight.t()), at("xhat2"), at("rstd2"), p.ln2_weight)
    go = F.linear(_scaled(gx1, p.ls1), p.proj_weight.t()).view(T, B, H, 1, -1)  # (T, B, H, 1, dh)
    g_attn_row = (go @ v.transpose(-2, -1)).squeeze(-2)  # (T, B, H, N): row idx of dF/dA
    a_row = attn[bi, :, tok]  # (T, B, H, N)
    q_row = q.permute(0, 2, 1, 3)[bi, tok]  # (T, B, H, dh)
    gs_row = a_row * (g_attn_row - (g_attn_row * a_row).sum(-1, keepdim=True))
    gq_row = (gs_row.unsqueeze(-2) @ k).squeeze(-2) * p.scale  # (T, B, H, dh)
    gk = gs_row.unsqueeze(-1) * q_row.unsqueeze(-2) * p.scale  # (T, B, H, N, dh)
    gv = a_row.unsqueeze(-1) * go  # (T, B, H, N, dh)
    # Dense outputs: G is zero outside row idx; the input cotangent is dense through k and v.
    G = g_attn_row.new_zeros(T, B, H, N, N)
    G[ti, bi, :, tok] = g_attn_row
    width = p.qkv_weight.shape[0] // 3  # qkv rows: [q | k | v], each H*dh wide
    gkv = _merge_heads(gk, gv)
    gh1 = F.linear(gkv, p.qkv_weight[width:].t())
    gh1[ti, bi, tok] += F.linear(gq_row.reshape(T, B, -1), p.qkv_weight[:width].t())
    gx = _layer_norm_backward(gh1, saved["xhat1"], saved["rstd1"], p.ln1_weight)
    gx[ti, bi, tok] += gx1
    return G, gx
