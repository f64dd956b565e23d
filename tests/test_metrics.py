"""Unsupervised metrics against hand-computed cases (docs/method.md §6, per-image protocol)."""
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


# --- per-image protocol rebuilt from cached confusion matrices ------------------------------------------------

def test_per_image_rebuilt_from_confusion_matrices():
    from ultra_fast.evaluation import confusion
    preds = [np.array([[4, 6, 1, 1], [4, 6, 1, 1], [2, 2, 0, 0]]), np.zeros_like(LABEL)]
    direct, cached = PerImageMatching(), PerImageMatching()
    for p in preds:
        direct.update(p, LABEL)
        M, _, classes = confusion(p, LABEL)
        cached.update_confusion(M, classes)
    assert (cached.tp, cached.fp, cached.fn, cached.valid_pixels) == \
        (direct.tp, direct.fp, direct.fn, direct.valid_pixels)
    assert cached.summary() == direct.summary()


def test_update_confusion_hand_matrix():
    m = PerImageMatching()
    # segment 0: 3 px of class 0, 1 px of class 5; segment 1: 2 px of class 5.
    m.update_confusion(np.array([[3, 1], [0, 2]]), [0, 5])
    assert m.tp == {0: 3, 5: 2} and m.fp == {0: 1, 5: 0} and m.fn == {0: 0, 5: 1}
    assert m.summary()["accuracy"] == pytest.approx(100 * 5 / 6)
    with pytest.raises(ValueError, match="one column per class"):
        m.update_confusion(np.array([[3, 1]]), [0])


# --- dataset-wide protocol (k-means shared ids + one Hungarian) ------------------------------------------------

def _three_one_segment_images():
    """Three images, each one segment; features force k-means (k=2) to group {A, B} and {C}."""
    return [(np.array([[0, 0], [0, 1]]), np.array([[1.0, 0.0]])),
            (np.array([[0, 0], [1, 1]]), np.array([[1.0, 0.05]])),
            (np.array([[1, 1], [1, 255]]), np.array([[0.0, 1.0]]))]


def test_dataset_wide_one_segment_images_hand_computed():
    from ultra_fast.evaluation import DatasetWideMatching
    m = DatasetWideMatching(num_classes=2)
    for label, feat in _three_one_segment_images():
        m.update(np.zeros(label.shape, dtype=np.int64), label, feat)
    # Shared id X = {A, B}: class 0: 3+2 = 5 px, class 1: 1+2 = 3 px; id Y = {C}: class 1: 3 px.
    # Hungarian: X->0 (5) + Y->1 (3). tp = (5, 3), fp = (3, 0), fn = (0, 3).
    # IoU 0 = 5/8, IoU 1 = 3/6; accuracy = 8/11 valid pixels.
    res = m.match()
    assert res.cluster_of_segment[0] == res.cluster_of_segment[1] != res.cluster_of_segment[2]
    np.testing.assert_array_equal(np.sort(res.confusion, axis=0), [[0, 3], [5, 3]])
    s = m.summary()
    assert s["mIoU"] == pytest.approx(100 * (5 / 8 + 3 / 6) / 2)
    assert s["accuracy"] == pytest.approx(100 * 8 / 11)
    assert (s["classes"], s["segments"]) == (2, 3)


def test_dataset_wide_fewer_segments_than_classes():
    from ultra_fast.evaluation import DatasetWideMatching
    m = DatasetWideMatching(num_classes=3)
    # k = 2 segments < 3 classes. A: class 0 5 px, class 1 3 px; B: class 2 5 px, class 1 1 px (2 ignored).
    m.update(np.zeros((2, 4), int), np.array([[0, 0, 0, 1], [0, 0, 1, 1]]), np.array([[1.0, 0.0]]))
    m.update(np.zeros((2, 4), int), np.array([[2, 2, 2, 1], [2, 2, 255, 255]]), np.array([[0.0, 1.0]]))
    # A->0 (5), B->2 (5); class 1 is unmatched: IoU0 = 5/8, IoU1 = 0/4, IoU2 = 5/6; accuracy 10/14.
    s = m.summary()
    assert s["mIoU"] == pytest.approx(100 * (5 / 8 + 0 + 5 / 6) / 3)
    assert s["accuracy"] == pytest.approx(100 * 10 / 14)
    assert (s["classes"], s["segments"]) == (3, 2)


def _permuted_images(seed=0, num_classes=4, images=3):
    """Predictions = labels up to a per-image id permutation, features = one-hot of each segment's class.

    Extra ids absent from the prediction get NaN features (allowed); ignore pixels get random ids.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(images):
        label = rng.integers(0, num_classes, size=(6, 7))
        perm = rng.permutation(num_classes + 2)  # ids 0..C+1; two of them unused
        pred = perm[label]
        feats = np.full((num_classes + 2, num_classes), np.nan)
        feats[perm[:num_classes]] = np.eye(num_classes)
        ignore = rng.random(label.shape) < 0.2
        label = np.where(ignore, 255, label)
        pred = np.where(ignore, rng.integers(0, num_classes + 2, size=label.shape), pred)
        out.append((pred, label, feats))
    return out


def test_dataset_wide_permuted_ids_score_100():
    from ultra_fast.evaluation import DatasetWideMatching
    m = DatasetWideMatching(num_classes=4)
    for pred, label, feats in _permuted_images():
        m.update(pred, label, feats)
    s = m.summary()
    assert s["mIoU"] == pytest.approx(100.0) and s["accuracy"] == pytest.approx(100.0)
    assert s["classes"] == 4 and s["segments"] == 12  # unused ids are dropped


def test_dataset_wide_ignore_pixels_never_count():
    from ultra_fast.evaluation import DatasetWideMatching
    images = _permuted_images(seed=1)
    a, b = DatasetWideMatching(4), DatasetWideMatching(4)
    for pred, label, feats in images:
        a.update(pred, label, feats)
        pred2 = np.where(label == 255, 5, 0)  # every valid pixel one segment; ignored pixels another one
        feats2 = np.array([[1.0, 0, 0, 0]] + [[np.nan] * 4] * 4 + [[0, 0, 0, 1.0]])
        b.update(pred2, label, feats2)
    valid = sum(int((l != 255).sum()) for _, l, _ in images)
    assert a.match().confusion.sum() == valid
    # b: one segment per image (the ignore-only segment is dropped), all in one shared id -> one class.
    sb = b.summary()
    assert sb["segments"] == 3
    counts = np.bincount(np.concatenate([l[l != 255] for _, l, _ in images]), minlength=4)
    assert sb["accuracy"] == pytest.approx(100 * counts.max() / valid)


def test_dataset_wide_state_round_trip(tmp_path):
    from ultra_fast.evaluation import DatasetWideMatching
    m = DatasetWideMatching(num_classes=2, seed=3)
    for label, feat in _three_one_segment_images():
        m.update(np.zeros(label.shape, dtype=np.int64), label, feat)
    np.savez(tmp_path / "state.npz", **m.state())
    with np.load(tmp_path / "state.npz") as f:
        back = DatasetWideMatching.from_state({k: f[k] for k in f.files})
    assert back.summary() == m.summary() and back.seed == 3 and back.images == 3
    # resuming: one more image after the round trip equals one more image on the original
    extra = (np.array([[1, 0]]), np.array([[1, 0]]), np.array([[0.0, 1.0], [1.0, 0.0]]))
    m.update(*extra)
    back.update(*extra)
    assert back.summary() == m.summary()


def test_dataset_wide_bad_input_is_named():
    from ultra_fast.evaluation import DatasetWideMatching
    m = DatasetWideMatching(num_classes=2)
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        m.update(np.zeros((1, 2), int), np.array([[0, 7]]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="prediction ids must be in 0..0"):
        m.update(np.array([[0, 1]]), np.array([[0, 1]]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        m.update(np.zeros((1, 2), int), np.array([[0, 1]]), np.full((1, 3), np.nan))


def test_segment_mean_features_hand_computed():
    from ultra_fast.evaluation import segment_mean_features
    feats = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    out = segment_mean_features(feats, np.array([[0, 1], [0, 2]]), 4)
    np.testing.assert_array_equal(out[:3], [[3.0, 4.0], [3.0, 4.0], [7.0, 8.0]])
    assert np.isnan(out[3]).all()
    with pytest.raises(ValueError, match="3 token cluster ids for 4"):
        segment_mean_features(feats, np.array([0, 1, 2]), 3)
