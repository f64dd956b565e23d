"""Unsupervised segmentation metrics (SPEC §6): per-image Hungarian matching, accumulated over a dataset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion(pred: np.ndarray, label: np.ndarray, ignore_index: int = 255):
    """(segments x classes) pixel counts over valid pixels, with the segment and class ids they index."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and labels {label.shape} differ in size; "
                         f"predictions are compared at label resolution")
    valid = label != ignore_index
    p, l = pred[valid].astype(np.int64), label[valid].astype(np.int64)
    segs, p_idx = np.unique(p, return_inverse=True)
    classes, l_idx = np.unique(l, return_inverse=True)
    M = np.zeros((len(segs), len(classes)), dtype=np.int64)
    np.add.at(M, (p_idx, l_idx), 1)
    return M, segs, classes


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
        if M.size == 0:
            return
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
