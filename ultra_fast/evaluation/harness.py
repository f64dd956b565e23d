"""The evaluation run (docs/method.md §6): per-image records, cached and resumable, summarised from the cache alone.

One image costs one preprocessing, one graph-free forward (the last-layer patch tokens) and one
``explain`` per (scalar, layer); every (ζ, assign rule) is then segmented from the same maps. What is
kept per image is small and protocol-agnostic (``OUT/cache/<sample>.pt``, written atomically before the
next image starts):

- for every segmentation (ULTra settings and baselines): the (K, C) class histogram of each segment id
  (valid pixels only) and the (K, D) mean feature of each segment. The per-image protocol rebuilds the
  confusion matrix from the histogram; the dataset-wide protocol clusters the features over the split;
- ITIoU of every (scalar, layer) at every τ; the perturbation distances of the primary setting;
- seconds per stage.

That is about K·D·4 bytes per segmentation setting (24 settings x 10 segments x 384 dims: 0.4 MB per
image). ``OUT/run.json`` holds the settings the records were made with (a different request is refused)
and the images of the latest run, which are the ones ``summarise`` scores.

Choices, documented here and in ``results.json`` (``notes``):

- **Features** (k-means baselines and the dataset-wide protocol's segment features) are the last
  block's residual-stream patch tokens (before any final norm), whatever layer is explained: the most
  semantic tokens, and one representation for every method so that the protocol compares segmentations,
  not features. A segment's feature is the mean of the patch tokens weighted by the number of the
  segment's pixels (at label resolution, ignored pixels included: they are image content) lying in each
  token's patch, so it is defined for any segmentation and any pixel rule.
- **Primary setting**: the first requested scalar at the last requested layer, cut at ζ = 0.4 when
  requested (docs/method.md §4 default), else at the first ζ. The perturbation test (4k perturbed forwards per
  image) runs only for its maps; the k-means baseline "k = segments" uses its cluster count.
- **Baselines**: k-means (scikit-learn, seeded) on the L2-normalised last-layer tokens with k = the
  primary setting's clusters and with k = the number of classes, nearest-upsampled; the CLS token's
  gradient rollout (ULTra_S engine with target CLS, last block), thresholded at its mean into
  foreground/background, only for datasets whose class 0 is "background" (VOC) and models with a CLS.
- **Seeds**: each image's seed (k-means, perturbation tokens and noise) is derived from ``seed`` and the
  sample name, so a number never depends on which slice of the split a run covers.
- **Fast modes** (``start_block``, ``compute_dtype``, ``target_stride``; exact by default) apply to every
  ULTra explanation of the run, never to the baselines. With ``target_stride`` k > 1 only every k-th
  patch is explained: segmentation clusters those maps (``segment_maps(token_positions=...)``), and ITIoU
  and the perturbation test score every token with the map of its nearest explained token (the fast
  mode's stand-in for the map it did not compute). At their defaults these fields are left out of the
  run's key, so caches made before they existed stay valid. ``results.json`` names the mode (``mode``).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..data.datasets import Sample, SegDataset
from ..engine.options import eval_mode, parse_compute_dtype, resolve_layer
from ..errors import CheckpointError, ConfigError
from ..io import atomic_write
from ..models import Adapter, wrap
from ..segmentation import segment_maps
from ..segmentation.aggregation import AGGREGATIONS, needs_features
from ..segmentation.segment import ASSIGN_RULES, grid_positions, nearest_token, strided_targets, token_partition
from .baselines import cls_rollout_map, feature_spectral, foreground_mask, kmeans_token_clusters, upsample_nearest
from .itiou import ITIoU, itiou_image
from .metrics import DatasetWideMatching, PerImageMatching, segment_histograms
from .perturbation import PerturbationScores, perturbation_test

PathLike = Union[str, Path]

FORMAT = "ultra_fast.eval"
VERSION = 1
SCALARS = ("sum", "energy", "norm", "learned")
PROTOCOLS = ("per-image", "dataset")
BASELINES = ("kmeans", "cls_rollout")
DEFAULT_THRESHOLDS = (0.25, 0.3, 0.4, 0.5)
DEFAULT_TAUS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PERTURB_FRACTION = 0.25  # docs/method.md §6 leaves the removed share open; perturbation_test's default
PERTURB_NOISE_STD = 0.3  # docs/method.md §6

# Baseline record names (keys of a record's "baselines").
KMEANS_SEGMENTS = "kmeans_k=segments"
KMEANS_CLASSES = "kmeans_k=classes"
# Feature baselines at equal segment counts (with aggregations beyond the paper's): name prefixes.
KMEANS_MATCHED = "kmeans"
SPECTRAL_MATCHED = "feature_spectral"
CLS_ROLLOUT = "cls_rollout"

NOTES = {
    "features": "last-block residual-stream patch tokens (before the final norm), whatever layer is explained; "
                "a segment's feature = mean of the tokens weighted by its pixels in each token's patch",
    "primary": "first scalar, last layer, zeta = 0.4 if requested else the first; perturbation test and "
               "k-means 'k = segments' use it",
    "per-image": "Hungarian match of each image's segments to the classes present (oracle per segment: optimistic)",
    "dataset": "k-means (k = classes, L2-normalised segment features) gives shared ids over the split, then one "
               "Hungarian match on the dataset confusion matrix",
    "kmeans": "scikit-learn KMeans on L2-normalised last-layer patch tokens, nearest-upsampled",
    "aggregations": "strategies other than the paper's are cut, image by image, to the paper's cluster count at "
                    "the same (scalar, layer, zeta) (equal segment counts); 'auto' rows use the strategy's own "
                    "count (eigengap). Feature baselines with k = ULTra segments do the same per (scalar, layer, "
                    "zeta); feature spectral = Deep Spectral Methods' normalised cut of the feature affinity "
                    "(cosine clipped at 0, no colour term), k-means on its first k eigenvectors",
    "cls_rollout": "CLS gradient rollout (ULTra_S, target CLS, last block), bilinear to label size, foreground = "
                   "min-max scaled map >= its mean; only where class 0 is background",
    "mode": "fast modes apply to every ULTra explanation, not to the baselines; with a target stride k > 1 only "
            "every k-th patch is explained and clustered, the token rule gives each pixel the cluster of the "
            "nearest explained token, and ITIoU / perturbation use each token's nearest explained map",
}

#: The fast-mode fields of ``EvalConfig`` and their (exact) defaults: left out of the run key at these values.
FAST_MODE_DEFAULTS = {"start_block": 1, "compute_dtype": None, "target_stride": 1}
#: The paper's aggregation alone: the default, left out of the run key (earlier caches stay valid).
DEFAULT_AGGREGATIONS = ("paper",)
#: Spectral strategies also get a row with their own segment count (the eigengap rule).
AUTO = "auto"


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation run computes.

    ``size``: model input, an int (shorter side, aspect kept, as ``model.preprocess``) or (H, W) exactly;
    ``layers`` as requested (negative from the end); ``weights``: a W checkpoint path, needed by (and
    only by) the scalar ``"learned"`` (W fixes the patch grid: give the (H, W) it was trained at).

    Fast modes (inexact; defaults = exact): ``start_block`` (first block whose attention contributes),
    ``compute_dtype`` (``"bfloat16"``: the batched backward in that dtype), ``target_stride`` (explain
    every k-th patch along rows and columns only).
    """

    size: Union[int, Tuple[int, int]] = 224
    scalars: Tuple[str, ...] = ("sum",)
    layers: Tuple[int, ...] = (-1,)
    assigns: Tuple[str, ...] = ASSIGN_RULES
    thresholds: Tuple[float, ...] = DEFAULT_THRESHOLDS
    protocols: Tuple[str, ...] = PROTOCOLS
    baselines: Tuple[str, ...] = BASELINES
    taus: Tuple[float, ...] = DEFAULT_TAUS
    perturbation: bool = True
    perturb_k: int = 10
    weights: Optional[str] = None
    seed: int = 0
    start_block: int = 1
    compute_dtype: Optional[str] = None
    target_stride: int = 1
    aggregations: Tuple[str, ...] = DEFAULT_AGGREGATIONS

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        size_ok = (isinstance(self.size, int) and self.size >= 1) or (
            isinstance(self.size, tuple) and len(self.size) == 2 and all(isinstance(v, int) and v >= 1
                                                                         for v in self.size))
        if not size_ok:
            raise ConfigError(f"size must be a positive int (the shorter image side) or (H, W) input pixels; got "
                              f"{self.size!r}")
        for name, values, allowed in (("scalars", self.scalars, SCALARS), ("assigns", self.assigns, ASSIGN_RULES),
                                      ("protocols", self.protocols, PROTOCOLS)):
            if not values:
                raise ConfigError(f"{name} must not be empty")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ConfigError(f"unknown {name} {bad}; expected some of {list(allowed)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} repeat: {list(values)}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ConfigError(f"unknown baselines {bad}; expected some of {list(BASELINES)} (or none)")
        if ("learned" in self.scalars) != (self.weights is not None):
            raise ConfigError('the scalar "learned" needs weights (a W checkpoint), and weights need "learned"')
        if self.weights is not None and not Path(self.weights).is_file():
            raise FileNotFoundError(f"W checkpoint not found: {self.weights}")
        if not self.layers or any(not isinstance(l, int) or l == 0 for l in self.layers):
            raise ConfigError(f"layers must be non-zero ints (1..L, or negative from the end); got {self.layers}")
        if not self.thresholds or any(not 0.0 < float(z) <= 2.0 for z in self.thresholds):
            raise ConfigError(f"thresholds must be cosine-distance cuts in (0, 2]; got {list(self.thresholds)}")
        if len(set(self.thresholds)) != len(self.thresholds):
            raise ConfigError(f"thresholds repeat: {list(self.thresholds)}")
        if any(not 0.0 <= float(t) <= 1.0 for t in self.taus):  # none: no ITIoU (a segmentation-only sweep)
            raise ConfigError(f"taus must be ITIoU thresholds in [0, 1]; got {list(self.taus)}")
        if len(set(self.taus)) != len(self.taus):
            raise ConfigError(f"taus repeat: {list(self.taus)}")
        if not isinstance(self.perturb_k, int) or self.perturb_k < 1:
            raise ConfigError(f"perturb_k must be a positive int; got {self.perturb_k!r}")
        for name in ("start_block", "target_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int; got {value!r}")
        if not self.aggregations or self.aggregations[0] != "paper" or len(set(self.aggregations)) != len(
                self.aggregations) or any(a not in AGGREGATIONS for a in self.aggregations):
            raise ConfigError(f"aggregations must start with 'paper' (the others are cut to its segment counts) "
                              f"and name each of {list(AGGREGATIONS)} at most once; got {list(self.aggregations)}")
        parse_compute_dtype(self.compute_dtype)

    @property
    def fast_modes(self) -> Dict[str, Any]:
        """The fast-mode fields that differ from their exact defaults (empty: the exact mode)."""
        return {k: getattr(self, k) for k, v in FAST_MODE_DEFAULTS.items() if getattr(self, k) != v}

    @property
    def primary_threshold(self) -> float:
        return 0.4 if 0.4 in self.thresholds else float(self.thresholds[0])


def ultra_key(scalar: str, layer: int, assign: str, threshold: float) -> str:
    """Name of one ULTra segmentation setting in a record (``layer`` resolved, 1..L)."""
    return f"{scalar}|L{layer}|{assign}|z{float(threshold)!r}"  # repr: distinct floats never share a key


def aggregation_key(aggregation: str, scalar: str, layer: int, assign: str, threshold: Union[float, str]) -> str:
    """Name of a non-paper aggregation's setting: cut to the paper's cluster count at ζ = ``threshold``
    (equal segment counts), or ``AUTO`` (the strategy's own rule)."""
    z = threshold if threshold == AUTO else f"z{float(threshold)!r}"
    return f"{aggregation}|{scalar}|L{layer}|{assign}|{z}"


def matched_key(baseline: str, scalar: str, layer: int, threshold: float) -> str:
    """Name of a feature baseline with k = the paper's clusters of (scalar, layer, ζ) on each image."""
    return f"{baseline}|{scalar}|L{layer}|z{float(threshold)!r}"


def maps_key(scalar: str, layer: int) -> str:
    return f"{scalar}|L{layer}"


def mode_of(key: Dict[str, Any]) -> Dict[str, Any]:
    """The mode a run key was made in: every fast-mode field (defaults filled in) and a readable name."""
    mode: Dict[str, Any] = {k: key.get(k, v) for k, v in FAST_MODE_DEFAULTS.items()}
    parts = []
    if mode["compute_dtype"] is not None:
        parts.append(f"{mode['compute_dtype']} backward")
    if mode["start_block"] != 1:
        parts.append(f"start block {mode['start_block']}")
    if mode["target_stride"] != 1:
        parts.append(f"target stride {mode['target_stride']}")
    mode["name"] = ", ".join(parts) if parts else "exact"
    return mode


# ---------------------------------------------------------------------------------------------------------
# Run settings (OUT/run.json) and the cache


@dataclass
class RunPlan:
    """An ``EvalConfig`` resolved against a model and a dataset: what every cached record was made with."""

    config: EvalConfig
    layers: Tuple[int, ...]          # resolved, 1..L, in request order
    dataset: Dict[str, Any]          # name, root, split, num_classes, class_names, ignore_index
    model: Dict[str, Any]            # name and whatever identifies the weights (checkpoint, dtype, ...)
    weights_sha256: Optional[str] = None
    cls_rollout: bool = False        # the baseline applies (background class and a CLS token)

    @property
    def primary(self) -> Tuple[str, int, float]:
        return self.config.scalars[0], self.layers[-1], self.config.primary_threshold

    def key(self) -> Dict[str, Any]:
        """Everything a cached per-image record depends on (protocols and the image selection do not)."""
        c = self.config
        return {"format": FORMAT, "version": VERSION, "dataset": self.dataset, "model": self.model,
                "size": list(c.size) if isinstance(c.size, tuple) else c.size, "scalars": list(c.scalars),
                "layers": list(self.layers),
                "assigns": list(c.assigns), "thresholds": [float(z) for z in c.thresholds],
                "baselines": list(c.baselines), "cls_rollout": self.cls_rollout,
                "taus": [float(t) for t in c.taus], "perturbation": c.perturbation, "perturb_k": c.perturb_k,
                "weights": str(Path(c.weights).resolve()) if c.weights else None,
                "weights_sha256": self.weights_sha256, "seed": c.seed,
                # only where not exact: a cache written before these fields existed keeps its key and digest
                **c.fast_modes,
                **({"aggregations": list(c.aggregations)} if c.aggregations != DEFAULT_AGGREGATIONS else {})}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]


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


def image_seed(seed: int, name: str) -> int:
    """A seed for one image from the run seed and the sample name (independent of the run's slice)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31)


def last_layer_tokens(adapter: Adapter, x: torch.Tensor) -> np.ndarray:
    """(n, D) float32 patch tokens after the last block (residual stream, before any final norm)."""
    with torch.no_grad(), eval_mode(adapter):
        z = adapter.run(x).tokens
    return z[0, adapter.num_prefix_tokens:].float().cpu().numpy()


def pixel_patches(size: Tuple[int, int], grid: Tuple[int, int]) -> np.ndarray:
    """(H*W,) patch index (row-major) of every pixel of an H x W label laid over the h x w patch grid: the
    patch holding the pixel's centre (the same convention as ``upsample_nearest``)."""
    H, W = size
    h, w = grid
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return (rows[:, None] * w + cols[None, :]).reshape(-1)


def segment_features(pred: np.ndarray, patches: np.ndarray, features: np.ndarray, K: int) -> np.ndarray:
    """(K, D) float32: each segment's token features averaged with weights = its pixels in each patch.

    Rows of ids without pixels are NaN (their histogram row is empty, so no protocol uses them).
    """
    n = features.shape[0]
    ids = pred.reshape(-1).astype(np.int64)
    counts = np.bincount(ids * n + patches, minlength=K * n).reshape(K, n).astype(np.float64)
    total = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (counts @ features.astype(np.float64)) / total
    return out.astype(np.float32)


def segmentation_record(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int,
                        patches: np.ndarray, features: np.ndarray) -> Dict[str, Any]:
    """What the protocols need of one segmentation: class histograms, mean features, segment count."""
    pred = np.asarray(pred).astype(np.int64)
    K = int(pred.max()) + 1
    return {"hist": segment_histograms(pred, label, K, num_classes, ignore_index).astype(np.int32),
            "features": segment_features(pred, patches, features, K),
            "segments": int(len(np.unique(pred)))}


class _Stopwatch:
    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now


def maps_file(maps_cache: PathLike, plan: RunPlan, name: str, scalar: str, layer: int) -> Path:
    """``MAPS/<sample>/<scalar>_L<layer>_<digest>.pt``: one image's maps for one (scalar, layer), keyed by
    everything they depend on (model, dataset, input size, weights, fast modes), not by how they are
    segmented or scored, so that runs sweeping segmentation settings share them."""
    c = plan.config
    key = {"model": plan.model, "dataset": plan.dataset, "name": name, "scalar": scalar, "layer": int(layer),
           "size": list(c.size) if isinstance(c.size, tuple) else c.size,
           "weights_sha256": plan.weights_sha256 if scalar == "learned" else None, **c.fast_modes}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_path(maps_cache, name).with_suffix("") / f"{scalar}_L{int(layer)}_{digest}.pt"


def explain_cached(adapter: Adapter, plan: RunPlan, name: str, x: torch.Tensor, scalar: str, layer: int,
                   maps_cache: Optional[PathLike] = None, **fast) -> torch.Tensor:
    """(n, h, w) maps of one preprocessed image; read from / written to ``maps_cache`` when given."""
    from ..engine import explain
    path = maps_file(maps_cache, plan, name, scalar, layer) if maps_cache is not None else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unreadable file is recomputed
            warnings.warn(f"cached maps {path} are unreadable ({e}); recomputing them")
    c = plan.config
    maps = explain(adapter, x, layer=layer, scalar=scalar, weights=c.weights if scalar == "learned" else None,
                   **fast)[0].detach().cpu()
    if path is not None:
        atomic_write(path, lambda tmp: torch.save(maps.contiguous(), tmp))
    return maps


def nearest_filled(maps: torch.Tensor, positions: Optional[np.ndarray]) -> torch.Tensor:
    """(n_sub, h, w) maps of the explained patches -> (h*w, h, w): every patch token gets the map of the
    nearest explained one (``segmentation.nearest_token``); unchanged when every patch was explained."""
    if positions is None:
        return maps
    grid = tuple(maps.shape[1:])
    nearest = nearest_token(grid_positions(positions, grid, maps.shape[0]), grid, grid)
    return maps[torch.from_numpy(nearest.reshape(-1))]


def evaluate_image(adapter: Adapter, plan: RunPlan, sample: Sample, image, label: np.ndarray,
                   maps_cache: Optional[PathLike] = None) -> Dict[str, Any]:
    """Every number of one image that the summary needs (see the module docstring). Each (scalar, layer)'s
    maps are clustered once (one linkage) and cut at every ζ; ``maps_cache``: see ``explain_cached``."""
    c = plan.config
    C, ignore = plan.dataset["num_classes"], plan.dataset["ignore_index"]
    clock = _Stopwatch()
    x = adapter.preprocess(image, size=c.size)
    grid = tuple(adapter.grid_size(x))
    feats = last_layer_tokens(adapter, x)
    patches = pixel_patches(label.shape, grid)
    seed = image_seed(c.seed, sample.name)
    targets, positions = strided_targets(grid, adapter.num_prefix_tokens, c.target_stride)
    fast = dict(start_block=c.start_block, compute_dtype=c.compute_dtype, targets=targets)
    clock.lap("forward")

    p_scalar, p_layer, p_threshold = plan.primary
    ultra: Dict[str, Any] = {}
    itiou: Dict[str, List[float]] = {}
    primary_maps, primary_clusters = None, None
    sub_feats = feats if positions is None else feats[positions]
    matched: Dict[Tuple[str, int, float], np.ndarray] = {}  # the paper's cluster ids per (scalar, layer, ζ)
    for scalar in c.scalars:
        for layer in plan.layers:
            maps = explain_cached(adapter, plan, sample.name, x, scalar, layer, maps_cache, **fast)
            clock.lap("explain")
            every = nearest_filled(maps, positions)
            values = itiou_image(every, label, tau=c.taus, ignore_index=ignore) if c.taus else {}
            itiou[maps_key(scalar, layer)] = [float(values[float(t)]) for t in c.taus]
            clock.lap("itiou")
            partition = token_partition(maps, token_positions=positions)  # one linkage for every cut
            for z in c.thresholds:
                for assign in c.assigns:
                    seg = segment_maps(maps, label.shape, threshold=float(z), assign=assign,
                                       token_positions=positions, partition=partition)
                    ultra[ultra_key(scalar, layer, assign, z)] = segmentation_record(
                        seg.labels, label, C, ignore, patches, feats)
                    if (scalar, layer, float(z)) == (p_scalar, p_layer, p_threshold):
                        primary_clusters = int(seg.token_clusters.max()) + 1
                matched[(scalar, layer, float(z))] = partition.cut(float(z))
            for name in c.aggregations[1:]:
                other = token_partition(maps, token_positions=positions, aggregation=name,
                                        features=sub_feats if needs_features(name) else None, seed=seed)
                cuts = [(z, int(matched[(scalar, layer, float(z))].max()) + 1) for z in c.thresholds]
                if not name.startswith("paper"):
                    cuts.append((AUTO, None))
                for z, k in cuts:
                    for assign in c.assigns:
                        seg = segment_maps(maps, label.shape, n_clusters=k, assign=assign,
                                           token_positions=positions, partition=other)
                        ultra[aggregation_key(name, scalar, layer, assign, z)] = segmentation_record(
                            seg.labels, label, C, ignore, patches, feats)
            clock.lap("segment")
            if (scalar, layer) == (p_scalar, p_layer):
                primary_maps = every

    baselines: Dict[str, Any] = {}
    n = grid[0] * grid[1]
    if "kmeans" in c.baselines:
        for name, k in ((KMEANS_SEGMENTS, primary_clusters), (KMEANS_CLASSES, C)):
            ids = kmeans_token_clusters(feats, grid, min(int(k), n), seed=seed)
            pred = upsample_nearest(ids, label.shape)
            baselines[name] = segmentation_record(pred, label, C, ignore, patches, feats)
        clock.lap("baselines")
    if "kmeans" in c.baselines and c.aggregations != DEFAULT_AGGREGATIONS:
        # the feature baselines at the paper's segment count of every (scalar, layer, ζ), image by image
        spectral = feature_spectral(feats, seed=seed)
        for (scalar, layer, z), ids in matched.items():
            k = min(int(ids.max()) + 1, n)
            for prefix, tokens in ((KMEANS_MATCHED, kmeans_token_clusters(feats, grid, k, seed=seed)),
                                   (SPECTRAL_MATCHED, spectral.cut(n_clusters=k).reshape(grid))):
                baselines[matched_key(prefix, scalar, layer, z)] = segmentation_record(
                    upsample_nearest(tokens, label.shape), label, C, ignore, patches, feats)
        clock.lap("baselines")
    if "cls_rollout" in c.baselines and plan.cls_rollout:
        m = cls_rollout_map(adapter, x, layer=-1, scalar="sum", size=tuple(label.shape))
        pred = foreground_mask(m)
        baselines[CLS_ROLLOUT] = segmentation_record(pred, label, C, ignore, patches, feats)
        clock.lap("baselines")

    perturbation = None
    if c.perturbation and n >= 3:
        perturbation = perturbation_test(adapter, x, primary_maps, layer=p_layer, k=min(c.perturb_k, n),
                                         fraction=PERTURB_FRACTION, noise_std=PERTURB_NOISE_STD, seed=seed)
        clock.lap("perturbation")
    seconds = dict(clock.seconds)
    seconds["total"] = float(sum(clock.seconds.values()))
    return {"name": sample.name, "digest": plan.digest(), "label_size": list(label.shape), "grid": list(grid),
            "device": str(adapter.device), "ultra": ultra, "itiou": itiou, "baselines": baselines,
            "perturbation": perturbation, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------------
# The run


def make_plan(adapter: Adapter, dataset: SegDataset, config: EvalConfig,
              model_info: Optional[Dict[str, Any]] = None) -> RunPlan:
    """Resolve ``config`` against the model (layers) and the dataset (classes, baseline applicability)."""
    config.validate()
    layers = tuple(dict.fromkeys(resolve_layer(int(l), adapter.num_blocks) for l in config.layers))
    if len(layers) != len(config.layers):
        raise ConfigError(f"layers {list(config.layers)} name the same block twice (resolved: "
                          f"{[resolve_layer(int(l), adapter.num_blocks) for l in config.layers]})")
    if config.start_block > min(layers):
        raise ConfigError(f"start_block {config.start_block} lies after layer {min(layers)}: every explained layer "
                          f"needs start_block <= layer")
    info = {"name": dataset.name, "root": str(Path(dataset.root).resolve()), "split": dataset.split,
            "num_classes": int(dataset.num_classes), "class_names": list(dataset.class_names),
            "ignore_index": int(dataset.ignore_index)}
    model = dict(model_info) if model_info else {"name": adapter.name}
    model.setdefault("dtype", str(adapter.dtype).replace("torch.", ""))
    background = bool(dataset.class_names) and dataset.class_names[0].lower() == "background"
    return RunPlan(config, layers, info, model,
                   weights_sha256=_sha256(config.weights) if config.weights else None,
                   cls_rollout=background and adapter.num_prefix_tokens >= 1)


def run_evaluation(model: Union[nn.Module, Adapter], dataset: SegDataset, config: EvalConfig, out: PathLike,
                   model_info: Optional[Dict[str, Any]] = None, overwrite: bool = False,
                   progress: bool = True, maps_cache: Optional[PathLike] = None) -> Dict[str, Any]:
    """Evaluate every sample of ``dataset`` (already sliced by the caller), caching each image's record in
    ``OUT/cache`` before the next; images cached with the same settings are skipped. Writes and returns
    the summary (``summarise``).

    ``model_info``: what identifies the model in ``OUT/run.json`` (default: the adapter's name and dtype);
    a cache made for another model, dataset or settings is refused unless ``overwrite``. ``maps_cache``:
    a folder keeping every image's maps (``explain_cached``), shared by runs that differ only in how the
    maps are segmented or scored (ζ, rules, aggregations), so that such a sweep explains each image once.
    """
    from tqdm.auto import tqdm
    adapter = wrap(model)
    plan = make_plan(adapter, dataset, config, model_info)
    names = [s.name for s in dataset.samples]
    if len(set(names)) != len(names):
        raise ConfigError(f"{dataset.name}: sample names repeat; they name the cache files")
    prepare_out(out, plan, names, overwrite)
    digest = plan.digest()
    todo = []
    for s in dataset.samples:
        path = cache_path(out, s.name)
        if path.is_file():
            try:
                if load_record(path).get("digest") == digest:
                    continue
            except ValueError as e:
                warnings.warn(f"{e}; recomputing it")
        todo.append(s)
    bar = tqdm(total=len(names), initial=len(names) - len(todo), unit="img", desc=f"eval {dataset.name}",
               disable=not progress)
    for s in todo:
        label = dataset.load_label(s)
        record = evaluate_image(adapter, plan, s, dataset.load_image(s), label,
                                **({"maps_cache": maps_cache} if maps_cache is not None else {}))
        save_record(cache_path(out, s.name), record)
        bar.set_postfix(s_per_img=f"{record['seconds']['total']:.1f}")
        bar.update(1)
    bar.close()
    return summarise(out)


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
            for z in [float(z) for z in key["thresholds"]] + ([] if g.startswith("paper") else [AUTO])
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
        for (g, s, l, a, z), sc in aggs.items():
            sc.update(rec["ultra"][aggregation_key(g, s, l, a, z)])
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

