"""The evaluation run's settings (``EvalConfig``), its resolved plan (``RunPlan``) and the keys of its
records (docs/method.md §6; the choices behind them are in ``harness``'s docstring)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from ..engine.config import RESULT_OPTIONS, ExplainConfig
from ..errors import ConfigError
from ..segmentation.aggregation import AGGREGATIONS
from ..segmentation.segment import ASSIGN_RULES

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

#: The fast modes (``EvalConfig.explain``'s start block and compute dtype, and the target stride) and their
#: exact defaults: left out of the run key at these values (caches made before they existed stay valid).
FAST_MODE_DEFAULTS = {"start_block": 1, "compute_dtype": None, "target_stride": 1}
#: ``ExplainConfig`` options the evaluation sets itself, per scalar, layer and image.
EVAL_SETS = ("layer", "scalar", "targets", "weights", "size", "interpolation")
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

    ``explain``: the options of every ULTra explanation in the run (``ExplainConfig``: order, start block,
    compute dtype, backend, ...); the run sets layer, scalar, targets, weights and size itself. Fast modes
    (inexact; defaults = exact): ``explain.start_block`` (first block whose attention contributes),
    ``explain.compute_dtype`` (``"bfloat16"``: the batched backward in that dtype; ``"auto"`` is resolved
    against the model in ``make_plan``), ``target_stride`` (explain every k-th patch along rows and columns
    only).
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
    explain: ExplainConfig = field(default_factory=ExplainConfig)
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
        if isinstance(self.target_stride, bool) or not isinstance(self.target_stride, int) or self.target_stride < 1:
            raise ConfigError(f"target_stride must be a positive int; got {self.target_stride!r}")
        ExplainConfig.for_owner(self.explain, EVAL_SETS, "the evaluation")
        if not self.aggregations or self.aggregations[0] != "paper" or len(set(self.aggregations)) != len(
                self.aggregations) or any(a not in AGGREGATIONS for a in self.aggregations):
            raise ConfigError(f"aggregations must start with 'paper' (the others are cut to its segment counts) "
                              f"and name each of {list(AGGREGATIONS)} at most once; got {list(self.aggregations)}")

    @property
    def fast_modes(self) -> Dict[str, Any]:
        """What makes the maps differ from the exact default (empty: the exact mode): the explanation's
        result options that are not at their defaults, and the target stride where above 1."""
        modes = self.explain.changed(RESULT_OPTIONS)
        if self.target_stride != FAST_MODE_DEFAULTS["target_stride"]:
            modes["target_stride"] = self.target_stride
        return modes

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
    if key.get("order", "rollout") != "rollout":
        parts.append(f"{key['order']} chain order")
    if key.get("self_max", True) is not True:
        parts.append("self_max off")
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


