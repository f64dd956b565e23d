"""``run.json``: the settings a batch run's outputs were made with, so that a resume cannot mix two settings.

The file binds an output folder only once the run has finished an image (``record_settings`` is called
just before the first "ok" manifest line is appended): a run that fails before any image (a wrong model
name, a typo in an option) leaves the folder free for a corrected run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..io import atomic_write

RUN_FILE = "run.json"


def recorded_settings(out_dir: Path) -> Optional[dict]:
    """The settings recorded in ``out_dir``, or None (no file, or an unreadable one)."""
    try:
        return json.loads((Path(out_dir) / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_settings(out_dir: Path, settings: dict) -> None:
    """ConfigError when ``out_dir`` holds outputs made with other settings (naming what differs)."""
    old = recorded_settings(out_dir)
    if old is None or old == settings:
        return
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    raise ConfigError(f"{out_dir} holds a run made with other settings ({', '.join(diff)} differ: "
                      + ", ".join(f"{k}={old.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
                      + "); use another --out")


def record_settings(out_dir: Path, settings: dict) -> None:
    """Write ``run.json`` atomically unless it already holds these settings (refused if it holds others)."""
    check_settings(out_dir, settings)
    if recorded_settings(out_dir) is None:
        text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
        atomic_write(Path(out_dir) / RUN_FILE, lambda tmp: Path(tmp).write_text(text))
