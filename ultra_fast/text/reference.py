"""The naive oracle for token rows: one ``autograd.grad`` per target over every block's attention map.

docs/method.md §2 literally, for any adapter whose ``embed`` takes token ids: one forward with every
attention map kept in the graph, then per (sequence, target) the gradients G^(b) of F_i with
respect to all A^(b), dense C^(b) = I + mean_h(relu(G) ⊙ A), chained in the requested order.
Shares nothing of the fast engine's arithmetic; used by the tests as the reference.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..engine.reference import naive_rows as _naive_rows
from ..engine.scalars import ScalarFn
from ..engine.targets import Targets
from ..models.base import Adapter


def naive_rows(adapter: Union[Adapter, nn.Module], inputs, layer: int = -1,
               scalar: Union[str, ScalarFn] = "sum", targets: Targets = "all", order: str = "rollout",
               start_block: int = 1, weights: Optional[torch.Tensor] = None):
    """Rows S̄_i[i, :] (B, T, N) and the (B, T) target indices, one backward per target.

    ``ultra_fast.engine.reference.naive_rows`` for a Hugging Face model (wrapped here) or a text
    adapter; same meaning and output as ``ultra_fast.engine.explain_rows``.
    """
    from ..models.hf_text import wrap_text
    return _naive_rows(wrap_text(adapter), inputs, layer, scalar, targets, order, start_block, weights)
