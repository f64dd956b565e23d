"""The batch runner behind ``ultra-fast segment``: resume, sharding, per-image records, errors.

Reliability: every output file is written atomically (temporary file + rename), and only then is the
image's manifest line appended, flushed and fsync'ed. A restart skips inputs whose manifest record is
"ok" and whose outputs exist, so a killed run loses no finished image.

Errors: only an input's own fault is recorded and skipped (status "error"; retried on a restart): a file
that cannot be decoded, or an ``InputError`` raised for that image. Anything else (an engine bug, a full
disk) stops the run with its traceback; what was finished stays done and a restart resumes after it.

Sharding: under ``torchrun`` rank r of K takes the sorted inputs ``r::K`` and appends to its own
``manifest.rank{r}.jsonl``; after a barrier rank 0 merges every part (and an older ``manifest.jsonl``)
into ``manifest.jsonl``, one record per input sorted by input path, and removes the parts.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, TextIO

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..data.inputs import ImageDataset, InputItem, prefetch_loader, same_size_batches
from ..errors import InputError
from ..segmentation.run import SegmentSettings, segment_tensors
from .manifest import ManifestWriter, completed, merge_manifests, rank_manifest
from .outputs import output_paths, remove_stale_temporaries, write_outputs
from .settings_file import record_settings


@dataclass
class RunSummary:
    """Counts of one process's run."""

    total: int = 0        # inputs of this rank
    skipped: int = 0      # already done
    done: int = 0         # segmented now
    errors: int = 0
    seconds: float = 0.0


def run(adapter, items: Sequence[InputItem], out_dir, settings: SegmentSettings, rank: int = 0, world: int = 1,
        batch_size: int = 1, workers: int = 2, save_maps: bool = False, max_images: Optional[int] = None,
        backend: str = "auto", progress: bool = True, log: TextIO = sys.stderr) -> RunSummary:
    """Segment this rank's share of ``items`` into ``out_dir`` (resuming), then merge manifests (rank 0).

    All ranks must call it (it has barriers); the caller holds the folder's ``OutputLock`` (rank 0) and
    has checked ``run.json``. ``max_images`` stops after that many new images.
    """
    out_dir = Path(out_dir)
    needed = list(output_paths(out_dir, "x", save_maps))
    if rank == 0:
        remove_stale_temporaries(out_dir)
    distributed.barrier()
    mine = distributed.shard(items, rank, world)
    done = completed(out_dir, needed)
    todo = [it for it in mine if it.path not in done]
    pending = todo if max_images is None else todo[:max(0, int(max_images))]
    summary = RunSummary(total=len(mine), skipped=len(mine) - len(todo))
    writer = ManifestWriter(out_dir / rank_manifest(rank, world))
    settings_json = settings.to_json()
    bound = False  # run.json written (it binds the folder once the first image is finished)
    t_start = time.perf_counter()
    try:
        if pending:
            ds = ImageDataset(pending, adapter.preprocessing, size=settings.size, max_tokens=settings.max_tokens)
            loader = prefetch_loader(ds, workers=min(workers, len(pending)))
            bar = tqdm(total=len(pending), unit="img", desc="segment" if world == 1 else f"segment[{rank}]",
                       disable=not progress, position=rank if world > 1 else None, dynamic_ncols=True)
            for batch in same_size_batches(loader, max(1, int(batch_size))):
                for rec in process_batch(adapter, batch, out_dir, settings, save_maps, backend, log):
                    if rec["status"] == "ok":
                        if not bound:
                            record_settings(out_dir, settings_json)
                            bound = True
                        summary.done += 1
                    else:
                        summary.errors += 1
                    writer.append(rec)
                    bar.update(1)
            bar.close()
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - t_start
    distributed.barrier()
    if rank == 0:
        merge_manifests(out_dir)
    distributed.barrier()
    return summary


def _error_record(it: dict, msg: str, what: str, log: TextIO) -> dict:
    print(f"ultra-fast segment: {what} {it['path']}: {msg}", file=log)
    return {"input": it["path"], "name": it["name"], "status": "error", "error": msg}


def process_batch(adapter, batch: List[dict], out_dir: Path, s: SegmentSettings, save_maps: bool, backend: str,
                  log: TextIO = sys.stderr) -> List[dict]:
    """Segment a same-size batch and write its outputs; one manifest record per item.

    An undecodable item, or one whose segmentation raises ``InputError``, becomes an error record; any
    other exception propagates (a bug must not pass for a bad image).
    """
    if "error" in batch[0]:
        return [_error_record(batch[0], batch[0]["error"], "skipping", log)]
    t0 = time.perf_counter()
    try:
        x = torch.stack([it["x"] for it in batch])
        results = segment_tensors(adapter, x, [it["size"] for it in batch], s, backend)
    except InputError as e:
        if len(batch) > 1:  # find the culprit: one by one
            return [r for it in batch for r in process_batch(adapter, [it], out_dir, s, save_maps, backend, log)]
        return [_error_record(batch[0], f"{type(e).__name__}: {e}", "failed on", log)]
    per = (time.perf_counter() - t0) / len(batch)
    recs = []
    for it, res in zip(batch, results):
        t1 = time.perf_counter()
        outs = write_outputs(out_dir, it["name"], it["image"], res, save_maps)
        recs.append({"input": it["path"], "name": it["name"], "status": "ok", "outputs": outs,
                     "num_segments": res.num_segments, "size": list(it["size"]),
                     "grid": list(res.token_clusters.shape),
                     "seconds": round(per + time.perf_counter() - t1, 4)})
    return recs
