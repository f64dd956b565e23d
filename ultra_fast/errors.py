"""The package's exceptions: what a user can cause and fix, as opposed to bugs.

Everything here derives from ``UltraFastError``. The CLI prints those (and ``OSError``) as one line
and exits 2; any other exception is a bug and keeps its traceback. Where an error is also a classic
built-in kind (a bad value, a bad type), it derives from that too, so ``except ValueError`` in users'
code keeps working.
"""
from __future__ import annotations


class UltraFastError(Exception):
    """Base class of every error ultra_fast raises on purpose."""


class ConfigError(UltraFastError, ValueError):
    """An option has a value the package does not accept (names the option and the accepted values)."""


class UnsupportedModelError(UltraFastError, TypeError):
    """The model is of a type or structure the package cannot explain."""


class UnsupportedHardwareError(ConfigError):
    """A requested mode that this device cannot run well (e.g. bfloat16 on a CPU without native bf16)."""


class NativeOpsUnavailableError(UltraFastError, RuntimeError):
    """The compiled C++/CUDA ops were asked for but are not built for this device or dtype."""


class CheckpointError(UltraFastError, ValueError):
    """A saved file (e.g. a learned-W checkpoint) does not match what it is loaded for."""


class InputError(UltraFastError, ValueError):
    """An input (image, file, tensor) is missing, unreadable, or of the wrong shape or dtype."""


__all__ = ["UltraFastError", "ConfigError", "UnsupportedModelError", "UnsupportedHardwareError",
           "NativeOpsUnavailableError", "CheckpointError", "InputError"]
