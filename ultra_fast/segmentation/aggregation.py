"""Aggregation strategies: how the maps of all patch tokens become segments.

Every strategy turns one image's maps (and, where it uses them, the tokens' features) into a
``Partition``: a decomposition computed once per image that ``cut`` splits into any number of
clusters. ``segment_maps`` then gives pixels to clusters exactly as the paper does (the argmax of the
clusters' summed maps, or the token rule). Strategies (``AGGREGATIONS``):

- ``paper``: the paper's aggregation (docs/method.md §4): average-linkage hierarchical clustering of the min-max
  scaled maps under cosine distance, cut at distance ζ (or at k clusters).
- ``spectral``: a normalised cut (Shi & Malik) of the token-to-token relevance graph. Row i of the maps
  at the explained patches is how much token i draws on every other token: an n x n relevance matrix R,
  information that feature clustering has not. Made symmetric, A = (R + Rᵀ) / 2 joins tokens that draw
  on each other; the leading eigenvectors of its random-walk Laplacian (``scipy.linalg.eigh``) are
  clustered by k-means (scikit-learn), as ``sklearn.cluster.spectral_clustering`` does. Without k, the
  number of segments is the eigengap rule: the k <= ``EIGENGAP_MAX`` after which the Laplacian's
  eigenvalues jump most.
- ``joint``: the same normalised cut on (1 - β) A_maps + β A_features, where A_features is the
  cosine similarity of the tokens' (last-layer) features clipped at 0, as in Deep Spectral Methods
  (Melas-Kyriazi et al. 2022). The maps say what a token draws on, the features what it is; β
  (``JOINT_BETA``) is one number for every image and dataset, chosen on the VOC samples (see README).
  β = 1 is feature spectral clustering (the evaluation's baseline), β = 0 is ``spectral``.
- ``refined``: the paper's clustering, then k-means (Lloyd, scikit-learn) on the same rows (the min-max
  scaled maps, L2-normalised so that Euclidean k-means follows the cosine metric) started from the
  paper's clusters' centroids, with the paper's count (at ζ, or ``n_clusters``). Average linkage keeps
  a token in the cluster it joined early even when its map is closer to another cluster's mean; a few
  Lloyd steps move it. Deterministic: the start is the paper's cut, not a random draw.
- ``propagated``: the same refinement on the tokens' features averaged along their maps:
  F' = R̃ F with R̃ the row-normalised relevance matrix (row i: token i's map at the explained
  patches, summing to 1), F the L2-normalised (last-layer) features. A token is then described by
  what the tokens it draws on are, a smoothing that follows the model's own relevance rather than the
  image grid.
- ``<strategy>+clean`` (any of the above): artefact tokens (``artifacts.artefact_tokens``: outliers of
  the feature norm) are neutralised first: their columns in every map are replaced by their neighbours'
  (``neutralise_columns``), the others are clustered without them, and each takes the cluster of its
  nearest ordinary token (``fill_from_nearest``); their maps are left out of the clusters' sums.

Strategies other than ``paper`` with ``+clean`` need features (``n x D`` tokens of the explained
patches); ``joint`` and ``propagated`` always do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .artifacts import artefact_mask_for, fill_from_nearest, neutralise_columns
from .cluster import TokenClustering, min_max

BASES = ("paper", "spectral", "joint", "refined", "propagated")
#: The strategies that read the tokens' features (besides ``+clean``, which reads their norms).
FEATURE_BASES = ("joint", "propagated")
#: The strategies with a segment-count rule of their own (the eigengap); the others cut at ζ.
SPECTRAL_BASES = ("spectral", "joint")
CLEAN_SUFFIX = "+clean"
AGGREGATIONS = BASES + tuple(b + CLEAN_SUFFIX for b in BASES)
#: The weight of the feature affinity in ``joint``, one value for every image (chosen on VOC samples).
JOINT_BETA = 0.5
#: The eigengap rule looks for the number of segments among 2..EIGENGAP_MAX.
EIGENGAP_MAX = 20


def parse_aggregation(name: str) -> Tuple[str, bool]:
    """``"spectral+clean"`` -> ("spectral", True); refuses unknown names, listing the known ones."""
    if not isinstance(name, str) or name not in AGGREGATIONS:
        raise ConfigError(f"unknown aggregation {name!r}; expected one of {list(AGGREGATIONS)}")
    clean = name.endswith(CLEAN_SUFFIX)
    return (name[:-len(CLEAN_SUFFIX)] if clean else name), clean


def has_own_count(name: str) -> bool:
    """Whether ``name`` chooses its number of segments itself (the eigengap of the spectral strategies)."""
    return parse_aggregation(name)[0] in SPECTRAL_BASES


def needs_features(name: str) -> bool:
    """Whether ``name`` reads token features (``joint``, ``propagated``, or any ``+clean`` for the norms)."""
    base, clean = parse_aggregation(name)
    return clean or base in FEATURE_BASES


@dataclass
class Partition:
    """One image's decomposition of its explained tokens, cut into clusters on demand.

    maps: (n, h*w) the min-max scaled maps the pixel rules sum (artefact columns neutralised with +clean).
    summed: (n,) bool, the rows that enter the clusters' sums (all but artefact tokens).
    linkage: the paper's dendrogram (scipy format) for the hierarchical strategies (``paper``, ``refined``,
    ``propagated``), else an empty (0, 4) array.
    """

    maps: np.ndarray
    summed: np.ndarray
    linkage: np.ndarray
    _cut_kept: Callable[[Optional[float], Optional[int]], np.ndarray]  # cuts the kept rows
    _kept: np.ndarray                                                  # (n,) bool: not an artefact token
    _positions: np.ndarray                                             # (n,) row-major patch of each token
    _grid: Tuple[int, int]
    _cuts: Dict[Tuple[Optional[float], Optional[int]], np.ndarray] = field(default_factory=dict)

    def cut(self, threshold: Optional[float] = 0.4, n_clusters: Optional[int] = None) -> np.ndarray:
        """(n,) int64 cluster ids 0..K-1: ``n_clusters`` when given, else the strategy's own rule (ζ for
        ``paper``, the eigengap for the spectral ones). Each cut is computed once (a sweep over pixel
        rules asks for it again); a copy is returned."""
        key = (None if threshold is None or n_clusters is not None else float(threshold),
               None if n_clusters is None else int(n_clusters))
        if key not in self._cuts:
            self._cuts[key] = self._cut(threshold, n_clusters)
        return self._cuts[key].copy()

    def _cut(self, threshold: Optional[float], n_clusters: Optional[int]) -> np.ndarray:
        if self._kept.all():
            return self._cut_kept(threshold, n_clusters)
        if n_clusters is not None:
            n_clusters = min(int(n_clusters), int(self._kept.sum()))
        ids = self._cut_kept(threshold, n_clusters)
        _, ids = np.unique(ids, return_inverse=True)
        return fill_from_nearest(ids.astype(np.int64), self._kept, self._positions, self._grid)


class SpectralCut:
    """Normalised cut of an affinity matrix: eigenvectors once, k-means per cut."""

    #: Eigenvectors computed up front; a cut into more clusters computes the rest once.
    INITIAL_COMPONENTS = 64

    def __init__(self, affinity: np.ndarray, seed: int = 0) -> None:
        A = np.array(affinity, dtype=np.float64, copy=True)
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise InputError(f"affinity must be square (n, n); got shape {A.shape}")
        if not np.isfinite(A).all() or (A < 0).any():
            raise InputError("affinity must be finite and non-negative")
        np.fill_diagonal(A, 0.0)  # self-loops only inflate degrees
        self.n, self.seed, self._A = A.shape[0], int(seed), A
        self.values, self.vectors = np.zeros(0), np.zeros((self.n, 0))
        self._solve(min(self.n, self.INITIAL_COMPONENTS))

    def _solve(self, m: int) -> None:
        from scipy.linalg import eigh
        from scipy.sparse.csgraph import laplacian
        if self.n < 2:
            self.values, self.vectors = np.zeros(self.n), np.ones((self.n, self.n))
            return
        L, dd = laplacian(self._A, normed=True, return_diag=True)
        values, vectors = eigh(L, subset_by_index=[0, m - 1])
        # L_sym's eigenvectors divided by sqrt(degree): the random-walk Laplacian's, i.e. the relaxed
        # normalised-cut indicators (as sklearn.manifold.spectral_embedding); a node without edges keeps
        # scipy's unit degree.
        self.values, self.vectors = values, vectors / dd[:, None]

    def eigengap_k(self, max_k: int = EIGENGAP_MAX) -> int:
        """The k in 2..max_k with the largest gap λ_k - λ_{k-1} (eigenvalues ascending, λ_0 = 0)."""
        top = min(max_k, len(self.values) - 1)
        if top < 2:
            return 1
        gaps = np.diff(self.values[:top + 1])  # gaps[k-1] = λ_k - λ_{k-1}
        return int(np.argmax(gaps[1:top]) + 2)

    def cut(self, threshold: Optional[float] = None, n_clusters: Optional[int] = None) -> np.ndarray:
        """(n,) int64 ids: k-means (scikit-learn, n_init=10, seeded) on the first k eigenvectors; without
        ``n_clusters``, k from the eigengap rule (``threshold`` is the hierarchical cut's, unused here)."""
        from sklearn.cluster import KMeans
        k = self.eigengap_k() if n_clusters is None else int(n_clusters)
        if not 1 <= k <= self.n:
            raise InputError(f"n_clusters={n_clusters} is impossible for {self.n} tokens (1..{self.n})")
        if k == 1:
            return np.zeros(self.n, dtype=np.int64)
        if k > self.vectors.shape[1]:
            self._solve(self.n)
        ids = KMeans(n_clusters=k, n_init=10, random_state=self.seed).fit_predict(self.vectors[:, :k])
        _, ids = np.unique(ids, return_inverse=True)  # dense 0..K-1 (k-means may leave a cluster empty)
        return ids.astype(np.int64)


class RefinedCut:
    """The paper's cut (``TokenClustering``) refined by k-means on ``rows``, started at its clusters' means."""

    def __init__(self, rows: np.ndarray, clustering: TokenClustering) -> None:
        self.rows, self.clustering = np.asarray(rows, dtype=np.float64), clustering

    def cut(self, threshold: Optional[float] = 0.4, n_clusters: Optional[int] = None) -> np.ndarray:
        """(n,) int64 ids 0..K-1, K = the paper's count at ``threshold`` (or ``n_clusters``)."""
        from sklearn.cluster import KMeans
        start = self.clustering.cut(threshold, n_clusters)
        k = int(start.max()) + 1 if start.size else 0
        if k < 2 or k >= len(self.rows):
            return start
        centres = np.stack([self.rows[start == c].mean(axis=0) for c in range(k)])
        ids = KMeans(n_clusters=k, init=centres, n_init=1).fit_predict(self.rows)
        _, ids = np.unique(ids, return_inverse=True)  # dense 0..K-1 (a cluster may empty out)
        return ids.astype(np.int64)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def propagated_features(maps: np.ndarray, positions: np.ndarray, features: np.ndarray) -> np.ndarray:
    """(n, D) F' = R̃ F: each token's L2-normalised features averaged with its (min-max scaled) map at the
    explained patches as weights (rows of R̃ sum to 1; an all-zero row falls back to uniform weights)."""
    R = np.asarray(maps, dtype=np.float64)[:, positions]
    total = R.sum(axis=1, keepdims=True)
    R = np.where(total > 0, R / np.where(total > 0, total, 1.0), 1.0 / R.shape[1])
    return R @ unit_rows(features)


def relevance_affinity(maps: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(n, n) symmetric relevance: A[i, j] = (R[i, j] + R[j, i]) / 2, R[i, j] = token i's min-max scaled
    map at token j's patch."""
    R = np.asarray(maps, dtype=np.float64)[:, positions]
    return (R + R.T) / 2


def feature_affinity(features: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarity of the features, clipped at 0 (Deep Spectral Methods' W_feat)."""
    X = np.asarray(features, dtype=np.float64)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return np.clip(X @ X.T, 0.0, None)


def aggregate(flat: np.ndarray, grid: Tuple[int, int], name: str = "paper",
              positions: Optional[np.ndarray] = None, features: Optional[np.ndarray] = None,
              metric: str = "cosine", method: str = "average", beta: float = JOINT_BETA,
              seed: int = 0) -> Partition:
    """The ``Partition`` of one image for strategy ``name`` (``AGGREGATIONS``).

    ``flat``: (n, h*w) min-max scaled maps (``min_max``); ``positions``: (n,) row-major patch of each
    map's token (None: all patches, in order); ``features``: (n, D) the explained tokens' features
    (needed by ``joint`` and ``+clean``); ``beta``: ``joint``'s feature weight; ``seed``: k-means'.
    """
    base, clean = parse_aggregation(name)
    flat = np.asarray(flat, dtype=np.float64)
    n = flat.shape[0]
    h, w = int(grid[0]), int(grid[1])
    pos = np.arange(n, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64)
    if flat.ndim != 2 or flat.shape[1] != h * w or pos.shape != (n,):
        raise InputError(f"maps must be (n, h*w = {h * w}) with n positions; got maps {flat.shape}, "
                         f"positions {pos.shape}")
    if needs_features(name) and features is None:
        raise InputError(f"aggregation {name!r} needs the tokens' features (n x D); none were given")
    if features is not None:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[0] != n:
            raise InputError(f"features must be (n = {n}, D), one row per explained token; got {features.shape}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ConfigError(f"beta must lie in [0, 1]; got {beta}")
    kept = ~artefact_mask_for(features, n) if clean else np.ones(n, dtype=bool)
    maps = flat
    if not kept.all():
        maps = min_max(neutralise_columns(flat, pos[~kept], grid))
    sub, sub_pos = maps[kept], pos[kept]
    kept_features = features[kept] if features is not None else None
    cut_kept: Callable[[Optional[float], Optional[int]], np.ndarray]
    if base in ("paper", "refined", "propagated"):
        scaled = min_max(sub)
        clustering = TokenClustering(scaled, metric, method)
        cut_kept, Z = clustering.cut, clustering.Z
        if base == "refined":
            cut_kept = RefinedCut(unit_rows(scaled), clustering).cut
        elif base == "propagated":
            assert kept_features is not None  # needs_features(name) was checked above
            cut_kept = RefinedCut(unit_rows(propagated_features(sub, sub_pos, kept_features)), clustering).cut
    else:
        A = relevance_affinity(sub, sub_pos)
        if base == "joint":
            assert kept_features is not None  # needs_features(name) was checked above
            A = (1.0 - float(beta)) * A + float(beta) * feature_affinity(kept_features)
        spectral = SpectralCut(A, seed=seed)
        cut_kept, Z = spectral.cut, np.zeros((0, 4))
    return Partition(maps, kept.copy(), Z, cut_kept, kept, pos, (h, w))


def last_layer_tokens(adapter, x: torch.Tensor) -> np.ndarray:
    """(B, n, D) float32 patch tokens after the last block (residual stream, before any final norm): the
    features ``joint`` and ``+clean`` read (``adapter``: a wrapped model; ``x``: preprocessed images)."""
    from ..engine.options import eval_mode
    with torch.no_grad(), eval_mode(adapter):
        z = adapter.run(x).tokens
    return z[:, adapter.num_prefix_tokens:].float().cpu().numpy()
