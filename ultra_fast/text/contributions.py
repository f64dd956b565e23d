"""Token contribution scores of a context for its summary (docs/method.md §7, the paper's Figure 4).

For a causal language model reading ``context + separator + summary`` (one sequence, P = 0), the
score of context token i is

    λ_i = (1/|y|) Σ_j S̄_{j}[j, i]      over the summary tokens j,

the mean over the summary tokens of their explanation rows (docs/method.md §2, rows taken over all tokens),
restricted to the context columns. The fast engine explains all summary tokens together
(``explain_rows`` with targets = the summary positions); long contexts are handled by its chunking
over targets under ``memory_budget``.

Self entry (docs/method.md §2.6): the self-max rule exists for patch maps, where the target's own column is
dominated by the skip connection. Here the targets are summary tokens and the scored columns are
context tokens, so a target's own column is never among them and no self-max is applied (the
rows are used as the engine returns them). Separator and special tokens (BOS, [CLS], ...) are neither
context nor summary: they are in the sequence the model reads but are not scored and not targets.

Attention sinks (``sink_tokens=k``): causal LMs park attention on the first token(s) (and on
punctuation), so their columns carry most of every row and set its scale: on SmolLM2 the first token's
λ is 30x the next one's at the last layer, and a summary token whose row is large dominates the mean.
Like the CLS and register tokens of a ViT, the first k tokens of the sequence are then treated as
prefix tokens: role ``prefix``, never scored; and each summary token's row is divided by its largest
absolute value over the scored columns before the mean, so that every summary token weighs the same
(the images' analogue: every map is min-max scaled over the patch columns only). k = 0 (default) is
the plain λ above.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union, cast

import torch
from torch import nn

from ..engine.explain import explain_rows
from ..engine.options import resolve_layer
from ..engine.scalars import ScalarFn
from ..errors import ConfigError, InputError
from ..models.base import Adapter
from ..models.hf_text import wrap_text

DEFAULT_SEPARATOR = "\nTL;DR: "
ROLES = ("special", "prefix", "context", "separator", "summary")


@dataclass
class TokenizedPair:
    """One sequence: token ids, each token's role and its character span in ``text``."""

    text: str
    input_ids: List[int]
    offsets: List[Tuple[int, int]]
    roles: List[str]

    def positions(self, role: str) -> List[int]:
        return [k for k, r in enumerate(self.roles) if r == role]


def tokenize_pair(tokenizer, context: str, summary: str, separator: str = DEFAULT_SEPARATOR,
                  add_special_tokens: bool = True, sink_tokens: int = 0) -> TokenizedPair:
    """Tokenize ``context + separator + summary`` as one text and label every token.

    ``sink_tokens`` k: the first k tokens of the sequence that would be ``context`` or ``special``
    become ``prefix`` (attention sinks: not scored; see the module docstring).

    A token is ``context`` if it starts inside the context, ``summary`` if it reaches into the summary
    (a BPE token such as " word" may carry the separator's trailing space), ``separator`` otherwise;
    special tokens (zero-width, or flagged by the tokenizer) are ``special``. Needs a fast tokenizer
    (offset mapping).
    """
    if not context:
        raise InputError("the context is empty")
    if not summary:
        raise InputError("the summary is empty")
    text = context + separator + summary
    try:
        enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True,
                        add_special_tokens=add_special_tokens)
    except NotImplementedError as e:
        raise ConfigError(f"{type(tokenizer).__name__} gives no offset mapping; use a fast tokenizer") from e
    ids = list(enc["input_ids"])
    # offset_mapping holds one (start, end) character span per token
    offsets = [cast(Tuple[int, int], tuple(int(v) for v in o)) for o in enc["offset_mapping"]]
    special = list(enc.get("special_tokens_mask") or [0] * len(ids))
    ctx_end, sum_start = len(context), len(context) + len(separator)
    roles = []
    for (start, end), sp in zip(offsets, special):
        if sp or start == end:
            roles.append("special")
        elif start < ctx_end:
            roles.append("context")
        elif end > sum_start:
            roles.append("summary")
        else:
            roles.append("separator")
    if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
        raise ConfigError(f"sink_tokens must be an int >= 0; got {sink_tokens!r}")
    for k in range(min(sink_tokens, len(roles))):
        if roles[k] in ("special", "context"):
            roles[k] = "prefix"
    pair = TokenizedPair(text, ids, offsets, roles)
    if not pair.positions("context"):
        raise InputError("the context produced no tokens" + (f" after the {sink_tokens} sink tokens" if sink_tokens
                                                              else ""))
    if not pair.positions("summary"):
        raise InputError("the summary produced no tokens")
    return pair


@dataclass
class Contributions:
    """λ for every context token, with the tokens' text and character spans in ``context``."""

    context: str
    summary: str
    separator: str
    tokens: List[str]                     # context tokens as they appear in the context text
    offsets: List[Tuple[int, int]]        # their (start, end) character spans in ``context``
    scores: torch.Tensor                  # λ, (n_context,) float64 on CPU
    summary_tokens: List[str]
    matrix: torch.Tensor                  # (n_summary, n_context): each summary token's row on the context
    input_ids: List[int]
    roles: List[str]
    layer: int
    scalar: str
    order: str
    model: str
    seconds: float
    extra: dict = field(default_factory=dict)

    def top(self, k: int = 10) -> List[Tuple[int, str, float]]:
        """The k highest-λ context tokens as (context token index, text, λ), best first."""
        k = min(k, len(self.tokens))
        vals, order = torch.sort(self.scores, descending=True, stable=True)
        return [(int(i), self.tokens[int(i)], float(v)) for v, i in zip(vals[:k], order[:k])]

    def to_dict(self) -> dict:
        return {"model": self.model, "layer": self.layer, "scalar": self.scalar, "order": self.order,
                "separator": self.separator, "seconds": self.seconds,
                "tokens": [{"text": t, "start": s, "end": e, "score": float(v)}
                           for t, (s, e), v in zip(self.tokens, self.offsets, self.scores.tolist())],
                "summary_tokens": self.summary_tokens}


def contributions(model: Union[nn.Module, Adapter], tokenizer, context: str, summary: str, layer: int = -1,
                  scalar: Union[str, ScalarFn] = "sum", separator: str = DEFAULT_SEPARATOR,
                  order: str = "rollout", start_block: int = 1, weights: Optional[torch.Tensor] = None,
                  add_special_tokens: bool = True, backend: str = "auto", backward: str = "auto",
                  memory_budget: Optional[int] = None, progress: bool = False,
                  sink_tokens: int = 0) -> Contributions:
    """Token contribution scores λ of ``context`` for ``summary`` (docs/method.md §7).

    Args:
        model: a ``transformers`` Llama-family / GPT-2 / BERT model (wrapped automatically, left
            unchanged) or an ``ultra_fast`` text adapter.
        tokenizer: its (fast) tokenizer.
        context, summary, separator: the model reads ``context + separator + summary``.
        layer: the summary tokens' residual stream after block ``layer`` (1..L, negative from the end).
        scalar, order, start_block, weights, backend, backward, memory_budget, progress: as in
            ``ultra_fast.engine.explain_rows``.
        sink_tokens: treat the first k tokens as prefix (attention-sink) tokens: not scored, and every
            summary row scaled by its max |value| over the scored columns (module docstring); 0: off.
    """
    adapter = wrap_text(model)
    pair = tokenize_pair(tokenizer, context, summary, separator, add_special_tokens, sink_tokens)
    ctx, summ = pair.positions("context"), pair.positions("summary")
    ids = torch.tensor([pair.input_ids], dtype=torch.long)
    t0 = time.perf_counter()
    rows, _ = explain_rows(adapter, ids, layer=layer, scalar=scalar, targets=torch.tensor(summ), order=order,
                           start_block=start_block, weights=weights, backend=backend, backward=backward,
                           memory_budget=memory_budget, progress=progress)
    seconds = time.perf_counter() - t0
    matrix = rows[0][:, torch.tensor(ctx, device=rows.device)].detach().to("cpu", torch.float64)
    if not torch.isfinite(matrix).all():
        raise InputError(
            f"the explanation rows overflowed {rows.dtype} (the chained C matrices grow with the residual "
            f"stream's scale): run the model in float64 (model.double()), or use an earlier layer or scalar='norm'")
    scores = matrix.mean(0)
    if sink_tokens:
        scale = matrix.abs().amax(1, keepdim=True)
        scores = torch.where(scale > 0, matrix / torch.where(scale > 0, scale, 1.0), 0.0).mean(0)
    ctx_end = len(context)
    offsets = [(s, min(e, ctx_end)) for s, e in (pair.offsets[k] for k in ctx)]
    return Contributions(
        context=context, summary=summary, separator=separator,
        tokens=[context[s:e] for s, e in offsets], offsets=offsets, scores=scores,
        summary_tokens=[pair.text[slice(*pair.offsets[k])] for k in summ], matrix=matrix,
        input_ids=pair.input_ids, roles=pair.roles, layer=resolve_layer(layer, adapter.num_blocks),
        scalar=scalar if isinstance(scalar, str) else getattr(scalar, "__name__", "callable"),
        order=order, model=adapter.name, seconds=seconds, extra={"sink_tokens": int(sink_tokens)})
