"""Hierarchical clustering of token maps (docs/method.md §4 step 3), through fastcluster and scipy.

``TokenClustering`` computes an image's dendrogram once and cuts it at any ζ or number of clusters:
a sweep over cuts (and pixel rules) costs one linkage, not one per cut.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..errors import ConfigError, InputError

METRICS = ("cosine", "euclidean", "correlation", "cityblock")
LINKAGES = ("average", "single", "complete", "weighted", "centroid", "median", "ward")


def min_max(maps: np.ndarray) -> np.ndarray:
    """Scale each row to [0, 1]; a constant row becomes all ones (so cosine distances stay defined)."""
    lo = maps.min(axis=1, keepdims=True)
    span = maps.max(axis=1, keepdims=True) - lo
    out = np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 1.0)
    return out


def linkage(features: np.ndarray, metric: str = "cosine", method: str = "average") -> np.ndarray:
    """The (n-1, 4) scipy-format linkage of the rows of ``features``."""
    import fastcluster
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if method not in LINKAGES:
        raise ConfigError(f"unknown linkage {method!r}; expected one of {LINKAGES}")
    if method in ("centroid", "median", "ward") and metric != "euclidean":
        raise ConfigError(f"linkage {method!r} needs metric='euclidean'")
    return fastcluster.linkage(np.ascontiguousarray(features, dtype=np.float64), method=method, metric=metric)


def cut(Z: np.ndarray, threshold: Optional[float] = 0.4, n_clusters: Optional[int] = None,
        metric: str = "cosine") -> np.ndarray:
    """Cluster ids 0..K-1 per leaf, by distance threshold ζ or by a fixed number of clusters."""
    from scipy.cluster.hierarchy import fcluster
    n = Z.shape[0] + 1
    if n_clusters is not None:
        if not 1 <= int(n_clusters) <= n:
            raise ConfigError(f"n_clusters={n_clusters} is impossible for {n} tokens (1..{n})")
        ids = fcluster(Z, t=int(n_clusters), criterion="maxclust")
    else:
        upper = 2.0 if metric in ("cosine", "correlation") else np.inf
        if threshold is None or not 0 < float(threshold) <= upper:
            raise ConfigError(f"threshold={threshold} is impossible for {metric} distances (0 < ζ <= {upper})")
        ids = fcluster(Z, t=float(threshold), criterion="distance")
    _, ids = np.unique(ids, return_inverse=True)  # dense 0..K-1, in order of first fcluster id
    return ids.astype(np.int64)


class TokenClustering:
    """The dendrogram of one image's token maps, computed once; ``cut`` it at any ζ or cluster count.

    ``features``: (n, d) rows to cluster (for token maps: min-max scaled, ``min_max``). With fewer than
    two rows there is nothing to link: every cut gives one cluster per row (all zeros).
    """

    def __init__(self, features: np.ndarray, metric: str = "cosine", method: str = "average") -> None:
        features = np.asarray(features)
        if features.ndim != 2:
            raise InputError(f"features must be (n, d) rows to cluster; got shape {features.shape}")
        self.n = int(features.shape[0])
        self.metric, self.method = metric, method
        self.Z = linkage(features, metric, method) if self.n >= 2 else np.zeros((0, 4))

    def cut(self, threshold: Optional[float] = 0.4, n_clusters: Optional[int] = None) -> np.ndarray:
        """(n,) int64 cluster ids 0..K-1: ``n_clusters`` clusters when given, else the cut at distance ζ."""
        if self.n < 2:
            return np.zeros(self.n, dtype=np.int64)
        return cut(self.Z, threshold, n_clusters, self.metric)


def cluster_tokens(maps: np.ndarray, threshold: Optional[float] = 0.4, n_clusters: Optional[int] = None,
                   metric: str = "cosine", method: str = "average") -> Tuple[np.ndarray, np.ndarray]:
    """(n, h*w) maps -> (cluster id per token, linkage)."""
    clustering = TokenClustering(min_max(maps), metric, method)
    return clustering.cut(threshold, n_clusters), clustering.Z
