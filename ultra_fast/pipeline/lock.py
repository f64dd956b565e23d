"""One run at a time per output folder: an exclusive ``flock`` on ``DIR/.ultra_fast.lock``.

The kernel drops a ``flock`` when its holder exits or dies (``kill -9`` included), so a crashed run
never leaves the folder locked; a stale lock file is simply locked again by the next run. The lock file
holds the holder's pid (for the error message) and is removed on a normal release.

A ``flock`` belongs to the open file, which ``fork`` shares: a forked child (a DataLoader worker) would
keep the lock alive after its parent died. Children therefore close their copy right after ``fork``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType
from typing import Optional, Set, Type

from ..errors import UltraFastError

try:  # POSIX only; elsewhere runs are not guarded against each other
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".ultra_fast.lock"
#: How long to wait for a lock whose recorded holder is already dead (its children may still be exiting).
DEAD_HOLDER_GRACE_S = 10.0
_HELD: Set[int] = set()  # lock fds of this process


def _close_inherited_locks() -> None:
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputBusyError(UltraFastError):
    """Another run is writing into the same output folder."""


class OutputLock:
    """Context manager holding the output folder's lock (created with the folder if needed)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        """Take the lock now, or raise OutputBusyError naming the holder's pid."""
        if fcntl is None or self.fd is not None:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        deadline = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                if holder.isdigit() and not _pid_alive(int(holder)):
                    # the holder died a moment ago: the kernel releases the lock once its last file reference goes
                    deadline = deadline or time.monotonic() + DEAD_HOLDER_GRACE_S
                    if time.monotonic() < deadline:
                        time.sleep(0.1)
                        continue
                raise OutputBusyError(f"{self.out_dir} is in use by another run (pid {holder}); wait for it to "
                                      "finish or choose another --out") from None
            # A finishing holder may have unlinked the file between our open and flock: then we hold a lock
            # on a file nobody else sees, so start over on the current one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (unlink first, so no one locks a file about to vanish)."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        _HELD.discard(self.fd)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()
