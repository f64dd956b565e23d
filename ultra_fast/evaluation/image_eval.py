"""One image of an evaluation run: its maps (cached), every segmentation setting, baselines, ITIoU and the
perturbation test, scored into one record."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..data.datasets import Sample
from ..engine import explain_with
from ..engine.config import ExplainConfig
from ..engine.options import eval_mode
from ..io import atomic_write
from ..models import Adapter
from ..segmentation import segment_maps
from ..segmentation.aggregation import has_own_count, needs_features
from ..segmentation.segment import grid_positions, nearest_token, strided_targets, token_partition
from .baselines import cls_rollout_map, feature_spectral, foreground_mask, kmeans_token_clusters, upsample_nearest
from .eval_config import (
    AUTO,
    CLS_ROLLOUT,
    DEFAULT_AGGREGATIONS,
    KMEANS_CLASSES,
    KMEANS_MATCHED,
    KMEANS_SEGMENTS,
    PERTURB_FRACTION,
    PERTURB_NOISE_STD,
    SPECTRAL_MATCHED,
    RunPlan,
    aggregation_key,
    maps_key,
    matched_key,
    ultra_key,
)
from .itiou import itiou_image
from .metrics import segment_histograms
from .perturbation import perturbation_test
from .record_cache import cache_path

PathLike = Union[str, Path]


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
                   config: ExplainConfig, maps_cache: Optional[PathLike] = None) -> torch.Tensor:
    """(n, h, w) maps of one preprocessed image at (``scalar``, ``layer``) with the run's other options
    (``config``); read from / written to ``maps_cache`` when given."""
    path = maps_file(maps_cache, plan, name, scalar, layer) if maps_cache is not None else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unreadable file is recomputed
            warnings.warn(f"cached maps {path} are unreadable ({e}); recomputing them")
    c = plan.config
    config = config.replace(layer=layer, scalar=scalar, weights=c.weights if scalar == "learned" else None)
    maps = explain_with(adapter, x, config)[0].detach().cpu()
    if path is not None:
        atomic_write(path, lambda tmp: torch.save(maps.contiguous(), tmp))
    return maps


def nearest_filled(maps: torch.Tensor, positions: Optional[np.ndarray]) -> torch.Tensor:
    """(n_sub, h, w) maps of the explained patches -> (h*w, h, w): every patch token gets the map of the
    nearest explained one (``segmentation.nearest_token``); unchanged when every patch was explained."""
    if positions is None:
        return maps
    grid = (int(maps.shape[1]), int(maps.shape[2]))
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
    h, w = adapter.grid_size(x)
    grid = (int(h), int(w))
    feats = last_layer_tokens(adapter, x)
    patches = pixel_patches(label.shape, grid)
    seed = image_seed(c.seed, sample.name)
    targets, positions = strided_targets(grid, adapter.num_prefix_tokens, c.target_stride)
    config = c.explain.replace(targets=targets)
    clock.lap("forward")

    p_scalar, p_layer, p_threshold = plan.primary
    ultra: Dict[str, Any] = {}
    itiou: Dict[str, List[float]] = {}
    primary_maps, primary_clusters = None, None
    sub_feats = feats if positions is None else feats[positions]
    matched: Dict[Tuple[str, int, float], np.ndarray] = {}  # the paper's cluster ids per (scalar, layer, ζ)
    for scalar in c.scalars:
        for layer in plan.layers:
            maps = explain_cached(adapter, plan, sample.name, x, scalar, layer, config, maps_cache)
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
                cuts: List[Tuple[Union[float, str], Optional[int]]] = [
                    (z, int(matched[(scalar, layer, float(z))].max()) + 1) for z in c.thresholds]
                if has_own_count(name):
                    cuts.append((AUTO, None))
                for zeta, k in cuts:
                    for assign in c.assigns:
                        seg = segment_maps(maps, label.shape, n_clusters=k, assign=assign,
                                           token_positions=positions, partition=other)
                        ultra[aggregation_key(name, scalar, layer, assign, zeta)] = segmentation_record(
                            seg.labels, label, C, ignore, patches, feats)
            clock.lap("segment")
            if (scalar, layer) == (p_scalar, p_layer):
                primary_maps = every

    baselines: Dict[str, Any] = {}
    n = grid[0] * grid[1]
    if "kmeans" in c.baselines:
        assert primary_clusters is not None  # the primary setting is one of the (scalar, layer, ζ) above
        for name, count in ((KMEANS_SEGMENTS, primary_clusters), (KMEANS_CLASSES, C)):
            ids = kmeans_token_clusters(feats, grid, min(int(count), n), seed=seed)
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
        assert primary_maps is not None  # the primary (scalar, layer) was explained above
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


