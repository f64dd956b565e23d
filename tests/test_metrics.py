"""Unsupervised metrics against hand-computed cases (SPEC §6, per-image protocol)."""
import numpy as np
import pytest

from ultra_fast.evaluation import PerImageMatching

LABEL = np.array([[0, 0, 1, 1],
                  [0, 0, 1, 1],
                  [2, 2, 255, 255]])


def test_permuted_ids_score_100():
    m = PerImageMatching()
    m.update(np.array([[5, 5, 3, 3], [5, 5, 3, 3], [9, 9, 0, 1]]), LABEL)
    assert m.summary() == {"mIoU": 100.0, "accuracy": 100.0, "classes": 3}


def test_one_segment_hand_computed():
    m = PerImageMatching()
    m.update(np.zeros_like(LABEL), LABEL)
    # The single segment matches class 0 (4 px): IoU 4/10; classes 1 and 2 get nothing.
    assert m.iou() == {0: 0.4, 1: 0.0, 2: 0.0}
    assert m.summary()["mIoU"] == pytest.approx(100 * 0.4 / 3)
    assert m.summary()["accuracy"] == pytest.approx(40.0)


def test_ignore_pixels_never_count():
    a, b = LABEL.copy(), LABEL.copy()
    pred = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 7, 8]])
    m1, m2 = PerImageMatching(), PerImageMatching()
    m1.update(pred, a)
    pred2 = pred.copy()
    pred2[2, 2:] = [1, 2]  # only ignore pixels change
    m2.update(pred2, b)
    assert m1.summary() == m2.summary() and m1.valid_pixels == 10


def test_unmatched_segments_are_errors_and_totals_accumulate():
    m = PerImageMatching()
    # Class 0 split in two segments: one is matched, the other's 2 px are false negatives of class 0.
    m.update(np.array([[4, 6, 1, 1], [4, 6, 1, 1], [2, 2, 0, 0]]), LABEL)
    assert m.iou()[0] == pytest.approx(2 / 4)
    m.update(LABEL.copy(), LABEL)
    assert m.tp[0] == 2 + 4 and m.fn[0] == 2 and m.valid_pixels == 20


def test_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="label resolution"):
        PerImageMatching().update(np.zeros((2, 2)), LABEL)
