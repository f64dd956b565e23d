"""Which images a batch run reads, what its outputs are called, and a prefetching image dataset.

``list_inputs`` turns command-line INPUTS (files, folders walked recursively, globs, ``.txt`` lists
of paths) into a sorted, de-duplicated list of ``InputItem``; each item carries a ``name`` that is
unique within the run and stable across runs (the path relative to the folder / glob root / list
file it came from, separators replaced by ``__``, without the extension), so ``a/x.png`` and
``b/x.png`` never write to the same output.

``ImageDataset`` decodes and preprocesses in DataLoader workers; a file that cannot be decoded gives
an item with ``error`` set instead of raising, so one corrupt file never stops a run (any other
exception is a bug and propagates). ``prefetch_loader``'s workers die with the process that started
them, even when it is killed with SIGKILL.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..models.preprocess import load_images, preprocess, target_size, to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm",
                    ".pbm", ".pnm")
GLOB_CHARS = set("*?[")
SEP = "__"


@dataclass(frozen=True)
class InputItem:
    """One input image: its absolute ``path`` and the unique output ``name`` (no extension)."""

    path: str
    name: str


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _walk(folder: Path, exclude: Sequence[Path]) -> List[Path]:
    out: List[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rootp = Path(root)
        # Never read a run's own outputs back as inputs (an --out folder inside an input folder).
        dirs[:] = sorted(d for d in dirs if (rootp / d).resolve() not in exclude and not d.startswith("."))
        out.extend(rootp / f for f in files if not f.startswith(".") and is_image_file(rootp / f))
    return out


def glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    root = []
    for p in parts:
        if GLOB_CHARS & set(p):
            break
        root.append(p)
    return Path(*root) if root else Path(".")


def _read_list(list_file: Path) -> List[str]:
    lines = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _expand(spec: str, exclude: Sequence[Path], from_list: Optional[Path] = None) -> List[Tuple[Path, Path]]:
    """(file, root the output name is taken relative to) for one INPUT."""
    p = Path(spec).expanduser()
    if from_list is not None and not p.is_absolute():
        p = from_list.parent / p  # relative entries of a list file are relative to the list file
    if p.is_dir():
        return [(f, p) for f in _walk(p, exclude)]
    if p.is_file():
        if p.suffix.lower() == ".txt" and from_list is None:
            entries = _read_list(p)
            out: List[Tuple[Path, Path]] = []
            for entry in entries:
                out.extend(_expand(entry, exclude, from_list=p))
            return out
        return [(p, p.parent if from_list is None else from_list.parent)]
    if GLOB_CHARS & set(str(spec)):
        pattern = str(p)
        matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True))
        root = glob_root(pattern)
        files: List[Tuple[Path, Path]] = []
        for m in matches:
            if m.is_dir():
                files.extend((f, m) for f in _walk(m, exclude))
            elif is_image_file(m) and not any(_is_under(m.resolve(), e) for e in exclude):
                files.append((m, root))
        if not files:
            raise FileNotFoundError(f"no image matches the pattern {spec!r}")
        return files
    where = f" (listed in {from_list})" if from_list is not None else ""
    raise FileNotFoundError(f"input not found: {p}{where}")


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _name_for(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(path.name)
    return SEP.join(rel.with_suffix("").parts) or path.stem


def list_inputs(specs: Iterable[str], exclude: Sequence[os.PathLike] = ()) -> List[InputItem]:
    """Sorted unique input images with unique output names. Raises FileNotFoundError naming a missing INPUT.

    ``exclude``: folders never walked into (the run's output folder).
    """
    excluded = [Path(e).resolve() for e in exclude]
    found: Dict[str, str] = {}
    for spec in specs:
        for f, root in _expand(str(spec), excluded):
            key = str(f.resolve())
            found.setdefault(key, _name_for(f, root))
    paths = sorted(found)
    names = [found[p] for p in paths]
    # Resolve name clashes deterministically: same stem, other extension -> keep the extension; then ~N.
    counts: Dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    names = [n + "_" + Path(p).suffix.lstrip(".").lower() if counts[n] > 1 else n for n, p in zip(names, paths)]
    seen: Dict[str, int] = {}
    final: List[str] = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        final.append(n if k == 0 else f"{n}~{k}")
    return [InputItem(p, n) for p, n in zip(paths, final)]


def fit_size(image_hw: Tuple[int, int], size, cfg, max_tokens: Optional[int] = None):
    """The model input (h, w) for an image: the size policy, shrunk (aspect kept) to at most ``max_tokens`` patches.

    Guards against extreme aspect ratios (a 1 x 5000 strip at shorter side 224 would be 224 x 1e6).
    """
    h, w = target_size(image_hw, size, cfg)
    ph, pw = cfg.patch_size
    n = (h // ph) * (w // pw)
    if max_tokens is None or n <= max_tokens:
        return h, w
    s = math.sqrt(max_tokens / n)
    gh, gw = max(1, int(h // ph * s)), max(1, int(w // pw * s))
    if gh * gw > max_tokens:  # one side was clamped to a single patch
        if gh >= gw:
            gh = max(1, max_tokens // gw)
        else:
            gw = max(1, max_tokens // gh)
    return gh * ph, gw * pw


#: What decoding one bad file may raise: unreadable / truncated / not an image (OSError, incl. PIL's
#: UnidentifiedImageError), a malformed header (ValueError, SyntaxError, EOFError), a pixel bomb.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, InputError, Image.DecompressionBombError)


def load_rgb(path: str):
    """Open one image file as 8-bit RGB (EXIF applied); OSError naming the file if it cannot be read."""
    return to_rgb(load_images([path])[0])


class ImageDataset(torch.utils.data.Dataset):
    """Decoding + preprocessing (in DataLoader workers). Item: dict with ``index``, ``path``, ``name`` and
    either ``error`` (a message) or ``x`` (3, h, w) float32, ``size`` (H, W) of the original image and
    ``image`` (H, W, 3) uint8 (for overlays)."""

    def __init__(self, items: Sequence[InputItem], cfg, size=None, max_tokens: Optional[int] = None):
        self.items = list(items)
        self.cfg = cfg
        self.size = size
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        out = {"index": i, "path": item.path, "name": item.name}
        try:
            img = load_rgb(item.path)
        except DECODE_ERRORS as e:
            msg = str(e)
            if item.path not in msg:
                msg = f"cannot read image {item.path}: {msg}"
            out["error"] = f"{type(e).__name__}: {msg}"
            return out
        hw = fit_size((img.height, img.width), self.size, self.cfg, self.max_tokens)
        out["x"] = preprocess(img, self.cfg, size=hw)[0]
        out["size"] = (img.height, img.width)
        out["image"] = np.asarray(img, dtype=np.uint8)
        return out


def _identity(x):
    return x


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: have the kernel SIGKILL this worker when its parent dies.

    PyTorch's own watchdog only notices a dead parent between items, and a worker blocked on a full
    result pipe never gets there: after ``kill -9`` of a run such workers stayed alive, orphaned, for
    as long as 45 minutes. ``prctl(PR_SET_PDEATHSIG)`` is Linux-only; the pid check covers a parent that
    died before the call took effect.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def prefetch_loader(dataset: ImageDataset, workers: int = 2, prefetch: int = 2):
    """A DataLoader yielding single items in order, decoded ``workers`` at a time ahead of use; its workers
    end with this process however it ends."""
    kw: Dict[str, Any] = dict(batch_size=None, shuffle=False, num_workers=max(0, int(workers)), collate_fn=_identity)
    if workers > 0:
        kw.update(prefetch_factor=max(1, prefetch), persistent_workers=False,
                  worker_init_fn=functools.partial(die_with_parent, os.getpid()))
    return torch.utils.data.DataLoader(dataset, **kw)


def same_size_batches(items: Iterable[dict], batch_size: int):
    """Group consecutive decoded items into batches of one input shape (at most ``batch_size``);
    an unreadable item is yielded alone (as a one-element list)."""
    batch: List[dict] = []
    for it in items:
        if "error" in it:
            if batch:
                yield batch
                batch = []
            yield [it]
            continue
        if batch and (len(batch) >= batch_size or batch[0]["x"].shape != it["x"].shape):
            yield batch
            batch = []
        batch.append(it)
    if batch:
        yield batch
