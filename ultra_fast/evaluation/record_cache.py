"""The per-image record cache of an evaluation run (``OUT/cache/<sample>.pt``) and its ``OUT/run.json``,
written atomically; a run with other settings is refused."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..io import atomic_write
from .eval_config import FORMAT, VERSION, RunPlan

PathLike = Union[str, Path]


def _sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path(out: PathLike, name: str) -> Path:
    """``OUT/cache/<sample name>.pt`` (path separators in names become ``__``)."""
    safe = name.replace("/", "__").replace("\\", "__")
    return Path(out) / "cache" / f"{safe}.pt"


def _pack(obj):
    """numpy arrays -> tensors (recursively), so records load with ``torch.load(weights_only=True)``."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v) for v in obj)
    return obj


def _unpack(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v) for v in obj)
    return obj


def save_record(path: Path, record: Dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(_pack(record), tmp))


def load_record(path: Path) -> Dict[str, Any]:
    try:
        return _unpack(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means "not a usable record"
        raise CheckpointError(f"cached record {path} is unreadable: {e}") from e


def _diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    return [f"{k}: cached {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def prepare_out(out: PathLike, plan: RunPlan, names: Sequence[str], overwrite: bool = False) -> Path:
    """Create ``OUT``, check or (with ``overwrite``) reset its cache, and write ``OUT/run.json``.

    A cache made with other settings is refused, naming every setting that differs.
    """
    out = Path(out)
    run_file = out / "run.json"
    key = plan.key()
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        if old.get("key") != key and not overwrite:
            diffs = _diff(old.get("key", {}), key)
            raise ConfigError(f"{out} holds an evaluation with other settings ({'; '.join(diffs)}); use another "
                              f"--out, or --overwrite to discard its cache")
        if overwrite:
            for f in (out / "cache").glob("*.pt"):
                f.unlink()
        else:
            created = old.get("created", created)
    run = {"format": FORMAT, "version": VERSION, "created": created, "key": key, "digest": plan.digest(),
           "protocols": list(plan.config.protocols), "primary": dict(zip(("scalar", "layer", "threshold"),
                                                                          plan.primary)),
           "images": list(names)}
    (out / "cache").mkdir(parents=True, exist_ok=True)
    atomic_write(run_file, lambda tmp: Path(tmp).write_text(json.dumps(run, indent=1)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Per image


