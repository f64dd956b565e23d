"""The engine: exact ULTra maps, fast (``explain``) and by the book (``explain_naive``, ``explain_authors``)."""
from .allocator import release_freed_heap
from .config import ExplainConfig
from .explain import explain, explain_rows, explain_rows_with, explain_with
from .reference import explain_authors, explain_naive
from .scalars import LearnedScalar, resolve_scalar

__all__ = ["ExplainConfig", "explain", "explain_with", "explain_rows", "explain_rows_with", "explain_naive",
           "explain_authors", "LearnedScalar", "resolve_scalar", "release_freed_heap"]
