"""Unsupervised segmentation metrics (docs/method.md §6): per-image and dataset-wide Hungarian matching.

Both protocols accumulate small per-image summaries (never pixel arrays), so a harness can cache each
image's contribution and resume: ``PerImageMatching.update_confusion`` takes a per-image confusion
matrix, ``DatasetWideMatching.update_segments`` a per-segment class histogram and mean feature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import ConfigError, InputError


def confusion(pred: np.ndarray, label: np.ndarray, ignore_index: int = 255):
    """(segments x classes) pixel counts over valid pixels, with the segment and class ids they index."""
    if pred.shape != label.shape:
        raise InputError(f"prediction {pred.shape} and labels {label.shape} differ in size; "
                         f"predictions are compared at label resolution")
    valid = label != ignore_index
    p, l = pred[valid].astype(np.int64), label[valid].astype(np.int64)
    segs, p_idx = np.unique(p, return_inverse=True)
    classes, l_idx = np.unique(l, return_inverse=True)
    M = np.zeros((len(segs), len(classes)), dtype=np.int64)
    np.add.at(M, (p_idx, l_idx), 1)
    return M, segs, classes


def _iou_summary(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, valid_pixels: int) -> Dict[str, float]:
    """mIoU over the classes that occur in the labels (tp + fn > 0) and pixel accuracy, both in percent."""
    occurs = (tp + fn) > 0
    iou = tp[occurs] / np.maximum(tp[occurs] + fp[occurs] + fn[occurs], 1)
    return {"mIoU": 100.0 * float(iou.mean()) if occurs.any() else float("nan"),
            "accuracy": 100.0 * float(tp.sum()) / max(valid_pixels, 1),
            "classes": int(occurs.sum())}


@dataclass
class PerImageMatching:
    """Per image: a one-to-one Hungarian match of segments to the classes present, maximising matched
    pixels; pixels of unmatched segments are errors. TP/FP/FN are summed over the dataset.

    This protocol is optimistic (an oracle label per segment): report it as "per-image".
    """

    ignore_index: int = 255
    tp: Dict[int, int] = field(default_factory=dict)
    fp: Dict[int, int] = field(default_factory=dict)
    fn: Dict[int, int] = field(default_factory=dict)
    valid_pixels: int = 0

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        M, _, classes = confusion(pred, label, self.ignore_index)
        self.update_confusion(M, classes)

    def update_confusion(self, M: np.ndarray, classes) -> None:
        """Add one image from its (segments x classes) confusion matrix, as ``confusion`` returns it.

        ``classes`` are the class ids of M's columns. Caching ``(M, classes)`` per image and replaying them
        here gives exactly the totals of ``update`` on the pixel arrays.
        """
        M = np.asarray(M)
        classes = np.asarray(classes).reshape(-1)
        if M.ndim != 2 or M.shape[1] != len(classes):
            raise InputError(f"confusion matrix must be (segments, classes) with one column per class id; got "
                             f"shape {M.shape} for {len(classes)} class ids")
        if M.size and (not np.issubdtype(M.dtype, np.integer) or M.min() < 0):
            raise InputError(f"confusion matrix must hold non-negative integer pixel counts; got dtype {M.dtype}")
        if len(np.unique(classes)) != len(classes):
            raise InputError(f"class ids of the confusion matrix columns repeat: {classes.tolist()}")
        if M.size == 0:
            return
        M = M.astype(np.int64)
        rows, cols = linear_sum_assignment(M, maximize=True)
        class_pixels = M.sum(0)
        matched_tp = np.zeros(len(classes), dtype=np.int64)
        for r, c in zip(rows, cols):
            cls = int(classes[c])
            matched_tp[c] = M[r, c]
            self.fp[cls] = self.fp.get(cls, 0) + int(M[r].sum() - M[r, c])
        for c, cls in enumerate(classes):
            cls = int(cls)
            self.tp[cls] = self.tp.get(cls, 0) + int(matched_tp[c])
            self.fn[cls] = self.fn.get(cls, 0) + int(class_pixels[c] - matched_tp[c])
            self.fp.setdefault(cls, 0)
        self.valid_pixels += int(M.sum())

    def iou(self) -> Dict[int, float]:
        return {c: self.tp[c] / max(self.tp[c] + self.fp[c] + self.fn[c], 1) for c in sorted(self.tp)}

    def summary(self) -> Dict[str, float]:
        ious = self.iou()
        return {"mIoU": 100.0 * float(np.mean(list(ious.values()))) if ious else float("nan"),
                "accuracy": 100.0 * sum(self.tp.values()) / max(self.valid_pixels, 1),
                "classes": len(ious)}


def segment_histograms(pred: np.ndarray, label: np.ndarray, num_segments: int, num_classes: int,
                       ignore_index: int = 255) -> np.ndarray:
    """(num_segments, num_classes) valid-pixel counts: row s = class histogram of the pixels of segment s."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape or pred.ndim != 2:
        raise InputError(f"prediction {pred.shape} and labels {label.shape} must be the same (H, W); "
                         f"predictions are compared at label resolution")
    if not np.issubdtype(pred.dtype, np.integer) or not np.issubdtype(label.dtype, np.integer):
        raise TypeError(f"prediction and labels must be integer arrays; got {pred.dtype} and {label.dtype}")
    valid = label != ignore_index
    p, l = pred[valid].astype(np.int64), label[valid].astype(np.int64)
    if p.size and (p.min() < 0 or p.max() >= num_segments):
        raise InputError(f"prediction ids must be in 0..{num_segments - 1} (one feature row each); "
                         f"got ids {p.min()}..{p.max()}")
    if l.size and (l.min() < 0 or l.max() >= num_classes):
        bad = np.unique(l[(l < 0) | (l >= num_classes)])[:10].tolist()
        raise InputError(f"label values {bad} are neither classes 0..{num_classes - 1} nor the ignore index "
                         f"{ignore_index}")
    H = np.bincount(p * num_classes + l, minlength=num_segments * num_classes)
    return H.reshape(num_segments, num_classes).astype(np.int64)


def segment_mean_features(features: np.ndarray, token_clusters: np.ndarray, K: int) -> np.ndarray:
    """(K, D) mean of the token features of each segment id 0..K-1; NaN rows for ids with no token.

    ``features``: (n, D) token features (e.g. last-layer patch tokens, row-major); ``token_clusters``: the
    segment id of each token, (n,) or (h, w).
    """
    features = np.asarray(features, dtype=np.float64)
    ids = np.asarray(token_clusters).reshape(-1)
    if features.ndim != 2:
        raise InputError(f"features must be (n tokens, D); got shape {features.shape}")
    if ids.shape[0] != features.shape[0]:
        raise InputError(f"{ids.shape[0]} token cluster ids for {features.shape[0]} token features")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"token_clusters must be integer ids; got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= K):
        raise InputError(f"token cluster ids must be in 0..{K - 1}; got {ids.min()}..{ids.max()}")
    sums = np.zeros((K, features.shape[1]))
    np.add.at(sums, ids, features)
    counts = np.bincount(ids, minlength=K).astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


@dataclass
class DatasetWideResult:
    """What the dataset-wide protocol decided: the shared id of every segment and the class of every id."""

    cluster_of_segment: np.ndarray   # (S,) shared id (k-means cluster) of every stored segment
    class_of_cluster: np.ndarray     # (k,) matched class of each shared id, -1 if unmatched
    confusion: np.ndarray            # (k, C) valid-pixel counts, shared ids x classes
    iou: Dict[int, float]            # IoU of every class that occurs in the labels


class DatasetWideMatching:
    """STEGO-family protocol (docs/method.md §6): every image's segments get shared ids by k-means (k = num_classes)
    on each segment's mean feature over the whole split, then ONE Hungarian match on the dataset
    confusion matrix (shared ids x classes).

    Only per-segment class histograms (K x C) and mean features are stored. Segments with no valid
    (non-ignored) pixel are dropped on update: they cannot change any score, and their features (often
    NaN: no token) should not move the k-means centres.

    k-means runs on L2-normalised features: segment means of ViT tokens differ in norm with segment size
    and content, while their direction carries the semantics (ViT features are compared by cosine
    similarity, and STEGO's cluster probe normalises too); on unit vectors, Euclidean k-means ranks by
    cosine similarity.

    k is ``num_classes``, or the number of distinct segment features when there are fewer (k-means cannot
    fill more clusters than distinct points).

    mIoU is the mean over the classes that occur in the split's labels, as in the per-image protocol
    (STEGO's nanmean would also count, as 0, a class absent from the labels that a shared id was matched
    to; on a split where every class occurs the two agree). Accuracy = matched pixels / valid pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, seed: int = 0):
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int; got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.seed = int(seed)
        self._hists: List[np.ndarray] = []
        self._feats: List[np.ndarray] = []
        self._image: List[np.ndarray] = []
        self._dim: Optional[int] = None
        self.images = 0

    def update(self, pred: np.ndarray, label: np.ndarray, features: np.ndarray) -> None:
        """Add one image: ``pred`` (H, W) segment ids 0..K-1, ``label`` (H, W), ``features`` (K, D) the mean
        feature of each segment id (rows of ids absent from ``pred`` are allowed, and ignored)."""
        features = np.asarray(features)
        if features.ndim != 2:
            raise InputError(f"features must be (K segments, D); got shape {features.shape}")
        hist = segment_histograms(pred, label, features.shape[0], self.num_classes, self.ignore_index)
        self.update_segments(hist, features)

    def update_segments(self, histograms: np.ndarray, features: np.ndarray) -> None:
        """Add one image from its (K, C) per-segment class histograms and (K, D) segment mean features."""
        hist = np.asarray(histograms)
        features = np.asarray(features, dtype=np.float64)
        if hist.ndim != 2 or hist.shape[1] != self.num_classes:
            raise InputError(f"histograms must be (K, num_classes={self.num_classes}); got shape {hist.shape}")
        if features.ndim != 2 or features.shape[0] != hist.shape[0]:
            raise InputError(f"features must be (K={hist.shape[0]}, D); got shape {features.shape}")
        if len(features) and self._dim is not None and features.shape[1] != self._dim:
            raise InputError(f"feature dimension {features.shape[1]} differs from the earlier images' {self._dim}")
        if hist.size and (not np.issubdtype(hist.dtype, np.integer) or hist.min() < 0):
            raise InputError(f"histograms must hold non-negative integer pixel counts; got dtype {hist.dtype}")
        keep = hist.sum(1) > 0
        bad = keep & ~np.isfinite(features).all(1)
        if bad.any():
            raise InputError(f"segments {np.flatnonzero(bad).tolist()} have valid pixels but non-finite features")
        self._hists.append(hist[keep].astype(np.int64))
        self._feats.append(features[keep])
        self._image.append(np.full(int(keep.sum()), self.images, dtype=np.int64))
        if len(features):
            self._dim = features.shape[1]
        self.images += 1

    @property
    def num_segments(self) -> int:
        return int(sum(len(h) for h in self._hists))

    def match(self) -> DatasetWideResult:
        """Cluster all stored segments into shared ids, then match the ids to classes (one Hungarian)."""
        from sklearn.cluster import KMeans
        C = self.num_classes
        S = self.num_segments
        if S == 0:
            return DatasetWideResult(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, C), np.int64), {})
        hist = np.concatenate(self._hists)
        X = np.concatenate([f for f in self._feats if len(f)])
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        # never more clusters than distinct points: k-means could not fill them (sklearn warns)
        k = min(C, len(np.unique(X, axis=0)))
        if k == 1:
            ids = np.zeros(S, dtype=np.int64)
        else:
            ids = KMeans(n_clusters=k, n_init=10, random_state=self.seed).fit_predict(X).astype(np.int64)
        M = np.zeros((k, C), dtype=np.int64)
        np.add.at(M, ids, hist)
        rows, cols = linear_sum_assignment(M, maximize=True)
        class_of = np.full(k, -1, dtype=np.int64)
        class_of[rows] = cols
        tp, fp, fn = self._tp_fp_fn(M, rows, cols)
        occurs = (tp + fn) > 0
        iou = {int(c): float(tp[c] / max(tp[c] + fp[c] + fn[c], 1)) for c in np.flatnonzero(occurs)}
        return DatasetWideResult(ids, class_of, M, iou)

    @staticmethod
    def _tp_fp_fn(M: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        C = M.shape[1]
        tp = np.zeros(C, dtype=np.int64)
        predicted = np.zeros(C, dtype=np.int64)
        tp[cols] = M[rows, cols]
        predicted[cols] = M[rows].sum(1)
        return tp, predicted - tp, M.sum(0) - tp

    def summary(self) -> Dict[str, Any]:
        """{"mIoU", "accuracy"} in percent, "classes" (occurring in the labels), "segments" (clustered)."""
        res = self.match()
        rows = np.flatnonzero(res.class_of_cluster >= 0)
        tp, fp, fn = self._tp_fp_fn(res.confusion, rows, res.class_of_cluster[rows])
        out = _iou_summary(tp, fp, fn, int(res.confusion.sum()))
        out["segments"] = self.num_segments
        return out

    def state(self) -> Dict[str, Any]:
        """Everything accumulated, as plain arrays (``np.savez``-able) plus the settings."""
        C = self.num_classes
        D = self._dim or 0
        feats = [f for f in self._feats if len(f)]
        return {"num_classes": C, "ignore_index": self.ignore_index, "seed": self.seed, "images": self.images,
                "histograms": np.concatenate(self._hists) if self._hists else np.zeros((0, C), np.int64),
                "features": np.concatenate(feats) if feats else np.zeros((0, D)),
                "image_index": np.concatenate(self._image) if self._image else np.zeros(0, np.int64)}

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "DatasetWideMatching":
        """Rebuild from ``state()`` (e.g. after ``np.load`` of a saved state)."""
        try:
            obj = cls(int(state["num_classes"]), int(state["ignore_index"]), int(state["seed"]))
            hist = np.asarray(state["histograms"])
            feats = np.asarray(state["features"], dtype=np.float64)
            image = np.asarray(state["image_index"], dtype=np.int64)
            images = int(state["images"])
        except KeyError as e:
            raise ValueError(f"not a DatasetWideMatching state: missing {e}") from None
        if hist.ndim != 2 or feats.ndim != 2 or not (len(hist) == len(feats) == len(image)):
            raise ValueError(f"state arrays disagree: histograms {hist.shape}, features {feats.shape}, "
                             f"image_index {image.shape}")
        for i in range(images):
            sel = image == i
            obj.update_segments(hist[sel], feats[sel])
        return obj
