"""``ExplainConfig``: the options of one explanation, frozen and validated in one place.

``explain``, ``explain_rows``, the references (``explain_naive``, ``explain_authors``, ``naive_rows``)
and ``segment`` all build one from their keyword arguments, so a bad option is refused with the same
message wherever it is passed, before any work. What can only be checked against a model (the layer
range, ``start_block <= layer``, the targets' indices, whether a half dtype is native on the device, a
W checkpoint's model and grid) is checked when the config meets the model.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Union

import torch

from ..errors import ConfigError
from .backend import BACKENDS
from .maps import INTERPOLATIONS, Size
from .options import ComputeDtype, check_order, parse_compute_dtype, resolve_compute_dtype
from .scalars import SCALARS, ScalarFn
from .targets import TARGET_NAMES, Targets

#: How each block's batched VJP is computed (see ``explain``).
BACKWARDS = ("auto", "manual", "autograd")
#: Options that change the maps themselves (the rest choose how they are computed: backend, backward,
#: memory budget, progress). A run that caches maps keys them by these, where not at their defaults.
RESULT_OPTIONS = ("order", "start_block", "compute_dtype", "self_max")

Weights = Union[None, torch.Tensor, str, os.PathLike]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, eq=False)  # eq=False: tensors (targets, weights) have no plain equality
class ExplainConfig:
    """What to explain and how; the arguments of ``ultra_fast.explain`` (see there for their meaning).

    Frozen: derive variants with ``config.replace(layer=8)``. ``compute_dtype`` is stored parsed
    (None = exact, ``"auto"``, or a ``torch.dtype``).
    """

    layer: int = -1
    scalar: Union[str, ScalarFn] = "sum"
    targets: Targets = "patches"
    order: str = "rollout"
    start_block: int = 1
    size: Size = None
    interpolation: str = "bilinear"
    self_max: bool = True
    weights: Weights = None
    backend: str = "auto"
    backward: str = "auto"
    memory_budget: Optional[int] = None
    compute_dtype: ComputeDtype = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.layer) or self.layer == 0:
            raise ConfigError(f"layer={self.layer!r} must be a non-zero int (1..L, or negative from the end)")
        if not callable(self.scalar) and self.scalar not in SCALARS:
            raise ConfigError(f"unknown scalar {self.scalar!r}; expected one of {SCALARS} or a callable")
        if self.scalar == "learned" and self.weights is None:
            raise ConfigError('scalar="learned" needs weights= (a (tokens, d) tensor or a W checkpoint path)')
        if self.weights is not None and not isinstance(self.weights, (torch.Tensor, str, os.PathLike)):
            raise ConfigError(f"weights must be a (tokens, d) tensor or a W checkpoint path; got "
                              f"{type(self.weights).__name__}")
        if isinstance(self.targets, str) and self.targets not in TARGET_NAMES:
            raise ConfigError(f"unknown targets {self.targets!r}; expected one of {TARGET_NAMES} or token indices")
        check_order(self.order)
        if not _is_int(self.start_block) or self.start_block < 1:
            raise ConfigError(f"start_block={self.start_block!r} must be an int >= 1 (and <= layer)")
        self._check_size()
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        if self.backward not in BACKWARDS:
            raise ConfigError(f"unknown backward {self.backward!r}; expected one of {BACKWARDS}")
        budget = self.memory_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 1):
            raise ConfigError(f"memory_budget must be a positive number of bytes; got {self.memory_budget!r}")
        # frozen: the parsed value goes in through object.__setattr__ (what dataclasses document for this)
        object.__setattr__(self, "compute_dtype", parse_compute_dtype(self.compute_dtype))

    def _check_size(self) -> None:
        size = self.size
        if size is None or size == "input":
            return
        if isinstance(size, int) and _is_int(size) and size > 0:
            return
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size):
            return
        raise ConfigError(f"size must be None, 'input', a positive int or (H, W); got {size!r}")

    def replace(self, **changes: Any) -> "ExplainConfig":
        """A copy with ``changes`` applied (validated again); unknown names raise ``ConfigError``."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown explain option(s) {unknown}; expected some of {list(self.field_names())}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ExplainConfig":
        """``ExplainConfig(**kwargs)`` with a ``ConfigError`` naming unknown options (not a bare TypeError)."""
        return cls().replace(**kwargs) if kwargs else cls()

    def _not_default(self, names: Iterable[str]) -> List[str]:
        """Those of ``names`` whose value differs from the default's (identity first: a tensor (targets,
        weights) has no plain truth value for ``!=``)."""
        default = ExplainConfig()
        out = []
        for name in names:
            value, base = getattr(self, name), getattr(default, name)
            if value is not base and (isinstance(value, torch.Tensor) or value != base):
                out.append(name)
        return out

    def changed(self, names: Iterable[str]) -> Dict[str, Any]:
        """The options among ``names`` that differ from their defaults, JSON-ready (a dtype by its name)."""
        out: Dict[str, Any] = {}
        for name in self._not_default(names):
            value = getattr(self, name)
            out[name] = str(value).replace("torch.", "") if isinstance(value, torch.dtype) else value
        return out

    @classmethod
    def for_owner(cls, config: Optional["ExplainConfig"], sets: Iterable[str], owner: str) -> "ExplainConfig":
        """``config`` (None: the defaults) for a caller that sets ``sets`` itself (e.g. the evaluation sweeps
        ``layer`` and ``scalar``): anything but an ``ExplainConfig``, or one that sets them, is refused."""
        if config is None:
            return cls()
        if not isinstance(config, ExplainConfig):
            raise ConfigError(f"explain must be an ExplainConfig; got {type(config).__name__}")
        set_here = config._not_default(sets)
        if set_here:
            raise ConfigError(f"{owner} sets {', '.join(set_here)} itself; leave "
                              f"{'it' if len(set_here) == 1 else 'them'} out of its ExplainConfig")
        return config

    def on(self, device: torch.device, model_dtype: torch.dtype) -> "ExplainConfig":
        """This config with ``compute_dtype`` resolved for ``device`` ("auto" settled; a half dtype the device
        does not compute natively refused with ``UnsupportedHardwareError``), for runs that record it."""
        if self.compute_dtype is None:
            return self
        return self.replace(compute_dtype=resolve_compute_dtype(self.compute_dtype, device, model_dtype))

    def kwargs(self) -> Dict[str, Any]:
        """The options as keyword arguments of ``explain`` (e.g. to record or to forward them)."""
        return {name: getattr(self, name) for name in self.field_names()}


__all__ = ["BACKWARDS", "RESULT_OPTIONS", "ExplainConfig"]
