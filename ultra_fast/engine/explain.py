"""The fast exact engine (docs/method.md §3): all targets back-propagated together, block by block."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..models import Adapter, TokenAdapter, wrap
from . import reference_ops
from .allocator import reuse_freed_memory
from .backend import get_ops
from .block_backward import (
    ConsumeG,
    LowRankCotangent,
    block_backward,
    block_backward_one_row,
    block_forward,
    cast_block,
)
from .config import ExplainConfig
from .maps import Size, finalize, resolve_size, upsample
from .options import (
    ComputeDtype,
    bytes_per_target,
    chunk_size,
    eval_mode,
    resolve_compute_dtype,
    resolve_layer,
    resolve_start,
)
from .scalars import LearnedScalar, ScalarFn, resolve_scalar, token_cotangents
from .targets import Targets, resolve_targets


def seed_cotangents(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(T, B, N, d) cotangents: target t of image b is dF/dz at row idx[b, t] and zero elsewhere."""
    B, N, d = rows.shape
    T = idx.shape[1]
    cot = rows.new_zeros(T, B, N, d)
    bi = torch.arange(B, device=rows.device).unsqueeze(0).expand(T, B)
    ti = torch.arange(T, device=rows.device).unsqueeze(1).expand(T, B)
    tok = idx.t()
    cot[ti, bi, tok] = rows[bi, tok]
    return cot


def block_vjp(adapter: TokenAdapter, index: int, x: torch.Tensor, g, need_input_grad: bool,
              consume_G: ConsumeG, backward: str = "auto", ops=reference_ops,
              compute_dtype: Optional[torch.dtype] = None) -> Union[torch.Tensor, LowRankCotangent, None]:
    """Recompute block ``index`` from its input and pull T cotangents (T, B, N, d) back through it.

    ``g`` is a dense (T, B, N, d) tensor or the ``LowRankCotangent`` the explained block hands down, or
    ``(rows (B, N, d), idx (B, T))`` for the explained block, where target t of image b starts from
    the single row ``idx[b, t]``. ``consume_G`` receives
    G (T, B, H, N, N) = dF/dA and A (B, H, N, N) once; G may be overwritten after it returns.
    ``compute_dtype`` (hand-written backward only): run the backward in this dtype, from a forward
    recomputed in the model's dtype. Returns the input cotangents, or None.
    """
    spec = adapter.block_spec(index) if backward in ("auto", "manual") else None
    if backward == "manual" and spec is None:
        raise ConfigError(f"backward='manual': block {index} of {adapter.name} is not a plain pre-norm ViT block")
    if spec is not None:
        A, saved = block_forward(spec, x)
        if compute_dtype is not None and compute_dtype != x.dtype:
            spec, A, saved = cast_block(spec, A, saved, compute_dtype)
            if isinstance(g, tuple):
                g = (g[0].to(compute_dtype), g[1])
            elif not isinstance(g, LowRankCotangent):  # its factors stay at full precision
                g = g.to(compute_dtype)
        if isinstance(g, tuple):
            rows, idx = g
            g_row = rows[torch.arange(rows.shape[0], device=idx.device).unsqueeze(0), idx.t()]
            return block_backward_one_row(spec, A, saved, g_row, idx, consume_G, need_input_grad, ops)
        return block_backward(spec, A, saved, g, consume_G, need_input_grad, ops)
    if isinstance(g, tuple):
        g = seed_cotangents(*g)
    elif isinstance(g, LowRankCotangent):
        g = g.dense()
    g = g.to(x.dtype)  # a block autograd must handle runs at full precision even under compute_dtype
    x = x.detach().requires_grad_(need_input_grad)
    with torch.enable_grad():
        out, attn = adapter.block(index, x)
        wrt = (attn, x) if need_input_grad else (attn,)
        grads = torch.autograd.grad(out, wrt, grad_outputs=g, is_grads_batched=True)
    consume_G(grads[0], attn.detach())
    return grads[1] if need_input_grad else None


def _step_takes_mixed(order: str, ops, state_dtype: torch.dtype) -> bool:
    """A lower-precision backward (compute_dtype) hands G and A over in its dtype; the chain state stays in
    the model's dtype. The native rollout step takes that mix (float32 state, bf16 G) directly; any other
    step gets G and A cast to the state's dtype (a full-precision copy of G, see ``bytes_per_target``)."""
    return order == "rollout" and ops is not reference_ops and state_dtype == torch.float32


def _explain_rows(adapter: TokenAdapter, saved, rows, idx, order, start_block, ops, backward,
                  compute_dtype=None) -> torch.Tensor:
    """S̄_i[i, :] for one chunk of targets: (B, T, N)."""
    B, N, _ = rows.shape
    T = idx.shape[1]
    eye_rows = torch.nn.functional.one_hot(idx, N).to(rows.dtype)  # (B, T, N)
    if order == "rollout":
        state = eye_rows
    else:
        state = torch.eye(N, dtype=rows.dtype, device=rows.device).expand(B, T, N, N).contiguous()
    step = ops.rollout_step if order == "rollout" else ops.paper_step

    mixed_ok = _step_takes_mixed(order, ops, rows.dtype)

    def consume(G: torch.Tensor, A: torch.Tensor) -> None:
        nonlocal state
        G = G.transpose(0, 1)  # (B, T, H, N, N) view; the ops take strides as they are
        if G.dtype != state.dtype and not mixed_ok:
            G, A = G.to(state.dtype), A.to(state.dtype)
        state = step(state, G, A)

    g: Any = (rows, idx)  # row-sparse until the explained block's attention has mixed the rows
    first = start_block - 1
    for k in range(len(saved) - 1, -1, -1):
        g = block_vjp(adapter, first + k, saved[k], g, k > 0, consume, backward, ops, compute_dtype)
    if order == "rollout":
        return state
    return torch.einsum("btn,btnm->btm", eye_rows, state)


def explain(
    model: Union[nn.Module, Adapter],
    images: torch.Tensor,
    layer: int = -1,
    scalar: Union[str, ScalarFn] = "sum",
    targets: Targets = "patches",
    order: str = "rollout",
    start_block: int = 1,
    size: Size = None,
    interpolation: str = "bilinear",
    self_max: bool = True,
    weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
    backward: str = "auto",
    memory_budget: Optional[int] = None,
    compute_dtype: ComputeDtype = None,
    progress: bool = False,
) -> torch.Tensor:
    """Exact ULTra explanation maps of many tokens of many images (docs/method.md §2), fast (docs/method.md §3).

    Args:
        model: a timm or open_clip ViT (wrapped automatically, left unchanged) or an ``Adapter``.
        images: preprocessed (B, 3, H, W); cast to the model's dtype, which is the compute dtype.
        layer: explain the tokens after block ``layer`` (1..L, negative from the end).
        scalar: ``"sum"`` (ULTra_S), ``"energy"`` (ULTra_E), ``"norm"``, ``"learned"`` (ULTra_W, with
            ``weights``) or a callable mapping (..., d) tokens to (...) scalars.
        targets: ``"patches"``, ``"all"``, ``"prefix"``, token indices (T,) or per image (B, T).
        order: ``"rollout"`` (latest block leftmost, default) or ``"paper"``.
        start_block: first block whose attention contributes (1-based).
        size: None (patch grid), ``"input"``, an int or (H, W) to upsample to.
        self_max: replace a patch target's own entry by the max of the others.
        backend: ``"auto"`` (native ops when built), ``"native"`` or ``"torch"``.
        backward: how each block's batched VJP is computed: ``"manual"`` (hand-written, for plain
            pre-norm ViT blocks), ``"autograd"`` (``autograd.grad(is_grads_batched=True)``, any block),
            or ``"auto"`` (manual where the block allows it).
        memory_budget: bytes one chunk of targets may use in the backward; default: see
            ``options.default_memory_budget``. Smaller budgets only mean more chunks, same maps.
        compute_dtype: a faster, inexact mode: run the batched backward (its matrix products and
            fused ops) in this dtype, e.g. ``torch.bfloat16`` or ``"bfloat16"``, while the forward, the
            attention probabilities, the LayerNorm statistics and the chain state between blocks stay in
            the model's dtype. ``"auto"``: bfloat16 where this device computes it natively (CUDA sm_80+,
            CPUs with AVX512_BF16 or AMX), else exact. A half dtype the device does not compute natively
            is refused (``UnsupportedHardwareError``) before any work: it would be far slower than
            float32. Off (None, exact) by default; needs the hand-written backward (plain pre-norm ViT blocks).

    Returns:
        (B, T, h, w) maps, or (B, T, *size) when ``size`` is given.
    """
    config = ExplainConfig(layer=layer, scalar=scalar, targets=targets, order=order, start_block=start_block,
                           size=size, interpolation=interpolation, self_max=self_max, weights=weights,
                           backend=backend, backward=backward, memory_budget=memory_budget,
                           compute_dtype=compute_dtype, progress=progress)
    return explain_with(model, images, config)


def explain_with(model: Union[nn.Module, Adapter], images: torch.Tensor, config: ExplainConfig) -> torch.Tensor:
    """``explain`` with its options as one validated ``ExplainConfig``: (B, T, h, w) maps, or (B, T, *size)."""
    adapter = wrap(model)
    adapter.check_images(images)
    images = images.to(device=adapter.device, dtype=adapter.dtype)
    out_size = resolve_size(config.size, images)
    grid = adapter.grid_size(images)
    rows, idx = explain_rows_with(adapter, images, config)
    maps = finalize(rows, idx, adapter.num_prefix_tokens, grid, config.self_max)
    return upsample(maps, out_size, config.interpolation)


def explain_rows(adapter: TokenAdapter, inputs: torch.Tensor, layer: int = -1, scalar: Union[str, ScalarFn] = "sum",
                 targets: Targets = "patches", order: str = "rollout", start_block: int = 1,
                 weights: Optional[torch.Tensor] = None, backend: str = "auto", backward: str = "auto",
                 memory_budget: Optional[int] = None, compute_dtype: ComputeDtype = None,
                 progress: bool = False):
    """The modality-free core of ``explain``: rows S̄_i[i, :] (B, T, N) over all N tokens, and the
    (B, T) target indices. ``inputs`` is whatever ``adapter.embed`` takes (images, token ids)."""
    config = ExplainConfig(layer=layer, scalar=scalar, targets=targets, order=order, start_block=start_block,
                           weights=weights, backend=backend, backward=backward, memory_budget=memory_budget,
                           compute_dtype=compute_dtype, progress=progress)
    return explain_rows_with(adapter, inputs, config)


def explain_rows_with(adapter: TokenAdapter, inputs, config: ExplainConfig):
    """``explain_rows`` with its options as one ``ExplainConfig`` (``size``, ``interpolation`` and
    ``self_max`` do not apply to rows). Returns (rows (B, T, N), target indices (B, T))."""
    l = resolve_layer(config.layer, adapter.num_blocks)
    s = resolve_start(config.start_block, l)
    compute_dtype = resolve_compute_dtype(config.compute_dtype, adapter.device, adapter.dtype)
    if compute_dtype is not None and config.backward == "autograd":
        raise ConfigError("compute_dtype needs the hand-written backward (backward='auto' or 'manual')")
    order, backward, targets = config.order, config.backward, config.targets
    P = adapter.num_prefix_tokens
    if adapter.device.type == "cpu":
        reuse_freed_memory()
    fn = resolve_scalar(config.scalar, config.weights, P, adapter=adapter, inputs=inputs)
    with eval_mode(adapter):
        with torch.no_grad():  # one graph-free forward; each block is recomputed from its saved input
            fw = adapter.run(inputs, upto=l, keep_inputs_from=s)
        z, saved = fw.tokens, fw.inputs
        B, N, _ = z.shape
        idx = resolve_targets(targets, B, N, P, z.device)
        if isinstance(fn, LearnedScalar) and fn.theta.shape[0] == N - P and bool((idx < P).any()):
            raise ConfigError("the learned W covers patch tokens only; prefix tokens cannot be explained with it")
        ops = get_ops(config.backend, z.device, compute_dtype or z.dtype, order)
        rows = token_cotangents(fn, z)
        T = idx.shape[1]
        cd = compute_dtype or z.dtype
        per_target = bytes_per_target(B, N, adapter.num_heads, adapter.embed_dim, z.element_size(), order,
                                      compute_elem=cd.itemsize,
                                      casts_G=cd != z.dtype and not _step_takes_mixed(order, ops, z.dtype))
        step = chunk_size(config.memory_budget, per_target, T, z.device)
        out = z.new_empty(B, T, N)
        for c in tqdm(range(0, T, step), desc="targets", unit="chunk", disable=not config.progress):
            out[:, c:c + step] = _explain_rows(adapter, saved, rows, idx[:, c:c + step], order, s, ops,
                                               backward, compute_dtype)
    return out, idx
