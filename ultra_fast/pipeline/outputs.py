"""Where a batch run writes, what it refuses to write over, and the atomic writing of one image's outputs.

Output folder layout::

    DIR/labels/<name>.png     palette PNG, pixel value = segment id (16-bit grey if > 256 segments)
    DIR/overlays/<name>.png   the image tinted by segment, borders in white
    DIR/maps/<name>.npz       (--save-maps) maps (n, h, w) float32, token_clusters (h, w), linkage (n-1, 4);
                              with --target-stride also positions (n_sub,): the row-major patches of the maps
    DIR/manifest.jsonl        one JSON line per input (see ``manifest``)
    DIR/run.json              the settings (see ``settings_file``)
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Dict, Iterable, Sequence

import numpy as np
from PIL import Image

from ..data.inputs import GLOB_CHARS, InputItem, glob_root
from ..errors import ConfigError
from ..io import atomic_write, save_image
from ..segmentation.run import ImageResult
from ..viz.labels import label_image, label_overlay
from .manifest import MANIFEST
from .settings_file import RUN_FILE

SUBDIRS = {"labels": ("labels", ".png"), "overlay": ("overlays", ".png"), "maps": ("maps", ".npz")}


def output_paths(out_dir: Path, name: str, save_maps: bool) -> Dict[str, Path]:
    """The output files of the input called ``name``, keyed labels / overlay (/ maps)."""
    keys = ("labels", "overlay", "maps") if save_maps else ("labels", "overlay")
    return {k: out_dir / SUBDIRS[k][0] / (name + SUBDIRS[k][1]) for k in keys}


def _is_under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_dir(specs: Iterable[str], out_dir: Path) -> None:
    """Refuse an ``--out`` that is an input folder or contains one (ConfigError).

    Its outputs would be listed as inputs by the next run, so the first run and a resume would see
    different inputs. An ``--out`` strictly inside an input folder is fine: the listing skips it.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    out = out_dir.resolve()
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            root = p
        elif not p.exists() and GLOB_CHARS & set(str(spec)):
            root = glob_root(str(p))
            if not any(Path(m).is_dir() or Path(m).is_file() for m in glob.glob(str(p), recursive=True)):
                continue  # list_inputs names the empty pattern
        else:
            continue
        if _is_under(root.resolve(), out):
            raise ConfigError(f"--out {out_dir} is or contains the input folder {spec}: its outputs would be read "
                              "as inputs by the next run; choose an --out outside it (or a subfolder of it)")


def check_no_overwrite(items: Sequence[InputItem], out_dir: Path, save_maps: bool = True) -> None:
    """Refuse a run whose outputs would replace one of its inputs (resolved paths compared)."""
    inputs = {str(Path(it.path).resolve()) for it in items}
    fixed = [out_dir / MANIFEST, out_dir / RUN_FILE]
    for p in fixed + [q for it in items for q in output_paths(out_dir, it.name, save_maps).values()]:
        if str(p.resolve()) in inputs:
            raise ConfigError(f"output {p} would overwrite the input {p.resolve()}; choose another --out")


def write_outputs(out_dir: Path, name: str, image: np.ndarray, res: ImageResult, save_maps: bool) -> Dict[str, str]:
    """Write one image's outputs atomically; returns them relative to ``out_dir``."""
    paths = output_paths(out_dir, name, save_maps)
    save_image(label_image(res.labels), paths["labels"])
    save_image(label_overlay(Image.fromarray(image), res.labels), paths["overlay"])
    if save_maps:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                extra = {} if res.positions is None else {"positions": res.positions}
                # numpy's stub types **kwds against its allow_pickle flag: the keyword arrays are what it takes
                np.savez_compressed(f, maps=res.maps, token_clusters=res.token_clusters, linkage=res.linkage,
                                    **extra)  # type: ignore[arg-type]
        atomic_write(paths["maps"], write)
    return {k: p.relative_to(out_dir).as_posix() for k, p in paths.items()}


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporary files a killed atomic write leaves behind (``.name.XXXX.tmp.ext``).

    Only safe while holding the folder's lock: a concurrent run's temporaries are live.
    """
    n = 0
    for sub in {v[0] for v in SUBDIRS.values()} | {"."}:
        d = out_dir / sub
        if d.is_dir():
            for f in d.glob(".*.tmp*"):
                try:
                    f.unlink()
                    n += 1
                except OSError:
                    pass
    return n
