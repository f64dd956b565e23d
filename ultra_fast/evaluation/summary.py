"""The summary of an evaluation run, from ``OUT/run.json`` and ``OUT/cache`` alone (both protocols)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

import numpy as np

from ..errors import ConfigError
from ..segmentation.aggregation import has_own_count
from .eval_config import (
    AUTO,
    CLS_ROLLOUT,
    DEFAULT_AGGREGATIONS,
    FORMAT,
    KMEANS_CLASSES,
    KMEANS_MATCHED,
    KMEANS_SEGMENTS,
    NOTES,
    PERTURB_FRACTION,
    PERTURB_NOISE_STD,
    SPECTRAL_MATCHED,
    VERSION,
    aggregation_key,
    maps_key,
    matched_key,
    mode_of,
    ultra_key,
)
from .itiou import ITIoU
from .metrics import DatasetWideMatching, PerImageMatching
from .perturbation import PerturbationScores
from .record_cache import cache_path, load_record

PathLike = Union[str, Path]

# ---------------------------------------------------------------------------------------------------------
# Summary (from OUT/run.json and OUT/cache only)


def _confusion_from_hist(hist: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The per-image confusion matrix (segments with valid pixels x classes present) and its class ids:
    exactly what ``metrics.confusion`` gives on the pixel arrays."""
    rows, cols = hist.sum(1) > 0, hist.sum(0) > 0
    return hist[rows][:, cols].astype(np.int64), np.flatnonzero(cols)


@dataclass
class _Scores:
    """Both protocols' accumulators for one method/setting."""

    per_image: PerImageMatching
    dataset: DatasetWideMatching
    segments: List[int] = field(default_factory=list)

    def update(self, rec: Dict[str, Any]) -> None:
        hist = np.asarray(rec["hist"]).astype(np.int64)
        self.per_image.update_confusion(*_confusion_from_hist(hist))
        self.dataset.update_segments(hist, np.asarray(rec["features"], dtype=np.float64))
        self.segments.append(int(rec["segments"]))


def _clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


ROW_FIELDS = ("method", "aggregation", "baseline", "scalar", "layer", "assign", "threshold", "k")


def _row(scores: _Scores, protocol: str, **fields) -> Dict[str, Any]:
    s = scores.per_image.summary() if protocol == "per-image" else scores.dataset.summary()
    row = {f: fields.get(f) for f in ROW_FIELDS}
    row.update(mIoU=s["mIoU"], accuracy=s["accuracy"], classes=s["classes"],
               mean_segments=float(np.mean(scores.segments)) if scores.segments else float("nan"))
    if protocol == "dataset":
        row["clustered_segments"] = s["segments"]
    return row


def summarise(out: PathLike, write: bool = True) -> Dict[str, Any]:
    """Aggregate the cached records of the run's selected images into the results (docs/method.md §6 metrics).

    Needs only ``OUT/run.json`` and ``OUT/cache``; with ``write``, also writes ``OUT/results.json``,
    ``OUT/results.md`` and the plots (``report.write_report``). Images without a record (an unfinished
    run) are listed under ``images.missing`` and left out of every number.
    """
    from .report import write_report
    out = Path(out)
    run_file = out / "run.json"
    if not run_file.is_file():
        raise FileNotFoundError(f"no evaluation run in {out}: {run_file} not found")
    run = json.loads(run_file.read_text())
    if run.get("format") != FORMAT:
        raise ConfigError(f"{run_file} is not an ultra_fast evaluation run (format {FORMAT!r})")
    key, protocols = run["key"], run["protocols"]
    C, ignore = key["dataset"]["num_classes"], key["dataset"]["ignore_index"]
    taus = [float(t) for t in key["taus"]]
    seed = int(key["seed"])

    def new_scores() -> _Scores:
        return _Scores(PerImageMatching(ignore_index=ignore), DatasetWideMatching(C, ignore, seed))

    ultra = {(s, l, a, float(z)): new_scores() for s in key["scalars"] for l in key["layers"]
             for z in key["thresholds"] for a in key["assigns"]}
    base_names = []
    if "kmeans" in key["baselines"]:
        base_names += [KMEANS_SEGMENTS, KMEANS_CLASSES]
    if "cls_rollout" in key["baselines"] and key["cls_rollout"]:
        base_names.append(CLS_ROLLOUT)
    base = {b: new_scores() for b in base_names}
    aggregations = key.get("aggregations", list(DEFAULT_AGGREGATIONS))
    aggs = {(g, s, l, a, z): new_scores() for g in aggregations[1:] for s in key["scalars"] for l in key["layers"]
            for z in [float(z) for z in key["thresholds"]] + ([AUTO] if has_own_count(g) else [])
            for a in key["assigns"]}
    matched = {}
    if "kmeans" in key["baselines"] and len(aggregations) > 1:
        matched = {(b, s, l, float(z)): new_scores() for b in (KMEANS_MATCHED, SPECTRAL_MATCHED)
                   for s in key["scalars"] for l in key["layers"] for z in key["thresholds"]}
    itiou = {(s, l): ITIoU() for s in key["scalars"] for l in key["layers"]}
    perturbation = PerturbationScores()
    seconds: Dict[str, List[float]] = {}
    scored, missing, devices = [], [], set()
    digest = run["digest"]
    for name in run["images"]:
        path = cache_path(out, name)
        if not path.is_file():
            missing.append(name)
            continue
        rec = load_record(path)
        if rec.get("digest") != digest:
            missing.append(name)  # a stale record from other settings: never mix it in
            continue
        scored.append(name)
        devices.add(rec.get("device", "?"))
        for (s, l, a, z), sc in ultra.items():
            sc.update(rec["ultra"][ultra_key(s, l, a, z)])
        for b, sc in base.items():
            sc.update(rec["baselines"][b])
        for (g, s, l, a, zeta), sc in aggs.items():  # zeta: a threshold or AUTO
            sc.update(rec["ultra"][aggregation_key(g, s, l, a, zeta)])
        for (b, s, l, z), sc in matched.items():
            sc.update(rec["baselines"][matched_key(b, s, l, z)])
        for (s, l), acc in itiou.items():
            acc.update(dict(zip(taus, rec["itiou"][maps_key(s, l)])))
        if rec.get("perturbation"):
            perturbation.update(rec["perturbation"])
        for stage, v in rec["seconds"].items():
            seconds.setdefault(stage, []).append(float(v))
    if not scored:
        raise ConfigError(f"{out}: none of the {len(run['images'])} selected images has a cached record yet")

    tables: Dict[str, List[Dict[str, Any]]] = {}
    for protocol in protocols:
        rows = [_row(sc, protocol, method="ULTra", aggregation="paper", scalar=s, layer=l, assign=a, threshold=z)
                for (s, l, a, z), sc in ultra.items()]
        rows += [_row(sc, protocol, method="ULTra", aggregation=g, scalar=s, layer=l, assign=a, threshold=z)
                 for (g, s, l, a, z), sc in aggs.items()]
        for b, sc in base.items():
            method = "k-means" if b.startswith("kmeans") else "CLS rollout"
            k = {KMEANS_SEGMENTS: "segments", KMEANS_CLASSES: "classes"}.get(b)
            rows.append(_row(sc, protocol, method=method, baseline=b, k=k))
        for (b, s, l, z), sc in matched.items():
            rows.append(_row(sc, protocol, method="k-means" if b == KMEANS_MATCHED else "feature spectral",
                             baseline=matched_key(b, s, l, z), k="segments", scalar=s, layer=l, threshold=z))
        tables[protocol] = rows
    p_scalar, p_layer = run["primary"]["scalar"], run["primary"]["layer"]
    results = {
        "format": FORMAT, "version": VERSION,
        "dataset": key["dataset"], "model": key["model"],
        "settings": {k: v for k, v in key.items() if k not in ("format", "version", "dataset", "model")},
        "protocols": protocols, "primary": run["primary"], "mode": mode_of(key), "notes": NOTES,
        "images": {"selected": len(run["images"]), "scored": len(scored), "missing": missing},
        "timing": {"seconds_per_image": float(np.mean(seconds["total"])),
                   "stage_seconds_per_image": {k: float(np.mean(v)) for k, v in seconds.items() if k != "total"},
                   "total_seconds": float(np.sum(seconds["total"])), "devices": sorted(devices)},
        "segmentation": tables,
        "itiou": [] if not taus else [{"scalar": s, "layer": l, "images": acc.counts.get(taus[0], 0),
                   "values": {repr(t): v for t, v in acc.summary().items()}} for (s, l), acc in itiou.items()],
        "perturbation": ({"scalar": p_scalar, "layer": p_layer, "k": key["perturb_k"],
                          "fraction": PERTURB_FRACTION, "noise_std": PERTURB_NOISE_STD,
                          "modes": perturbation.summary()} if key["perturbation"] else None),
    }
    results = _clean(results)
    if write:
        write_report(results, out)
    return results

