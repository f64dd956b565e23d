"""Peak memory of a block of code: CUDA allocator statistics, or the process RSS sampled on CPU."""
from __future__ import annotations

import threading
from typing import Literal, Optional, Union

import torch

from ..engine.allocator import release_freed_heap
from ..errors import ConfigError


def _rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.peak_bytes``.

    CUDA: the allocator's peak (``max_memory_allocated``) during the block, minus what was allocated
    at entry; ``peak_rss`` is then the absolute peak allocated bytes. CPU: a thread samples the
    process resident set size every ``interval`` seconds (psutil); ``peak_bytes`` is the peak RSS
    during the block minus the RSS at entry, ``peak_rss`` the absolute peak. Sampling can miss a
    spike shorter than the interval, and RSS counts the whole process (other threads included),
    so CPU numbers are a close lower bound of what the block itself touched. ``trim`` (CPU) first
    returns freed heap pages to the OS, so that memory an earlier computation left in the allocator's
    free lists is not reused invisibly inside the block.
    """

    def __init__(self, device: Union[str, torch.device] = "cpu", interval: float = 0.002, trim: bool = True):
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"PeakMemory supports cpu and cuda devices; got {self.device}")
        if interval <= 0:
            raise ConfigError(f"interval must be positive seconds; got {interval}")
        self.interval = interval
        self.trim = trim
        self.start_bytes = 0
        self.peak_rss = 0
        self.peak_bytes = 0
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    def _sample(self, stop: threading.Event) -> None:
        # Event.wait doubles as the sleep, so exit never waits a full interval.
        while not stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, _rss())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            if self.trim:
                release_freed_heap()
            self.start_bytes = self.peak_rss = _rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, args=(self._stop,), name="PeakMemory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> Literal[False]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_rss = torch.cuda.max_memory_allocated(self.device)
        else:
            # __enter__ started the sampler on this (non-CUDA) device
            assert self._stop is not None and self._thread is not None
            self._stop.set()
            self._thread.join()
            self.peak_rss = max(self.peak_rss, _rss())
        self.peak_bytes = max(0, self.peak_rss - self.start_bytes)
        return False
