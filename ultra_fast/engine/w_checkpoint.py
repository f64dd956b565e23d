"""ULTra_W checkpoints (the ``"learned"`` scalar's weights, written by ``ultra_fast.training``): one file holding θ, what it was trained for, and the state needed to resume.

The file is a ``torch.save`` dict of plain types and tensors (loadable with ``weights_only=True``):
``format``, ``version``, ``theta`` (n, d) float64, ``model`` (the name given to ``create_model``),
``adapter`` (the adapter's own name), ``grid`` [h, w], ``num_prefix_tokens``, ``dim``, ``layer``
(1..L), ``size`` [H, W] (model input pixels), ``settings`` (every training setting), ``losses``
(per optimiser step), ``history`` (per batch), ``images`` (names), ``image_digest``, ``position``
({"epoch", "batch"}: the next batch to run), ``complete`` and ``optimizer`` (Adam's state dict).
It is written atomically after every batch, so a killed run leaves the last finished batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import CheckpointError
from ..io import atomic_write

FORMAT = "ultra_fast.ultra_w"
VERSION = 1
_REQUIRED = ("theta", "model", "adapter", "grid", "num_prefix_tokens", "dim", "layer", "size", "settings")


@dataclass
class WCheckpoint:
    """A loaded, validated W checkpoint (see the module docstring for the fields)."""

    theta: torch.Tensor
    model: str
    adapter: str
    grid: Tuple[int, int]
    num_prefix_tokens: int
    dim: int
    layer: int
    size: Tuple[int, int]
    settings: Dict[str, Any]
    losses: List[float] = field(default_factory=list)
    history: List[Dict[str, Any]] = field(default_factory=list)
    images: List[str] = field(default_factory=list)
    complete: bool = False
    path: Optional[Path] = None

    @property
    def directions(self) -> torch.Tensor:
        """The unit vectors w_i = θ_i / ||θ_i|| (n, d)."""
        return self.theta / torch.linalg.vector_norm(self.theta, dim=-1, keepdim=True)

    @property
    def model_names(self) -> Tuple[str, ...]:
        """Names a model may carry to be accepted: the ``create_model`` name and the adapter's name."""
        return tuple(dict.fromkeys((self.model, self.adapter)))


def save_checkpoint(path, state: Dict[str, Any]) -> Path:
    """Write ``state`` (format and version added) atomically to ``path``."""
    state = dict(state, format=FORMAT, version=VERSION)
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path) -> Dict[str, Any]:
    """The raw dict of a W checkpoint, with a clear error when ``path`` is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"W checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a W checkpoint"
        raise CheckpointError(f"{path} is not a readable W checkpoint: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ultra_fast W checkpoint (format {FORMAT!r}); "
                              f"pass a (tokens, d) tensor as weights= for a bare W")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has W checkpoint version {state.get('version')}; this ultra_fast reads {VERSION}")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"W checkpoint {path} lacks {', '.join(missing)}")
    return state


def check_compatible(ckpt: WCheckpoint, model_name: Optional[str] = None,
                     grid: Optional[Sequence[int]] = None, num_prefix_tokens: Optional[int] = None,
                     dim: Optional[int] = None) -> None:
    """Refuse, naming both values, a model or patch grid other than the ones W was trained for."""
    where = f"W checkpoint {ckpt.path}" if ckpt.path else "W checkpoint"
    if model_name is not None and model_name not in ckpt.model_names:
        raise CheckpointError(f"{where} was trained for model {ckpt.model!r} (adapter {ckpt.adapter!r}), "
                              f"not for {model_name!r}")
    if grid is not None and tuple(int(g) for g in grid) != ckpt.grid:
        gh, gw = (int(g) for g in grid)
        raise CheckpointError(f"{where} was trained on a {ckpt.grid[0]}x{ckpt.grid[1]} patch grid (input "
                              f"{ckpt.size[0]}x{ckpt.size[1]} px); these images give a {gh}x{gw} grid: preprocess "
                              f"them to size=({ckpt.size[0]}, {ckpt.size[1]})")
    if num_prefix_tokens is not None and int(num_prefix_tokens) != ckpt.num_prefix_tokens:
        raise CheckpointError(f"{where} was trained for a model with {ckpt.num_prefix_tokens} prefix tokens, "
                              f"not {num_prefix_tokens}")
    if dim is not None and int(dim) != ckpt.dim:
        raise CheckpointError(f"{where} has token dimension {ckpt.dim}, the model has {dim}")


def load_w(path, model_name: Optional[str] = None, grid: Optional[Sequence[int]] = None,
           num_prefix_tokens: Optional[int] = None, dim: Optional[int] = None) -> WCheckpoint:
    """Load a W checkpoint; with ``model_name``/``grid``/... given, refuse one trained for something else.

    ``model_name`` matches either the ``create_model`` name or the adapter name stored in the file.
    """
    state = read_checkpoint(path)
    theta = state["theta"]
    grid0 = (int(state["grid"][0]), int(state["grid"][1]))
    if not isinstance(theta, torch.Tensor) or theta.shape != (grid0[0] * grid0[1], int(state["dim"])):
        shape = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        raise CheckpointError(f"W checkpoint {path}: theta {shape} does not match its grid {grid0} and dim {state['dim']}")
    ckpt = WCheckpoint(theta=theta, model=str(state["model"]), adapter=str(state["adapter"]), grid=grid0,
                       num_prefix_tokens=int(state["num_prefix_tokens"]), dim=int(state["dim"]),
                       layer=int(state["layer"]), size=(int(state["size"][0]), int(state["size"][1])),
                       settings=dict(state["settings"]), losses=list(state.get("losses", [])),
                       history=list(state.get("history", [])), images=list(state.get("images", [])),
                       complete=bool(state.get("complete", False)), path=Path(os.fspath(path)))
    check_compatible(ckpt, model_name, grid, num_prefix_tokens, dim)
    return ckpt
