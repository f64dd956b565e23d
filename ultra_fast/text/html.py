"""The context coloured by λ as a self-contained HTML page (like the paper's Figure 4)."""
from __future__ import annotations

import html
import json
from typing import List, Optional, Tuple

import torch

from ..errors import ConfigError
from ..io import save_page
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
    raise ConfigError(f"unknown scale {scale!r}; expected one of {SCALES}")


#: The page's colour per quantised level 0..255: white, then deep red (214, 39, 40) blended over white
#: with opacity 0.05 + 0.85 level/255 (opaque colours, so a browser reports them exactly).
RED = (214, 39, 40)


def colour_lut() -> List[Tuple[int, int, int]]:
    """The 256 colours of the page's levels (level 0 is white: no contribution)."""
    out = [(255, 255, 255)]
    for q in range(1, 256):
        a = 0.05 + 0.85 * q / 255.0
        r, g, b = (int(round(255 * (1 - a) + c * a)) for c in RED)
        out.append((r, g, b))
    return out


def levels(scores: torch.Tensor, scale: str = "log") -> List[int]:
    """``intensities`` quantised to the page's 256 levels, ``floor(255 a + 1/2)``."""
    return [int(v) for v in torch.floor(intensities(scores, scale) * 255.0 + 0.5).to(torch.int64).tolist()]


def row_levels(c: Contributions, scale: str = "log") -> List[List[int]]:
    """(n_summary, n_context) levels: each summary token's explanation row on the context, on its own scale."""
    return [levels(row, scale) for row in c.matrix]


_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 52em;
       margin: 2em auto; line-height: 1.6; color: #222; padding: 0 1em; }
.ctx { white-space: pre-wrap; font-size: 1.05em; border: 1px solid #ddd; padding: 1em; border-radius: 6px; }
.ctx span.t, .sum span.s { border-radius: 3px; cursor: default; }
.ctx span.t.hover, .sum span.s.hover { outline: 2px solid #4a6fa5; }
.sum { white-space: pre-wrap; background: #f4f6fa; border-left: 4px solid #4a6fa5; padding: .6em 1em; }
.meta { color: #666; font-size: .9em; }
.info { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85em; min-height: 3em;
        background: #fafafa; border: 1px solid #eee; padding: .4em .8em; border-radius: 4px; }
.bar { height: 14px; width: 260px; border: 1px solid #ccc; display: inline-block; vertical-align: middle;
       background: linear-gradient(to right, rgb(243,231,231), rgb(214,39,40)); }
table { border-collapse: collapse; } td, th { padding: .15em .8em; border-bottom: 1px solid #eee; text-align: left; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
"""

# Hovering a context token colours each summary token j by that context token's entry in j's
# explanation row (row levels, column i) and lists the values; hovering a summary token colours the
# context by its row; leaving restores the λ colouring. Levels and colours come from Python, so the
# page only looks them up (the browser tests compare them exactly).
_SCRIPT = """
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("ultra-text-data").textContent);
  const ctx = Array.from(document.querySelectorAll(".ctx span.t")), sum = Array.from(document.querySelectorAll(".sum span.s"));
  const info = document.getElementById("info");
  const rgb = (q) => `rgb(${D.lut[q][0]}, ${D.lut[q][1]}, ${D.lut[q][2]})`;
  const fmt = (v) => Number(v).toPrecision(4);
  function plain() {
    ctx.forEach((el, i) => { el.style.background = rgb(D.levels[i]); el.classList.remove("hover"); });
    sum.forEach((el) => { el.style.background = "transparent"; el.classList.remove("hover"); });
    info.textContent = "Hover a context token for its λ and its entry in each summary token's map; " +
                       "hover a summary token for its map on the context.";
  }
  function showContext(i) {
    plain();
    ctx[i].classList.add("hover");
    sum.forEach((el, j) => { el.style.background = rgb(D.rows[j][i]); el.dataset.value = D.matrix[j][i]; });
    info.textContent = "";
    const head = document.createElement("div");
    head.id = "info-head";
    head.textContent = `context token ${i} ${JSON.stringify(D.tokens[i])}: λ = ${fmt(D.scores[i])} (rank ${D.rank[i]} of ${D.scores.length})`;
    info.appendChild(head);
    const row = document.createElement("div");
    row.id = "info-row";
    row.textContent = "in each summary token's map: " + D.summary.map((t, j) => `${JSON.stringify(t)} ${fmt(D.matrix[j][i])}`).join(", ");
    info.appendChild(row);
  }
  function showSummary(j) {
    plain();
    sum[j].classList.add("hover");
    ctx.forEach((el, i) => { el.style.background = rgb(D.rows[j][i]); });
    let best = 0;
    D.matrix[j].forEach((v, i) => { if (v > D.matrix[j][best]) best = i; });
    info.textContent = `summary token ${j} ${JSON.stringify(D.summary[j])}: its map on the context ` +
                       `(largest: token ${best} ${JSON.stringify(D.tokens[best])}, ${fmt(D.matrix[j][best])})`;
  }
  ctx.forEach((el, i) => { el.addEventListener("mouseenter", () => showContext(i)); el.addEventListener("mouseleave", plain); });
  sum.forEach((el, j) => { el.addEventListener("mouseenter", () => showSummary(j)); el.addEventListener("mouseleave", plain); });
  plain();
  window.ultraText = { ready: true, showContext, showSummary, plain };
})();
"""


def _json_for_script(obj) -> str:
    # "<" escaped so no token text can close the <script> element
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def render_html(c: Contributions, title: Optional[str] = None, top: int = 10, scale: str = "log") -> str:
    """The page as a string: the context with every token's background coloured by its λ; hovering a
    context token shows its λ and its entry in each summary token's map, hovering a summary token
    colours the context by that token's map."""
    lut = colour_lut()
    lam = levels(c.scores, scale)
    ranked = c.top(len(c.tokens))
    rank = {i: r + 1 for r, (i, _, _) in enumerate(ranked)}
    parts, pos = [], 0
    for k, ((s, e), q, v) in enumerate(zip(c.offsets, lam, c.scores.tolist())):
        if s > pos:  # characters no token covers (rare): shown uncoloured
            parts.append(html.escape(c.context[pos:s]))
        s = max(s, pos)
        # every context token gets its span (an empty one if another token already covered its text),
        # so span k is context token k for the script
        parts.append(f'<span class="t" data-i="{k}" style="background:rgb({lut[q][0]}, {lut[q][1]}, {lut[q][2]})" '
                     f'title="token {k}: λ = {v:.4g} (rank {rank[k]})">{html.escape(c.context[s:e]) if e > s else ""}</span>')
        pos = max(pos, e)
    parts.append(html.escape(c.context[pos:]))
    summ = "".join(f'<span class="s" data-j="{j}">{html.escape(t)}</span>' for j, t in enumerate(c.summary_tokens))
    rows = "\n".join(
        f"<tr><td>{r + 1}</td><td><code>{html.escape(repr(t))}</code></td><td>{i}</td><td>{v:.4g}</td></tr>"
        for r, (i, t, v) in enumerate(ranked[:top]))
    title = title or "ULTra token contributions"
    smax, smin = float(c.scores.max()), float(c.scores.min())
    data = {"tokens": c.tokens, "summary": c.summary_tokens, "scores": c.scores.tolist(),
            "matrix": c.matrix.tolist(), "levels": lam, "rows": row_levels(c, scale), "lut": lut,
            "rank": [rank[k] for k in range(len(c.tokens))], "scale": scale}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><link rel="icon" href="data:,">
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="meta">model: {html.escape(c.model)} &middot; layer {c.layer} &middot; scalar <code>{html.escape(c.scalar)}</code>
&middot; order <code>{html.escape(c.order)}</code> &middot; {len(c.tokens)} context tokens, {len(c.summary_tokens)} summary
tokens &middot; explained in {c.seconds:.1f} s</p>
<p class="meta">Colour: λ<sub>i</sub> = mean over the summary tokens j of their ULTra explanation row
S̄<sub>j</sub>[j, i]: how much context token i contributed, through every attention layer below, to summary
token j; colour scale <code>{scale}</code> from {smin:.3g} <span class="bar"></span> {smax:.3g}.
Hover a context token for its λ and its entry in each summary token's map (the summary is coloured by
it, each row on its own scale); hover a summary token to colour the context by its map.</p>
<h2>Context</h2>
<div class="ctx">{''.join(parts)}</div>
<h2>Summary</h2>
<div class="sum"><b>{html.escape(c.separator.strip())}</b> {summ}</div>
<p class="info" id="info"></p>
<h2>Top {min(top, len(c.tokens))} context tokens</h2>
<table><tr><th>#</th><th>token</th><th>index</th><th>λ</th></tr>
{rows}
</table>
<script type="application/json" id="ultra-text-data">{_json_for_script(data)}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def save_html(c: Contributions, path, title: Optional[str] = None, top: int = 10, scale: str = "log"):
    """Write ``render_html`` atomically to ``path``; returns the path."""
    return save_page(render_html(c, title=title, top=top, scale=scale), path)
