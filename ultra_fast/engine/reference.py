"""Slow references: the oracles of the tests and the baselines of the benchmarks.

- ``explain_naive`` (on ``naive_rows``, for any adapter): docs/method.md §2 literally. One forward with
  every attention map kept in the graph, then one ``autograd.grad`` per (image, target) for all blocks,
  and dense (N, N) matrices chained.
- ``explain_authors``: the authors' notebook algorithm: for every token a fresh forward pass of
  its image and one ``autograd.grad`` call per block.
Both share the validation (``ExplainConfig``), the forward loop (``adapter.run``) and the
post-processing of the fast engine, and nothing of its arithmetic.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import Adapter, TokenAdapter, wrap
from .config import ExplainConfig
from .maps import Size, finalize, resolve_size, upsample
from .options import eval_mode, resolve_layer, resolve_start
from .scalars import ScalarFn, resolve_scalar
from .targets import Targets, resolve_targets


def dense_C(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """C = I + mean_h(relu(G_h) ⊙ A_h) for one image: G, A (H, N, N) -> (N, N)."""
    N = A.shape[-1]
    return torch.eye(N, dtype=A.dtype, device=A.device) + (G.clamp(min=0) * A).mean(0)


def chain(Cs: List[torch.Tensor], order: str) -> torch.Tensor:
    """S̄ from the per-block matrices [C^(s), ..., C^(l)]."""
    S = torch.eye(Cs[0].shape[-1], dtype=Cs[0].dtype, device=Cs[0].device)
    for C in Cs:  # earliest block first
        S = C @ S if order == "rollout" else S @ C
    return S


def _options(layer, scalar, targets, order, start_block, size, interpolation, self_max, weights,
             progress) -> ExplainConfig:
    """The references' arguments as the engine's validated options (the engine-only ones at their defaults)."""
    return ExplainConfig(layer=layer, scalar=scalar, targets=targets, order=order, start_block=start_block,
                         size=size, interpolation=interpolation, self_max=self_max, weights=weights,
                         progress=progress)


def naive_rows(adapter: TokenAdapter, inputs: torch.Tensor, layer: int = -1, scalar: Union[str, ScalarFn] = "sum",
               targets: Targets = "patches", order: str = "rollout", start_block: int = 1,
               weights: Optional[torch.Tensor] = None, progress: bool = False):
    """The modality-free core of ``explain_naive`` (as ``explain_rows`` is of ``explain``): rows
    S̄_i[i, :] (B, T, N) over all N tokens and the (B, T) target indices, one backward per target.
    ``inputs`` is whatever ``adapter.embed`` takes (images, token ids)."""
    config = _options(layer, scalar, targets, order, start_block, None, "bilinear", True, weights, progress)
    return naive_rows_with(adapter, inputs, config)


def naive_rows_with(adapter: TokenAdapter, inputs, config: ExplainConfig):
    """``naive_rows`` with its options as one ``ExplainConfig`` (the engine-only options are ignored)."""
    l = resolve_layer(config.layer, adapter.num_blocks)
    s = resolve_start(config.start_block, l)
    fn = resolve_scalar(config.scalar, config.weights, adapter.num_prefix_tokens, adapter=adapter, inputs=inputs)
    rows = []
    with eval_mode(adapter), torch.enable_grad():
        fw = adapter.run(inputs, upto=l, keep_attn=True)  # every attention map stays in the graph
        z, attns = fw.tokens, fw.attentions
        F = fn(z)
        B, N = F.shape
        idx = resolve_targets(config.targets, B, N, adapter.num_prefix_tokens, z.device)
        used = attns[s - 1:l]
        for b in tqdm(range(B), desc="inputs", disable=not config.progress):
            for t in range(idx.shape[1]):
                i = int(idx[b, t])
                Gs = torch.autograd.grad(F[b, i], used, retain_graph=True, allow_unused=True)
                Cs = [dense_C(torch.zeros_like(A[b]) if G is None else G[b], A[b].detach())
                      for G, A in zip(Gs, used)]
                rows.append(chain(Cs, config.order)[i].detach())
    return torch.stack(rows).reshape(B, idx.shape[1], -1), idx


def explain_naive(model: Union[nn.Module, Adapter], images: torch.Tensor, layer: int = -1,
                  scalar: Union[str, ScalarFn] = "sum", targets: Targets = "patches", order: str = "rollout",
                  start_block: int = 1, size: Size = None, interpolation: str = "bilinear",
                  self_max: bool = True, weights: Optional[torch.Tensor] = None,
                  progress: bool = False) -> torch.Tensor:
    """One backward pass per target token; same arguments and output as ``explain``."""
    config = _options(layer, scalar, targets, order, start_block, size, interpolation, self_max, weights, progress)
    adapter = wrap(model)
    adapter.check_images(images)
    images = images.to(device=adapter.device, dtype=adapter.dtype)
    grid = adapter.grid_size(images)
    rows, idx = naive_rows_with(adapter, images, config)
    maps = finalize(rows, idx, adapter.num_prefix_tokens, grid, config.self_max)
    return upsample(maps, resolve_size(config.size, images), config.interpolation)


def explain_authors(model: Union[nn.Module, Adapter], images: torch.Tensor, layer: int = -1,
                    scalar: Union[str, ScalarFn] = "sum", targets: Targets = "patches",
                    order: str = "rollout", start_block: int = 1, size: Size = None,
                    interpolation: str = "bilinear", self_max: bool = True,
                    weights: Optional[torch.Tensor] = None, progress: bool = False) -> torch.Tensor:
    """The authors' algorithm: per token, a forward pass plus one ``autograd.grad`` per block."""
    config = _options(layer, scalar, targets, order, start_block, size, interpolation, self_max, weights, progress)
    adapter = wrap(model)
    adapter.check_images(images)
    images = images.to(device=adapter.device, dtype=adapter.dtype)
    l = resolve_layer(config.layer, adapter.num_blocks)
    s = resolve_start(config.start_block, l)
    fn = resolve_scalar(config.scalar, config.weights, adapter.num_prefix_tokens, adapter=adapter, inputs=images)
    grid = adapter.grid_size(images)
    N = adapter.num_prefix_tokens + grid[0] * grid[1]
    idx = resolve_targets(config.targets, images.shape[0], N, adapter.num_prefix_tokens, images.device)
    B, T = idx.shape
    rows = []
    with eval_mode(adapter), torch.enable_grad():
        for b in tqdm(range(B), desc="images", disable=not config.progress):
            for t in range(T):
                i = int(idx[b, t])
                fw = adapter.run(images[b:b + 1], upto=l, keep_attn=True)
                z, attns = fw.tokens, fw.attentions
                F = fn(z)[0, i]
                Cs = []
                for A in attns[s - 1:l]:
                    (G,) = torch.autograd.grad(F, A, retain_graph=True, allow_unused=True)
                    G = torch.zeros_like(A) if G is None else G
                    Cs.append(dense_C(G[0], A[0].detach()))
                rows.append(chain(Cs, config.order)[i])
    out = torch.stack(rows).reshape(B, T, -1)
    maps = finalize(out, idx, adapter.num_prefix_tokens, grid, config.self_max)
    return upsample(maps, resolve_size(config.size, images), config.interpolation)
