"""The naive oracle for token rows: one ``autograd.grad`` per target over every block's attention map.

SPEC §2 literally, for any adapter whose ``embed`` takes token ids: one forward with every
attention map kept in the graph, then per (sequence, target) the gradients G^(b) of F_i with
respect to all A^(b), dense C^(b) = I + mean_h(relu(G) ⊙ A), chained in the requested order.
Shares nothing of the fast engine's arithmetic; used by the tests as the reference.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..engine.options import check_order, eval_mode, resolve_layer, resolve_start
from ..engine.reference import chain, dense_C
from ..engine.scalars import ScalarFn, resolve_scalar
from ..engine.targets import Targets, resolve_targets
from ..models.base import Adapter


def naive_rows(adapter: Union[Adapter, nn.Module], inputs, layer: int = -1,
               scalar: Union[str, ScalarFn] = "sum", targets: Targets = "all", order: str = "rollout",
               start_block: int = 1, weights: Optional[torch.Tensor] = None):
    """Rows S̄_i[i, :] (B, T, N) and the (B, T) target indices, one backward per target.

    Same meaning and output as ``ultra_fast.engine.explain_rows`` (P = 0 is not assumed: rows
    cover all N tokens, prefix columns included).
    """
    from ..models.hf_text import wrap_text
    adapter = wrap_text(adapter)
    l = resolve_layer(layer, adapter.num_blocks)
    s = resolve_start(start_block, l)
    check_order(order)
    fn = resolve_scalar(scalar, weights, adapter.num_prefix_tokens)
    rows = []
    with eval_mode(adapter), torch.enable_grad():
        z = adapter.embed(inputs)
        attns = []
        for b in range(l):
            z, a = adapter.block(b, z)
            attns.append(a)
        F = fn(z)
        B, N = F.shape
        idx = resolve_targets(targets, B, N, adapter.num_prefix_tokens, z.device)
        used = attns[s - 1:l]
        for b in range(B):
            for t in range(idx.shape[1]):
                i = int(idx[b, t])
                Gs = torch.autograd.grad(F[b, i], used, retain_graph=True, allow_unused=True)
                Cs = [dense_C(torch.zeros_like(A[b]) if G is None else G[b], A[b].detach())
                      for G, A in zip(Gs, used)]
                rows.append(chain(Cs, order)[i].detach())
    return torch.stack(rows).reshape(B, idx.shape[1], -1), idx
