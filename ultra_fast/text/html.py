"""The context coloured by λ as a self-contained HTML page (like the paper's Figure 4)."""
from __future__ import annotations

import html
import os
from typing import Optional

import torch

from ..io import atomic_write
from .contributions import Contributions

SCALES = ("log", "max", "minmax", "rank")


def intensities(scores: torch.Tensor, scale: str = "log") -> torch.Tensor:
    """Colour strength in [0, 1] per token.

    ``"log"``: log λ min-max scaled (λ spans orders of magnitude in language models, where an attention
    sink such as the first token can exceed the others by 100x); ``"max"``: λ / max λ; ``"minmax"``;
    ``"rank"``: the quantile of λ among the context tokens.
    """
    s = scores.to(torch.float64)
    if scale == "log":
        pos = s[s > 0]
        if len(pos) == 0:
            return torch.zeros_like(s)
        lo, hi = float(pos.min().log()), float(pos.max().log())
        if hi <= lo:
            return (s > 0).to(s.dtype)
        return ((s.clamp(min=float(pos.min())).log() - lo) / (hi - lo)).where(s > 0, torch.zeros_like(s))
    if scale == "max":
        m = float(s.max())
        return s / m if m > 0 else torch.zeros_like(s)
    if scale == "minmax":
        lo, hi = float(s.min()), float(s.max())
        return (s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)
    if scale == "rank":
        if len(s) == 1:
            return torch.ones_like(s)
        ranks = torch.empty_like(s)
        ranks[torch.argsort(s, stable=True)] = torch.arange(len(s), dtype=s.dtype)
        return ranks / (len(s) - 1)
    raise ValueError(f"unknown scale {scale!r}; expected one of {SCALES}")


def _colour(a: float) -> str:
    # white -> deep red, alpha-blended so the page stays readable
    return f"rgba(214, 39, 40, {0.05 + 0.85 * a:.3f})" if a > 0 else "transparent"


_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 52em;
       margin: 2em auto; line-height: 1.6; color: #222; padding: 0 1em; }
.ctx { white-space: pre-wrap; font-size: 1.05em; border: 1px solid #ddd; padding: 1em; border-radius: 6px; }
.ctx span.t { border-radius: 3px; }
.sum { white-space: pre-wrap; background: #f4f6fa; border-left: 4px solid #4a6fa5; padding: .6em 1em; }
.meta { color: #666; font-size: .9em; }
.bar { height: 14px; width: 260px; border: 1px solid #ccc; display: inline-block; vertical-align: middle;
       background: linear-gradient(to right, rgba(214,39,40,0.05), rgba(214,39,40,0.9)); }
table { border-collapse: collapse; } td, th { padding: .15em .8em; border-bottom: 1px solid #eee; text-align: left; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
"""


def render_html(c: Contributions, title: Optional[str] = None, top: int = 10, scale: str = "log") -> str:
    """The page as a string: the context with every token's background coloured by its λ."""
    alpha = intensities(c.scores, scale).tolist()
    rank = {i: r + 1 for r, (i, _, _) in enumerate(c.top(len(c.tokens)))}
    parts, pos = [], 0
    for k, ((s, e), a, v) in enumerate(zip(c.offsets, alpha, c.scores.tolist())):
        if s > pos:  # characters no token covers (rare): shown uncoloured
            parts.append(html.escape(c.context[pos:s]))
        s = max(s, pos)
        if e > s:
            parts.append(f'<span class="t" style="background:{_colour(a)}" '
                         f'title="token {k}: λ = {v:.4g} (rank {rank[k]})">{html.escape(c.context[s:e])}</span>')
        pos = max(pos, e)
    parts.append(html.escape(c.context[pos:]))
    rows = "\n".join(
        f"<tr><td>{r + 1}</td><td><code>{html.escape(repr(t))}</code></td><td>{i}</td><td>{v:.4g}</td></tr>"
        for r, (i, t, v) in enumerate(c.top(top)))
    title = title or "ULTra token contributions"
    smax, smin = float(c.scores.max()), float(c.scores.min())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">model: {html.escape(c.model)} &middot; layer {c.layer} &middot; scalar <code>{html.escape(c.scalar)}</code>
&middot; order <code>{html.escape(c.order)}</code> &middot; {len(c.tokens)} context tokens, {len(c.summary_tokens)} summary
tokens &middot; explained in {c.seconds:.1f} s</p>
<p class="meta">Colour: λ<sub>i</sub> = mean over the summary tokens j of their ULTra explanation row
S̄<sub>j</sub>[j, i] (SPEC §7); colour scale <code>{scale}</code> from
{smin:.3g} <span class="bar"></span> {smax:.3g}. Hover a token for its score.</p>
<h2>Context</h2>
<div class="ctx">{''.join(parts)}</div>
<h2>Summary</h2>
<div class="sum"><b>{html.escape(c.separator.strip())}</b> {html.escape(c.summary)}</div>
<h2>Top {min(top, len(c.tokens))} context tokens</h2>
<table><tr><th>#</th><th>token</th><th>index</th><th>λ</th></tr>
{rows}
</table>
</body></html>
"""


def save_html(c: Contributions, path, title: Optional[str] = None, top: int = 10, scale: str = "log"):
    """Write ``render_html`` atomically to ``path``; returns the path."""
    page = render_html(c, title=title, top=top, scale=scale)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
    out = atomic_write(path, write)
    os.chmod(out, 0o644)  # a page to share, not a private temporary file
    return out
