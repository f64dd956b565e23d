"""Keeps glibc from returning large freed blocks to the kernel while the engine runs on CPU.

The batched backward allocates and frees tensors of tens to hundreds of MB in every block. glibc
serves blocks that large with ``mmap`` and unmaps them on ``free``, so every new tensor is
page-faulted in afresh: on CLIP-B/16 that was ~20% of the engine's time (29 s -> 23.5 s for all
196 tokens on a 2-core CPU once disabled). With ``M_MMAP_MAX = 0`` large blocks come from the heap
and freed memory is reused, as PyTorch's CUDA caching allocator does on GPU. Heap trimming is off
too (``M_TRIM_THRESHOLD = -1``): with a 1 GiB threshold the freed top of the heap was still handed
back and faulted in again, 2.5-5 GB of page faults per CLIP-B/16 call (another 3-4 % of the time).
The cost: the process keeps its peak heap until ``release_freed_heap()`` gives it back.

Applied once, on the first CPU ``explain``; set ``ULTRA_FAST_NO_MALLOPT=1`` to leave malloc alone.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER = -1  # mallopt(3): "setting M_TRIM_THRESHOLD to -1 disables trimming completely"
_applied = False


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both must exist: glibc)
        return libc
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return None


def reuse_freed_memory() -> bool:
    """Set glibc's malloc to keep and reuse large freed blocks; True when it is (now) in effect."""
    global _applied
    if _applied:
        return True
    libc = _libc()
    if os.environ.get("ULTRA_FAST_NO_MALLOPT") or libc is None:
        return False
    _applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER) == 1
    return _applied


def release_freed_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``): what the engine's runs left in
    malloc's free lists stops counting in the process's memory. A no-op where glibc is absent."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
