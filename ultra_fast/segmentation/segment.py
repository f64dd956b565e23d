"""Zero-shot segmentation from the maps of all patch tokens (docs/method.md §4), or of a strided subset of them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import explain_with
from ..engine.config import ExplainConfig
from ..engine.targets import stride_targets
from ..errors import ConfigError, InputError
from ..models import wrap
from .aggregation import AGGREGATIONS, Partition, aggregate, last_layer_tokens, needs_features
from .cluster import min_max

ASSIGN_RULES = ("argmax", "token")
#: Pixels x explained tokens compared at once by ``nearest_token`` (128 MiB of int64).
NEAREST_BUDGET = 1 << 24

Positions = Union[np.ndarray, torch.Tensor, Sequence[int], Sequence[Sequence[int]]]

@dataclass
class Segmentation:
    """One image's segmentation.

    labels: (H, W) int32 segment id per pixel, at the requested (original) resolution.
    cluster_maps: (K, H, W) float32 min-max scaled summed maps of each cluster.
    token_clusters: (h, w) cluster id of every patch token (with a subset of explained tokens: the
        cluster of the nearest explained token, see ``nearest_token``).
    linkage: (n-1, 4) the dendrogram (scipy format) of the clustered token maps.
    token_positions: (n_sub, 2) (row, col) of the explained tokens, in map order; None when all were.
    """

    labels: np.ndarray
    cluster_maps: np.ndarray
    token_clusters: np.ndarray
    linkage: np.ndarray
    token_positions: Optional[np.ndarray] = None

    @property
    def num_segments(self) -> int:
        return int(len(np.unique(self.labels)))


def strided_targets(grid: Tuple[int, int], num_prefix: int, stride: int):
    """(``explain`` targets, (n_sub,) row-major patch positions or None) for a target stride: all patches
    (``"patches"``, None) at 1, else every ``stride``-th patch along rows and columns."""
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ConfigError(f"target_stride must be a positive int; got {stride!r}")
    if stride == 1:
        return "patches", None
    tokens = stride_targets((int(grid[0]), int(grid[1])), num_prefix, int(stride))
    return tokens, np.asarray(tokens, dtype=np.int64) - num_prefix


def grid_positions(token_positions: Positions, grid: Tuple[int, int], count: Optional[int] = None) -> np.ndarray:
    """(n_sub, 2) int64 (row, col) of the given patches: row-major patch indices (n_sub,) or (row, col)
    pairs (n_sub, 2) on the (h, w) grid. Refuses out-of-grid, repeated or non-integer positions, and a
    count other than ``count`` (the number of maps)."""
    pos = token_positions.detach().cpu().numpy() if isinstance(token_positions, torch.Tensor) \
        else np.asarray(token_positions)
    h, w = int(grid[0]), int(grid[1])
    if pos.size and not np.issubdtype(pos.dtype, np.integer):
        raise TypeError(f"token_positions must hold integers (patch indices or (row, col)); got dtype {pos.dtype}")
    pos = pos.astype(np.int64)
    if pos.ndim == 1:
        if pos.size and (pos.min() < 0 or pos.max() >= h * w):
            raise InputError(f"token_positions: patch indices must lie in 0..{h * w - 1} (the {h}x{w} grid); "
                             f"got {pos.min()}..{pos.max()}")
        pos = np.stack([pos // w, pos % w], axis=1)
    elif pos.ndim == 2 and pos.shape[1] == 2:
        if pos.size and ((pos < 0).any() or (pos[:, 0] >= h).any() or (pos[:, 1] >= w).any()):
            raise InputError(f"token_positions: (row, col) pairs must lie in the {h}x{w} grid")
    else:
        raise InputError(f"token_positions must be (n_sub,) patch indices or (n_sub, 2) (row, col) pairs; got "
                         f"shape {pos.shape}")
    if count is not None and len(pos) != count:
        raise InputError(f"{len(pos)} token_positions for {count} maps")
    if len(pos) == 0:
        raise InputError("token_positions is empty: at least one explained token is needed")
    if len(np.unique(pos[:, 0] * w + pos[:, 1])) != len(pos):
        raise InputError("token_positions repeat a patch")
    return pos


def nearest_token(positions: np.ndarray, grid: Tuple[int, int], size: Tuple[int, int]) -> np.ndarray:
    """(H, W) int64: for each pixel of an H x W image laid over the (h, w) patch grid, the index (into
    ``positions``, (n_sub, 2) rows/cols) of the explained patch whose centre is nearest to the pixel's
    centre (Euclidean, in patch units); ties go to the smallest row-major patch index.

    Pixel (y, x) has its centre at ((y + 1/2) h/H, (x + 1/2) w/W) and patch (r, c) at (r + 1/2, c + 1/2);
    at H, W = h, w the pixels are the patches, so every explained patch is its own nearest.
    """
    h, w = int(grid[0]), int(grid[1])
    H, W = int(size[0]), int(size[1])
    order = np.argsort(positions[:, 0] * w + positions[:, 1], kind="stable")  # argmin keeps the first: ties
    # Squared distance times (2HW)^2 is an integer: compared in int64, ties are exact; float64 only where
    # that could overflow (images of many thousand pixels a side), where near-ties may round either way.
    bound = 4 * (H * h * W) ** 2 + 4 * (W * w * H) ** 2
    dtype = torch.int64 if bound < 2 ** 62 else torch.float64
    r = torch.from_numpy(positions[order, 0]).to(dtype)
    c = torch.from_numpy(positions[order, 1]).to(dtype)
    ys = torch.arange(H, dtype=dtype)
    xs = torch.arange(W, dtype=dtype)
    dy = (((2 * ys + 1) * h).unsqueeze(1) - ((2 * r + 1) * H).unsqueeze(0)).square() * (W * W)  # (H, n_sub)
    dx = (((2 * xs + 1) * w).unsqueeze(1) - ((2 * c + 1) * W).unsqueeze(0)).square() * (H * H)  # (W, n_sub)
    out = np.empty((H, W), dtype=np.int64)
    step = max(1, NEAREST_BUDGET // max(1, W * len(order)))
    for y0 in range(0, H, step):
        d = dy[y0:y0 + step].unsqueeze(1) + dx.unsqueeze(0)  # (rows, W, n_sub)
        out[y0:y0 + step] = d.argmin(-1).numpy()
    return order[out]


def token_partition(maps: torch.Tensor, metric: str = "cosine", method: str = "average",
                    token_positions: Optional[Positions] = None, aggregation: str = "paper",
                    features: Optional[Union[np.ndarray, torch.Tensor]] = None, seed: int = 0) -> Partition:
    """One image's ``Partition`` of its (n, h, w) maps (``aggregation.aggregate``), computed once: pass it
    to ``segment_maps(partition=...)`` for every cut and pixel rule of a sweep."""
    n, h, w = _check_maps(maps, token_positions)
    pos = None if token_positions is None else grid_positions(token_positions, (h, w), n)
    flat = min_max(maps.reshape(n, -1).double().cpu().numpy())
    return aggregate(flat, (h, w), aggregation, None if pos is None else pos[:, 0] * w + pos[:, 1],
                     None if features is None else _numpy(features), metric, method, seed=seed)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_maps(maps: torch.Tensor, token_positions: Optional[Positions]) -> Tuple[int, int, int]:
    if maps.dim() != 3:
        raise InputError(f"maps must be (n, h, w), one grid-resolution map per token; got shape {tuple(maps.shape)}")
    n, h, w = maps.shape
    if token_positions is None and n != h * w:
        raise InputError(f"expected the maps of all {h * w} patch tokens, got {n} (pass token_positions "
                         f"for a subset)")
    return n, h, w


def segment_maps(maps: torch.Tensor, size: Tuple[int, int], threshold: Optional[float] = 0.4,
                 n_clusters: Optional[int] = None, metric: str = "cosine", method: str = "average",
                 assign: str = "argmax", interpolation: str = "bilinear",
                 token_positions: Optional[Positions] = None, aggregation: str = "paper",
                 features: Optional[Union[np.ndarray, torch.Tensor]] = None,
                 partition: Optional[Partition] = None) -> Segmentation:
    """Segment one image from the (n, h, w) maps of its n patch tokens (row-major token order).

    ``token_positions`` (a fast mode: only some tokens explained, e.g. every k-th patch): the patches
    whose maps ``maps`` holds, (n_sub,) row-major patch indices or (n_sub, 2) (row, col) pairs in map
    order; ``maps`` is then (n_sub, h, w) and the clustering runs on those maps only.

    ``aggregation`` (``aggregation.AGGREGATIONS``): how tokens are grouped; ``"paper"`` (default) is the
    paper's hierarchical clustering cut at ζ = ``threshold`` (``refined`` and ``propagated`` refine that
    cut by k-means, at the same count); the spectral strategies take ``n_clusters`` or pick the count by
    the eigengap. ``features``: (n, D) the explained tokens'
    features, for the strategies that read them. ``partition``: the image's ``token_partition``,
    computed once for a sweep of cuts (then ``aggregation``/``features``/``metric``/``method`` are its).

    ``assign="argmax"`` (the paper): each pixel takes the cluster whose summed (over its member maps),
    upsampled, min-max scaled map is largest there. ``assign="token"``: each pixel takes the cluster of
    the token whose patch it lies in (torch's nearest resize of the token grid); with a subset of
    tokens, the cluster of the explained token whose patch centre is nearest to the pixel's centre
    (``nearest_token``; when the subset covers every patch, the plain rule).
    """
    if assign not in ASSIGN_RULES:
        raise ConfigError(f"unknown assign rule {assign!r}; expected one of {ASSIGN_RULES}")
    n, h, w = _check_maps(maps, token_positions)
    pos = None if token_positions is None else grid_positions(token_positions, (h, w), n)
    if partition is None:
        partition = token_partition(maps, metric, method, token_positions, aggregation, features)
    elif partition.maps.shape != (n, h * w):
        raise InputError(f"partition is of {partition.maps.shape[0]} maps of {partition.maps.shape[1]} patches, "
                         f"not of these ({n}, {h}x{w})")
    flat = partition.maps
    ids = partition.cut(threshold, n_clusters)
    K = int(ids.max()) + 1
    # Upsampling is linear, so summing at grid resolution then upsampling equals summing upsampled maps.
    sums = torch.zeros(K, h * w, dtype=torch.float64)
    if partition.summed.all():
        sums.index_add_(0, torch.from_numpy(ids), torch.from_numpy(flat))
    else:  # artefact tokens take a cluster but do not shape its map
        keep = partition.summed
        sums.index_add_(0, torch.from_numpy(ids[keep]), torch.from_numpy(flat[keep]))
    up = F.interpolate(sums.reshape(1, K, h, w), size=tuple(size), mode=interpolation, align_corners=False)[0]
    lo = up.amin((1, 2), keepdim=True)
    span = up.amax((1, 2), keepdim=True) - lo
    cluster_maps = torch.where(span > 0, (up - lo) / span.clamp_min(1e-300), torch.zeros_like(up))
    token_clusters = ids.reshape(h, w) if pos is None else ids[nearest_token(pos, (h, w), (h, w))]
    if assign == "argmax":
        labels = cluster_maps.argmax(0).numpy()
    elif pos is None or n == h * w:
        token_grid = torch.from_numpy(token_clusters).reshape(1, 1, h, w).double()
        labels = F.interpolate(token_grid, size=tuple(size), mode="nearest")[0, 0].long().numpy()
    else:
        labels = ids[nearest_token(pos, (h, w), size)]
    return Segmentation(labels.astype(np.int32), cluster_maps.float().numpy(), token_clusters, partition.linkage,
                        pos)


def segment(model, images: torch.Tensor, sizes: Optional[Sequence[Tuple[int, int]]] = None,
            threshold: Optional[float] = 0.4, n_clusters: Optional[int] = None, metric: str = "cosine",
            method: str = "average", assign: str = "argmax", interpolation: str = "bilinear",
            target_stride: int = 1, aggregation: str = "paper", config: Optional[ExplainConfig] = None,
            **explain_kwargs) -> List[Segmentation]:
    """Explain the patch tokens of each image and segment it; one ``Segmentation`` per image.

    ``sizes``: the (H, W) of each original image (labels come at that resolution); default: the
    input tensor's size. ``target_stride`` k > 1 (a fast mode, about k² times fewer targets): explain
    only every k-th patch along rows and columns and segment from those maps (see ``segment_maps``).
    ``aggregation``: how the maps become segments (``aggregation.AGGREGATIONS``; the strategies that read
    features get the last block's patch tokens from one extra forward).
    The explanation's options: ``config`` (an ``ExplainConfig``; default: ``explain``'s defaults) with
    ``explain_kwargs`` (layer, scalar, order, start_block, compute_dtype, ...) applied on top; validated
    before any work.
    """
    config = (config or ExplainConfig()).replace(**explain_kwargs)
    if not (isinstance(config.targets, str) and config.targets == "patches"):
        raise ConfigError("segmentation explains patch tokens itself (targets='patches'; see target_stride)")
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregation {aggregation!r}; expected one of {list(AGGREGATIONS)}")
    adapter = wrap(model)
    targets, positions = strided_targets(adapter.grid_size(images), adapter.num_prefix_tokens, target_stride)
    maps = explain_with(adapter, images, config.replace(targets=targets))
    if sizes is None:
        sizes = [cast(Tuple[int, int], tuple(images.shape[-2:]))] * images.shape[0]  # (H, W) of 4-D images
    if len(sizes) != images.shape[0]:
        raise InputError(f"{len(sizes)} sizes for {images.shape[0]} images")
    feats: List[Optional[np.ndarray]] = [None] * images.shape[0]
    if needs_features(aggregation):
        tokens = last_layer_tokens(adapter, images.to(device=adapter.device, dtype=adapter.dtype))
        feats = [t if positions is None else t[positions] for t in tokens]
    return [segment_maps(m, s, threshold, n_clusters, metric, method, assign, interpolation, positions,
                         aggregation, f) for m, s, f in zip(maps, sizes, feats)]
