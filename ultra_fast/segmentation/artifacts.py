"""Artefact tokens: the few high-norm patch tokens of ViTs trained without registers.

Darcet et al. ("Vision Transformers Need Registers", 2023) found that large ViTs without register
tokens repurpose a few patch tokens of low-information background as global scratch space: their
output norm is several times that of the other tokens, they are attended to from everywhere, and they
hold image-level rather than local content. In ULTra's maps this shows twice: the artefact token's own
map points at the salient object wherever the token lies (a row that belongs to no region), and every
other token draws on the artefact's patch (a column that makes all maps alike). Both pull the
clustering of the maps towards "everything is one segment".

``artefact_tokens`` finds them from the token norms alone (no labels, no tuning per image);
``neutralise_columns`` replaces their columns in every map by what their neighbours hold, and
``fill_from_nearest`` gives each of them the cluster of the nearest ordinary token once the others are
clustered without them. ``aggregation`` combines the three for any strategy.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..errors import InputError

#: A token is an artefact when its norm exceeds the median by this many robust standard deviations
#: (1.4826 x the median absolute deviation) ...
ARTEFACT_ROBUST_Z = 6.0
#: ... and is at least this multiple of the median norm (so that a tight norm distribution, whose MAD is
#: tiny, does not flag ordinary tokens). Darcet et al. report artefact norms of several times the median.
ARTEFACT_MIN_RATIO = 1.5
#: Never more than this share of the tokens: artefacts are few by construction (about 2 % in the paper).
ARTEFACT_MAX_SHARE = 0.1


def artefact_tokens(norms: np.ndarray, robust_z: float = ARTEFACT_ROBUST_Z, min_ratio: float = ARTEFACT_MIN_RATIO,
                    max_share: float = ARTEFACT_MAX_SHARE) -> np.ndarray:
    """(n,) bool: the tokens whose norm is an outlier above the rest (see the module docstring).

    At most ``max_share`` of the tokens (the largest norms first) are flagged, and never all of them.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim != 1:
        raise InputError(f"norms must be (n,) one norm per token; got shape {norms.shape}")
    if not np.isfinite(norms).all():
        raise InputError("token norms contain non-finite values")
    n = norms.size
    mask = np.zeros(n, dtype=bool)
    if n < 3:
        return mask
    med = float(np.median(norms))
    mad = 1.4826 * float(np.median(np.abs(norms - med)))
    candidate = (norms > med + robust_z * mad) & (norms >= min_ratio * med)
    cap = min(int(max_share * n), n - 1)
    if candidate.sum() > cap:
        keep = np.argsort(-norms, kind="stable")[:cap]
        capped = np.zeros(n, dtype=bool)
        capped[keep] = True
        candidate &= capped
    return candidate


def _patch_rc(positions: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
    w = int(grid[1])
    return np.stack([positions // w, positions % w], axis=1)


def neutralise_columns(maps: np.ndarray, patches: np.ndarray, grid: Tuple[int, int]) -> np.ndarray:
    """(n, h*w) maps with the columns of ``patches`` (row-major patch indices) replaced by the mean of
    their 8 neighbouring columns that are not themselves replaced (the median of the row if none is):
    the relevance every token gives to an artefact patch is about the artefact, not about its place."""
    out = np.array(maps, dtype=np.float64, copy=True)
    h, w = int(grid[0]), int(grid[1])
    bad = np.zeros(h * w, dtype=bool)
    bad[np.asarray(patches, dtype=np.int64)] = True
    for p in np.flatnonzero(bad):
        r, c = divmod(int(p), w)
        neigh = [(r + dr) * w + (c + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                 if (dr or dc) and 0 <= r + dr < h and 0 <= c + dc < w and not bad[(r + dr) * w + (c + dc)]]
        out[:, p] = out[:, neigh].mean(1) if neigh else np.median(out[:, ~bad], axis=1)
    return out


def fill_from_nearest(ids_kept: np.ndarray, kept: np.ndarray, positions: np.ndarray,
                      grid: Tuple[int, int]) -> np.ndarray:
    """(n,) cluster ids of all tokens: the kept tokens' own ids, and for each other token the id of the
    kept token whose patch is nearest on the grid (Euclidean; ties: the smallest row-major patch)."""
    kept = np.asarray(kept, dtype=bool)
    positions = np.asarray(positions, dtype=np.int64)
    out = np.empty(kept.size, dtype=np.int64)
    out[kept] = ids_kept
    if kept.all():
        return out
    kp = positions[kept]
    order = np.argsort(kp, kind="stable")  # argmin keeps the first: ties go to the smallest patch index
    rc_kept = _patch_rc(kp[order], grid).astype(np.float64)
    rc_other = _patch_rc(positions[~kept], grid).astype(np.float64)
    d = ((rc_other[:, None, :] - rc_kept[None, :, :]) ** 2).sum(-1)
    out[~kept] = ids_kept[order[d.argmin(1)]]
    return out


def artefact_mask_for(features: Optional[np.ndarray], n: int) -> np.ndarray:
    """``artefact_tokens`` of the rows of ``features`` ((n, D) tokens), or none flagged without features."""
    if features is None:
        return np.zeros(n, dtype=bool)
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != n:
        raise InputError(f"features must be (n = {n}, D), one row per explained token; got shape {features.shape}")
    return artefact_tokens(np.linalg.norm(features, axis=1))
