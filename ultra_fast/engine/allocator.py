"""Keeps glibc from returning large freed blocks to the kernel while the engine runs on CPU.

The batched backward allocates and frees tensors of tens to hundreds of MB in every block. glibc
serves blocks that large with ``mmap`` and unmaps them on ``free``, so every new tensor is
page-faulted in afresh: on CLIP-B/16 that was ~20% of the engine's time (29 s -> 23.5 s for all
196 tokens on a 2-core CPU once disabled). With ``M_MMAP_MAX = 0`` large blocks come from the heap
and freed memory is reused, as PyTorch's CUDA caching allocator does on GPU. The cost: the
process keeps its peak heap after the run (``M_TRIM_THRESHOLD`` 1 GiB still trims beyond that).

Applied once, on the first CPU ``explain``; set ``ULTRA_FAST_NO_MALLOPT=1`` to leave malloc alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep and reuse large freed blocks; True when it is (now) in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get("ULTRA_FAST_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False
    _applied = ok
    return ok
