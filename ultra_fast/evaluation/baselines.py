"""Baselines the evaluation compares ULTra with: k-means and spectral clustering of the patch tokens, and
the CLS token's rollout map."""
from __future__ import annotations

import numbers
from typing import Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, InputError
from ..models import Adapter, wrap
from ..segmentation.aggregation import SpectralCut, feature_affinity


def kmeans_token_clusters(features: Union[np.ndarray, torch.Tensor], grid: Tuple[int, int], k: int,
                          seed: int = 0) -> np.ndarray:
    """(h, w) k-means cluster id of every patch token.

    scikit-learn KMeans (n_init=10, random_state=seed) on L2-normalised tokens: on unit vectors Euclidean
    k-means groups by cosine similarity, the similarity ViT features are compared with.
    """
    from sklearn.cluster import KMeans
    X = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(
        features, dtype=np.float64)
    h, w = (int(g) for g in grid)
    if X.ndim != 2 or X.shape[0] != h * w:
        raise InputError(f"features must be (n = h*w = {h * w}, D) patch tokens for grid {grid}; got shape "
                         f"{X.shape}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= X.shape[0]:
        raise ConfigError(f"k={k!r} must be an int in 1..{X.shape[0]} (the number of tokens)")
    if not np.isfinite(X).all():
        raise InputError("features contain non-finite values")
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    ids = KMeans(n_clusters=int(k), n_init=10, random_state=seed).fit_predict(X)
    return ids.astype(np.int64).reshape(h, w)


def feature_spectral(features: Union[np.ndarray, torch.Tensor], seed: int = 0) -> SpectralCut:
    """Deep Spectral Methods' recipe (Melas-Kyriazi et al. 2022) on the patch tokens, for any k: the
    normalised-cut eigenvectors of the feature affinity (cosine similarity clipped at 0), then k-means
    on the first k (``SpectralCut.cut(n_clusters=k)`` gives the (n,) ids, row-major). Their image-matting
    colour affinity is left out: every method here sees the same tokens and nothing else."""
    X = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(
        features, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 1:
        raise InputError(f"features must be (n, D) patch tokens; got shape {X.shape}")
    if not np.isfinite(X).all():
        raise InputError("features contain non-finite values")
    return SpectralCut(feature_affinity(X), seed=seed)


def upsample_nearest(token_ids: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W): each pixel takes the id of the patch its centre lies in (pixel y's centre y + 1/2
    falls in patch floor((y + 1/2) * h / H))."""
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 2:
        raise InputError(f"token ids must be an (h, w) grid; got shape {token_ids.shape}")
    H, W = (int(s) for s in size)
    if H < 1 or W < 1:
        raise InputError(f"size must be (H, W) with positive sides; got {size}")
    h, w = token_ids.shape
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return token_ids[np.ix_(rows, cols)]


def kmeans_segmentation(features: Union[np.ndarray, torch.Tensor], grid: Tuple[int, int], k: int,
                        size: Tuple[int, int], seed: int = 0) -> np.ndarray:
    """(H, W) int labels: k-means of the last-layer patch tokens (``kmeans_token_clusters``), upsampled by
    nearest neighbour (``upsample_nearest``). Call the two steps to keep the token cluster ids as well."""
    return upsample_nearest(kmeans_token_clusters(features, grid, k, seed), size)


def cls_rollout_map(model: Union[nn.Module, Adapter], image: torch.Tensor, layer: int = -1,
                    scalar="sum", size=None) -> torch.Tensor:
    """The CLS token's map: Chefer et al.'s gradient-weighted attention rollout, which is ULTra's engine
    with the CLS token (index 0) as the target. (h, w) at grid resolution, or ``size``.

    ``image``: (1, 3, H, W) or (3, H, W) preprocessed; other arguments as in ``ultra_fast.explain``.
    """
    from ..engine import explain
    adapter = wrap(model)
    if adapter.num_prefix_tokens < 1:
        raise ConfigError(f"{adapter.name} has no prefix (CLS) token: the CLS rollout baseline does not apply")
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image.unsqueeze(0)
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] != 1:
        raise InputError(f"image must be one preprocessed image (1, 3, H, W); got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return explain(adapter, image, layer=layer, scalar=scalar, targets=[0], size=size)[0, 0]


def foreground_mask(map_: Union[np.ndarray, torch.Tensor], method: Union[str, float] = "mean") -> np.ndarray:
    """(H, W) uint8 in {0, 1}: the map min-max scaled to [0, 1], then 1 where scaled >= threshold.

    ``method="mean"`` thresholds at the mean of the scaled map (the usual adaptive choice for saliency /
    rollout maps: foreground is what is more relevant than average); a float in [0, 1] is a fixed
    threshold. A constant map has no foreground (all zeros).
    """
    m = map_.detach().cpu().double().numpy() if isinstance(map_, torch.Tensor) else np.asarray(map_, np.float64)
    if m.ndim != 2:
        raise InputError(f"map must be (H, W); got shape {m.shape}")
    if not np.isfinite(m).all():
        raise InputError("map contains non-finite values")
    lo, span = m.min(), m.max() - m.min()
    if span <= 0:
        return np.zeros(m.shape, dtype=np.uint8)
    scaled = (m - lo) / span
    if isinstance(method, str):
        if method != "mean":
            raise ConfigError(f"unknown threshold method {method!r}; expected 'mean' or a float in [0, 1]")
        threshold = scaled.mean()
    elif isinstance(method, numbers.Real) and 0.0 <= float(method) <= 1.0:
        threshold = float(method)
    else:
        raise ConfigError(f"threshold must be 'mean' or a float in [0, 1]; got {method!r}")
    return (scaled >= threshold).astype(np.uint8)
