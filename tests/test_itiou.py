"""ITIoU (docs/method.md §6 object selection) against hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from ultra_fast.evaluation import ITIoU, itiou_image, token_classes
from ultra_fast.evaluation import itiou as itiou_mod

# 2x2 grid: left column class 0, right column class 1. Maps equal the class masks.
LEFT, RIGHT = np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[0.0, 1.0], [0.0, 1.0]])
MASK_MAPS = np.stack([LEFT, RIGHT, LEFT, RIGHT])  # tokens row-major: (0,0) (0,1) (1,0) (1,1)


def test_token_classes_at_patch_centres():
    label = np.arange(24).reshape(4, 6)
    # 2x3 grid over 4x6: centres at rows 1, 3 and columns 1, 3, 5
    np.testing.assert_array_equal(token_classes(label, (2, 3)), [7, 9, 11, 19, 21, 23])
    label5 = np.arange(25).reshape(5, 5)
    # 2x2 grid over 5x5: centres at 1.25 -> pixel 1 and 3.75 -> pixel 3
    np.testing.assert_array_equal(token_classes(label5, (2, 2)), [6, 8, 16, 18])


def test_maps_equal_to_class_masks_score_100():
    label = np.array([[0, 1], [0, 1]])
    assert itiou_image(MASK_MAPS, label) == {0.2: 1.0}
    acc = ITIoU()
    acc.update(itiou_image(torch.from_numpy(MASK_MAPS).unsqueeze(0), label))
    assert acc.summary() == {0.2: 100.0}


def test_partial_overlap_after_bilinear_upsampling():
    # Label 4x4: left two columns class 0. LEFT upsampled (bilinear, align_corners=False) gives columns
    # 1, 0.75, 0.25, 0 (already min-max scaled). tau 0.2 -> 3 columns: IoU 2/3; tau 0.5 -> exact: 1;
    # tau 0.8 or 1.0 -> 1 column: 1/2; tau 0 -> everything: 1/2. RIGHT mirrors LEFT.
    label = np.repeat(np.array([[0, 0, 1, 1]]), 4, axis=0)
    out = itiou_image(MASK_MAPS, label, tau=(0.0, 0.2, 0.5, 0.8, 1.0))
    assert list(out) == [0.0, 0.2, 0.5, 0.8, 1.0]
    np.testing.assert_allclose(list(out.values()), [1 / 2, 2 / 3, 1.0, 1 / 2, 1 / 2], rtol=0, atol=1e-12)


def test_tau_sweep_monotone_case():
    # Grid = label = 1x4: class 0 is pixel 0. Token 0's map decays away from its object, so a higher tau
    # trims the mask towards the object: IoU 1/3 (0.2), 1/2 (0.5), 1 (0.8). Tokens 1-3 always match class 1.
    label = np.array([[0, 1, 1, 1]])
    maps = np.array([[[1.0, 0.6, 0.3, 0.0]]] + [[[0.0, 1.0, 1.0, 1.0]]] * 3)
    out = itiou_image(maps, label, tau=[0.2, 0.5, 0.8])
    np.testing.assert_allclose([out[0.2], out[0.5], out[0.8]], [(1 / 3 + 1) / 2, (1 / 2 + 1) / 2, 1.0],
                               rtol=0, atol=1e-7)


def test_ignore_pixels_excluded_from_both_masks():
    label = np.array([[0, 1], [0, 255]])
    maps = np.stack([np.array([[1.0, 0], [1, 1]]),   # token 0 (class 0) also covers the ignored pixel
                     np.array([[0.0, 1], [0, 1]]),   # token 1 (class 1)
                     np.array([[1.0, 0], [1, 1]]),   # token 2 (class 0)
                     np.random.default_rng(0).random((2, 2))])  # token 3: centre ignored, never scored
    assert itiou_image(maps, label) == {0.2: 1.0}  # 2/3 for class 0 if the ignored pixel counted
    assert token_classes(label, (2, 2)).tolist() == [0, 1, 0, 255]


def test_all_ignored_is_nan_and_skipped():
    out = itiou_image(MASK_MAPS, np.full((2, 2), 255))
    assert math.isnan(out[0.2])
    acc = ITIoU()
    for v in (0.5, 1.0):
        acc.update({0.2: v})
    acc.update(out)
    assert acc.summary() == {0.2: 75.0} and acc.skipped == {0.2: 1}
    assert ITIoU.from_state(acc.state()).summary() == {0.2: 75.0}


def test_chunking_gives_the_same_values(monkeypatch):
    rng = np.random.default_rng(1)
    label = rng.integers(0, 3, size=(30, 40))
    label[:5] = 255
    maps = rng.random((12, 3, 4))
    whole = itiou_image(maps, label, tau=(0.2, 0.6))
    monkeypatch.setattr(itiou_mod, "CHUNK_PIXELS", 2 * 30 * 40)  # two tokens per chunk
    assert itiou_image(maps, label, tau=(0.2, 0.6)) == pytest.approx(whole, abs=1e-12)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="one map per patch token"):
        itiou_image(np.zeros((3, 2, 2)), np.zeros((2, 2), int))
    with pytest.raises(TypeError, match="integer class ids"):
        itiou_image(MASK_MAPS, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="tau"):
        itiou_image(MASK_MAPS, np.zeros((2, 2), int), tau=1.5)
