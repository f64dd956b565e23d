"""ULTra for text (docs/method.md §7): token contribution scores of a context for its summary, and their HTML page.

Transformers' language models are imported lazily (``transformers`` is only needed here).
"""
from ..models.hf_text import load_smollm2, load_text_model, wrap_text
from .contributions import DEFAULT_SEPARATOR, Contributions, TokenizedPair, contributions, tokenize_pair
from .html import render_html, save_html
from .reference import naive_rows

__all__ = ["DEFAULT_SEPARATOR", "Contributions", "TokenizedPair", "contributions", "tokenize_pair",
           "render_html", "save_html", "naive_rows", "load_smollm2", "load_text_model", "wrap_text"]
