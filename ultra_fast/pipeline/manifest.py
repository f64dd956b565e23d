"""The manifest of a batch run: one JSON line per input, appended durably, read back for resume, merged per rank.

Every record names its ``input`` (absolute path), its output ``name`` and a ``status`` ("ok" or "error");
"ok" records also list their ``outputs`` relative to the output folder. A line is appended, flushed and
fsync'ed only after the image's outputs are on disk, so an "ok" record always means finished work.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List

from ..io import atomic_write

MANIFEST = "manifest.jsonl"


def rank_manifest(rank: int, world: int) -> str:
    """The file one process appends to: ``manifest.jsonl``, or ``manifest.rank{r}.jsonl`` under torchrun."""
    return MANIFEST if world == 1 else f"manifest.rank{rank}.jsonl"


def read_records(path: Path) -> List[dict]:
    """The JSON records of a manifest file; a torn last line (a killed write) is ignored."""
    out = []
    try:
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "input" in rec:
                    out.append(rec)
    except FileNotFoundError:
        pass
    return out


def manifest_files(out_dir: Path) -> List[Path]:
    """``manifest.jsonl`` then the per-rank parts (numeric order)."""
    parts = sorted(out_dir.glob("manifest.rank*.jsonl"), key=lambda p: (len(p.name), p.name))
    return [out_dir / MANIFEST] + parts


def outputs_exist(out_dir: Path, rec: dict, needed: Iterable[str]) -> bool:
    """Whether every ``needed`` output of a record is listed and on disk."""
    outs = rec.get("outputs") or {}
    return all(k in outs and (out_dir / outs[k]).is_file() for k in needed)


def completed(out_dir: Path, needed: Iterable[str]) -> Dict[str, dict]:
    """Inputs already segmented: an "ok" record in any manifest file and every needed output on disk."""
    needed = list(needed)
    done = {}
    for f in manifest_files(out_dir):
        for rec in read_records(f):
            if rec.get("status") == "ok" and outputs_exist(out_dir, rec, needed):
                done[rec["input"]] = rec
    return done


def merge_manifests(out_dir: Path) -> List[dict]:
    """One record per input (an ok record with its outputs present wins over an error; else the latest),
    sorted by input path, written atomically to manifest.jsonl; the per-rank parts are then removed."""
    files = manifest_files(out_dir)
    best: Dict[str, dict] = {}
    for f in files:
        for rec in read_records(f):
            key = rec["input"]
            ok = rec.get("status") == "ok" and outputs_exist(out_dir, rec, (rec.get("outputs") or {}).keys())
            prev = best.get(key)
            prev_ok = prev is not None and prev.get("_ok")
            if prev is None or ok or not prev_ok:
                best[key] = dict(rec, _ok=ok)
    records = [{k: v for k, v in best[key].items() if k != "_ok"} for key in sorted(best)]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    atomic_write(out_dir / MANIFEST, write)
    for f in files[1:]:
        try:
            f.unlink()
        except FileNotFoundError:
            pass
    return records


class ManifestWriter:
    """Append-only JSON lines, each flushed and fsync'ed before the next image starts."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "a+b")
        self.f.seek(0, os.SEEK_END)
        if self.f.tell() > 0:  # a killed run may have left a torn line: start on a fresh one
            self.f.seek(-1, os.SEEK_END)
            if self.f.read(1) != b"\n":
                self.f.write(b"\n")

    def append(self, rec: dict) -> None:
        self.f.write((json.dumps(rec, sort_keys=True) + "\n").encode("utf-8"))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()
