"""Writing results so that a killed run never leaves a half-written file behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_image(image, path) -> Path:
    """Atomically save a PIL image; the format follows the suffix of ``path``."""
    fmt = Path(path).suffix.lstrip(".").upper() or "PNG"
    return atomic_write(path, lambda tmp: image.save(tmp, format="JPEG" if fmt == "JPG" else fmt))


def save_page(text: str, path) -> Path:
    """Atomically write an HTML page (or any text) readable by all: a page to share, not a private temporary."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    out = atomic_write(path, write)
    os.chmod(out, 0o644)
    return out
