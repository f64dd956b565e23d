"""A hand-written batched backward through one pre-norm ViT block (docs/method.md §3).

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

from dataclasses import dataclass, fields, replace
from types import ModuleType
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..models.block_spec import PreNormBlock
from . import reference_ops


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    return xhat * weight + bias, xhat, rstd


def _fold_columns(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``weight`` (out, in) with column j times ``scale[j]``: x @ (W * s) == (x @ W) * s, one pass over W
    instead of one over the (T, B, N, in) activations."""
    return weight if scale is None else weight * scale


def _fold_rows(weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``weight`` (out, in) with row i times ``scale[i]``: (x * s) @ W == x @ (s[:, None] * W)."""
    return weight if scale is None else weight * scale[:, None]


def _merge_heads(*grads: torch.Tensor) -> torch.Tensor:
    """(T, B, H, N, dh) gradients of consecutive qkv parts -> (T, B, N, parts*H*dh), the qkv column layout."""
    T, B, _, N, _ = grads[0].shape
    return torch.stack(grads, dim=3).permute(0, 1, 4, 3, 2, 5).reshape(T, B, N, -1)


def _scaled(g: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
    return g if gamma is None else g * gamma


@dataclass
class LowRankCotangent:
    """T cotangents (T, B, N, D) held as ``u @ p - w * xhat``: what leaves the explained block.

    Before its LayerNorm, the explained block's input cotangent of one target is a sum of 2H+1 outer
    products: per head, the k path (softmax-backward row ⊗ the target's query) and the v path
    (attention row ⊗ the target's output cotangent), plus the target's own row. The LayerNorm backward
    adds one rank-one term (the row means) and a per-row multiple of the normalised input ``xhat``. The
    block below starts with fc2's transposed product, which then costs r·D·M + N·r·M per target
    instead of N·D·M (``matmul``).

    The factors stay in float32 (or float64) under a lower ``compute_dtype``: the form subtracts terms
    that the dense LayerNorm backward subtracts before rounding, and rounding them to bf16 first cost
    0.2 points of same-segment pixels against fp32 (``benchmarks/bf16_agreement.py``: 98.0 % vs 98.2 %).
    """
    u: torch.Tensor  # (T, B, N, r)
    p: torch.Tensor  # (T, B, r, D)
    w: torch.Tensor  # (T, B, N, 1)
    xhat: torch.Tensor  # (B, N, D), shared by the targets

    def dense(self) -> torch.Tensor:
        return torch.matmul(self.u, self.p).addcmul_(self.w, self.xhat, value=-1)

    def matmul(self, weight: torch.Tensor) -> torch.Tensor:
        """``self.dense() @ weight`` for a (D, M) weight, without the dense (T, B, N, D) product; computed
        in the factors' dtype, returned in the weight's."""
        w = weight.to(self.p.dtype)
        out = torch.matmul(self.u, torch.matmul(self.p, w)).addcmul_(self.w, torch.matmul(self.xhat, w), value=-1)
        return out.to(weight.dtype)


def low_rank_pays(num_tokens: int, num_heads: int) -> bool:
    """Whether the explained block hands a ``LowRankCotangent`` (rank 2H+2) down rather than a dense one."""
    return 2 * num_heads + 2 < num_tokens


def _layer_norm_backward_low_rank(u: torch.Tensor, pm: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor,
                                  residual_row: torch.Tensor) -> LowRankCotangent:
    """``layer_norm_backward_(u @ pm, xhat, rstd) + row ⊗ residual_row`` kept in factored form, rank r + 1.

    u (T, B, N, r) @ pm (T, B, r, D) is the cotangent of the LayerNorm output (weight folded in); u's
    last column is one-hot at each target's own row, which also carries ``residual_row`` (T, B, D):
    the two merge into one factor."""
    D = pm.shape[-1]
    mean = torch.matmul(u, pm.mean(-1, keepdim=True))  # (T, B, N, 1): mean over D of each row
    # mean over D of (u @ pm) * xhat, row by row: u · (xhat pmᵀ), with xhat shared by all targets
    proj = torch.einsum("bnd,tbrd->tbnr", xhat, pm)
    mean_x = (u * proj).sum(-1, keepdim=True).div_(D)
    rstd = rstd.reshape(xhat.shape[:-1] + (1,))
    row = u[..., -1:]
    rstd_row = (row * rstd).sum(-2, keepdim=True)  # (T, B, 1, 1): rstd at the target's row
    u2 = torch.cat([u[..., :-1] * rstd, mean.mul_(rstd).neg_(), row], -1)
    p2 = torch.cat([pm[..., :-1, :], pm.new_ones(pm.shape[:-2] + (1, D)),
                    pm[..., -1:, :] * rstd_row + residual_row.unsqueeze(-2)], -2)
    return LowRankCotangent(u2, p2, mean_x.mul_(rstd), xhat)


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


ConsumeG = Callable[[torch.Tensor, torch.Tensor], None]


def cast_block(p: PreNormBlock, attn: torch.Tensor, saved: dict, dtype: torch.dtype):
    """The block's weights, attention and saved forward values in ``dtype``, for a lower-precision
    backward from a forward computed at full precision (``explain(compute_dtype=...)``).

    The LayerNorm statistics (``rstd*``) stay float32: a bf16 rstd would scale each row's cotangent by
    up to 2^-8 off, and they are one number per row, so keeping them costs nothing."""
    cast = {f.name: getattr(p, f.name).to(dtype) for f in fields(p) if isinstance(getattr(p, f.name), torch.Tensor)}
    stats = torch.promote_types(dtype, torch.float32)
    kept = {k: v.to(stats if k.startswith("rstd") else dtype) for k, v in saved.items()}
    return replace(p, **cast), attn.to(dtype), kept


@torch.no_grad()
def block_backward(p: PreNormBlock, attn: torch.Tensor, saved: dict, g: Union[torch.Tensor, LowRankCotangent],
                   consume_G: ConsumeG, need_input_grad: bool = True,
                   ops: ModuleType = reference_ops) -> Optional[torch.Tensor]:
    """Batched vector-Jacobian product of the block for T cotangents at once.

    Args:
        g: (T, B, N, D) cotangents of the block output, dense or as a ``LowRankCotangent``.
        consume_G: called once with G (T, B, H, N, N) = dF/dA (a strided view) and A (B, H, N, N);
            G's memory is reused for the softmax backward afterwards, so it must be used there.
        ops: who runs the fused softmax / LayerNorm backward (``ultra_fast.ops`` or ``reference_ops``).
    Returns:
        the (T, B, N, D) cotangents of the block input (None unless ``need_input_grad``).

    The attention-internal products run with the targets inside the row dimension, (B, H, T*N, .):
    one large matrix product per head against the shared q, k, v instead of T*H small ones.
    """
    # MLP branch; layer scale and LayerNorm weight are folded into the weights (see _fold_*).
    if isinstance(g, LowRankCotangent):
        gu = g.matmul(_fold_rows(p.fc2_weight, p.ls2))
        g = g.dense().to(gu.dtype)  # the residual path needs it whole
    else:
        gu = F.linear(g, _fold_rows(p.fc2_weight, p.ls2).t())
    gu.mul_(saved["dact"])
    T, B, N, D = g.shape
    H = p.num_heads
    dh = D // H
    q, k, v = saved["q"], saved["k"], saved["v"]
    gx1 = ops.layer_norm_backward_(F.linear(gu, _fold_columns(p.fc1_weight, p.ln2_weight).t()), saved["xhat2"],
                                   saved["rstd2"], g)
    del gu
    # Attention branch: the gradient with respect to A is what ULTra consumes.
    go = F.linear(gx1, _fold_rows(p.proj_weight, p.ls1).t()).view(T, B, N, H, dh)
    go = go.permute(1, 3, 0, 2, 4).contiguous()  # (B, H, T, N, dh)
    G = torch.matmul(go.view(B, H, T * N, dh), v.transpose(-2, -1)).view(B, H, T, N, N)
    consume_G(G.permute(2, 0, 1, 3, 4), attn)
    if not need_input_grad:
        return None
    # gv[t] = A^T go[t] for all t at once: (N, N) @ (N, T*dh) per head.
    go_n = go.transpose(2, 3).contiguous().view(B, H, N, T * dh)
    del go
    gv = torch.matmul(attn.transpose(-2, -1), go_n).view(B, H, N, T, dh)
    del go_n
    gs = ops.softmax_backward_(G, attn)
    gq = torch.matmul(gs.view(B, H, T * N, N), k * p.scale).view(B, H, T, N, dh)
    gk = torch.matmul(gs.transpose(-2, -1), (q * p.scale).unsqueeze(2))  # (B, H, T, N, dh)
    del gs, G
    # The qkv input columns are [q | k | v], each (head, dh): write the three parts into that layout.
    gqkv = g.new_empty(T, B, N, 3, H, dh)
    gqkv[:, :, :, 0].copy_(gq.permute(2, 0, 3, 1, 4))
    gqkv[:, :, :, 1].copy_(gk.permute(2, 0, 3, 1, 4))
    gqkv[:, :, :, 2].copy_(gv.permute(3, 0, 2, 1, 4))
    del gq, gk, gv
    gh1 = F.linear(gqkv.view(T, B, N, 3 * D), _fold_columns(p.qkv_weight, p.ln1_weight).t())
    del gqkv
    return ops.layer_norm_backward_(gh1, saved["xhat1"], saved["rstd1"], gx1)


@torch.no_grad()
def block_backward_one_row(p: PreNormBlock, attn: torch.Tensor, saved: dict, g_row: torch.Tensor,
                           idx: torch.Tensor, consume_G: ConsumeG, need_input_grad: bool = True,
                           ops: ModuleType = reference_ops) -> Union[torch.Tensor, LowRankCotangent, None]:
    """``block_backward`` for cotangents that are non-zero in one row only: the explained block itself.

    Target t of image b has its cotangent ``g_row[t, b]`` at row ``idx[b, t]``. Everything before
    the attention mixes rows (the MLP, the output projection, the query path, the gradient of A)
    then runs on that one row instead of all N, which removes most of this block's work. The input
    cotangent leaves as a ``LowRankCotangent`` where that is cheaper (``low_rank_pays``), else dense.
    """
    T, B, D = g_row.shape
    H = p.num_heads
    q, k, v = saved["q"], saved["k"], saved["v"]
    N = q.shape[-2]
    ti = torch.arange(T, device=idx.device).unsqueeze(1).expand(T, B)
    bi = torch.arange(B, device=idx.device).unsqueeze(0).expand(T, B)
    tok = idx.t()  # (T, B)
    at = lambda name: saved[name][bi, tok]  # noqa: E731  (T, B, ...) values of a saved (B, N, ...) tensor

    gu = F.linear(g_row, _fold_rows(p.fc2_weight, p.ls2).t()) * at("dact")
    gx1 = ops.layer_norm_backward_(F.linear(gu, _fold_columns(p.fc1_weight, p.ln2_weight).t()), at("xhat2"),
                                   at("rstd2"), g_row)
    go = F.linear(gx1, _fold_rows(p.proj_weight, p.ls1).t()).view(T, B, H, 1, -1)  # (T, B, H, 1, dh)
    g_attn_row = (go @ v.transpose(-2, -1)).squeeze(-2)  # (T, B, H, N): row idx of dF/dA
    # Dense output: G is zero outside row idx.
    G = g_attn_row.new_zeros(T, B, H, N, N)
    G[ti, bi, :, tok] = g_attn_row
    consume_G(G, attn)
    del G
    if not need_input_grad:
        return None
    a_row = attn[bi, :, tok]  # (T, B, H, N)
    q_row = q.permute(0, 2, 1, 3)[bi, tok]  # (T, B, H, dh)
    gs_row = a_row * (g_attn_row - (g_attn_row * a_row).sum(-1, keepdim=True))
    gq_row = (gs_row.unsqueeze(-2) @ k).squeeze(-2) * p.scale  # (T, B, H, dh)
    w_qkv = _fold_columns(p.qkv_weight, p.ln1_weight)  # rows [q | k | v], each (H, dh)
    w_q, w_k, w_v = w_qkv.view(3, H, -1, D).unbind(0)  # (H, dh, D) each
    gh1_row = F.linear(gq_row.reshape(T, B, -1), w_q.reshape(-1, D).t())  # the query path: row idx only
    if low_rank_pays(N, H):
        # The k and v cotangents are one outer product per head (gs_row ⊗ q_row, a_row ⊗ go): keep the
        # input cotangent factored through the qkv weight and the LayerNorm (LowRankCotangent).
        acc = torch.promote_types(g_row.dtype, torch.float32)  # see LowRankCotangent
        pk = torch.einsum("tbhd,hdD->tbhD", q_row * p.scale, w_k)
        pv = torch.einsum("tbhd,hdD->tbhD", go.squeeze(-2), w_v)
        row = F.one_hot(tok, N).to(acc).unsqueeze(-1)  # (T, B, N, 1)
        u = torch.cat([gs_row.transpose(-2, -1).to(acc), a_row.transpose(-2, -1).to(acc), row], -1)
        pm = torch.cat([pk, pv, gh1_row.unsqueeze(-2)], -2).to(acc)
        return _layer_norm_backward_low_rank(u, pm, saved["xhat1"].to(acc), saved["rstd1"].to(acc), gx1.to(acc))
    # Few tokens: the dense cotangent is the cheaper form.
    gk = gs_row.unsqueeze(-1) * q_row.unsqueeze(-2) * p.scale  # (T, B, H, N, dh)
    gv = a_row.unsqueeze(-1) * go  # (T, B, H, N, dh)
    gh1 = F.linear(_merge_heads(gk, gv), w_qkv[w_qkv.shape[0] // 3:].t())  # the k and v rows
    gh1[ti, bi, tok] += gh1_row
    gx = ops.layer_norm_backward_(gh1, saved["xhat1"], saved["rstd1"])
    gx[ti, bi, tok] += gx1
    return gx
