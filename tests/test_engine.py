"""The fast engine against the naive one-backward-per-token reference (docs/method.md §2-3)."""
import pytest
import torch
from exactness import cubic, engine_vs_naive, learned_weights, mixed_targets, rel_err

from ultra_fast import explain, explain_authors, explain_naive

import models_zoo as zoo

MODEL_KEYS = list(zoo.MODELS)


def scalar_args(name, model_key):
    if name == "learned":
        model, size = zoo.get(model_key)
        return dict(scalar="learned", weights=learned_weights(model, size))
    if name == "callable":
        return dict(scalar=cubic)
    return dict(scalar=name)


@pytest.mark.parametrize("model_key", MODEL_KEYS)
@pytest.mark.parametrize("scalar", ["sum", "energy", "norm", "learned", "callable"])
def test_engine_matches_naive_fp64(model_key, scalar):
    model, size = zoo.get(model_key)
    x = zoo.images(size)
    assert engine_vs_naive(model, x, **scalar_args(scalar, model_key)) <= 1e-9


@pytest.mark.parametrize("model_key", MODEL_KEYS)
@pytest.mark.parametrize("order", ["rollout", "paper"])
def test_orders_start_block_layer_and_target_subsets(model_key, order):
    model, size = zoo.get(model_key)
    targets = mixed_targets(model, prefix="first")
    assert engine_vs_naive(model, zoo.images(size), order=order, start_block=3, layer=-3, targets=targets,
                           scalar="energy") <= 1e-9


@pytest.mark.parametrize("order", ["rollout", "paper"])
def test_all_tokens_and_per_image_targets(order):
    model, size = zoo.get("dinov2_s14_reg")
    x = zoo.images(size)
    fast = explain(model, x, targets="all", order=order, layer=6)
    assert rel_err(fast, explain_naive(model, x, targets="all", order=order, layer=6)) <= 1e-9
    per_image = torch.tensor([[5, 9, 0], [16, 1, 7]])
    fast = explain(model, x, targets=per_image, order=order)
    assert rel_err(fast, explain_naive(model, x, targets=per_image, order=order)) <= 1e-9


@pytest.mark.parametrize("model_key", ["clip_b32", "open_clip_b32"])
def test_memory_budget_forces_chunks_with_same_maps(model_key):
    model, size = zoo.get(model_key)
    x = zoo.images(size)
    whole = explain(model, x, targets="all", order="paper")
    for budget in (1, 3 * 2 ** 20):  # one target per chunk; a few targets per chunk
        chunked = explain(model, x, targets="all", order="paper", memory_budget=budget)
        assert rel_err(chunked, whole) <= 1e-12
    assert rel_err(whole, explain_naive(model, x, targets="all", order="paper")) <= 1e-9


@pytest.mark.parametrize("model_key", MODEL_KEYS)
def test_batch_has_no_leakage_between_images(model_key):
    model, size = zoo.get(model_key)
    x = zoo.images(size, batch=2)
    assert not torch.allclose(x[0], x[1])
    both = explain(model, x)
    for b in range(2):
        alone = explain(model, x[b:b + 1])
        assert rel_err(both[b:b + 1], alone) <= 1e-12
    assert rel_err(both[0], both[1]) > 1e-3, "different images must give different maps"


@pytest.mark.parametrize("model_key", MODEL_KEYS)
def test_fp32_engine_matches_fp64_reference(model_key):
    model64, size = zoo.get(model_key)
    model32, _ = zoo.get(model_key, torch.float32)
    x = zoo.images(size)
    fast32 = explain(model32, x.float())
    assert fast32.dtype == torch.float32
    ref = explain_naive(model64, x)
    assert rel_err(fast32.double(), ref) <= 1e-4


def test_authors_algorithm_matches_naive():
    model, size = zoo.get("dino_s16")
    x = zoo.images(size)
    for order in ("rollout", "paper"):
        kw = dict(order=order, targets=[0, 3, 7], start_block=2, layer=10)
        assert rel_err(explain_authors(model, x, **kw), explain_naive(model, x, **kw)) <= 1e-9


def test_self_entry_is_max_of_the_others():
    model, size = zoo.get("dino_s16")
    x = zoo.images(size, batch=1)
    raw = explain(model, x, self_max=False).flatten(2)
    maps = explain(model, x).flatten(2)
    n = maps.shape[-1]
    for t in range(n):
        others = torch.cat([raw[0, t, :t], raw[0, t, t + 1:]])
        assert maps[0, t, t] == others.max()
        assert raw[0, t, t] > others.max(), "without the replacement the skip connection dominates"
        assert torch.equal(torch.cat([maps[0, t, :t], maps[0, t, t + 1:]]), others)


def test_upsampling_sizes_and_modes():
    model, size = zoo.get("dino_s16")
    x = zoo.images(size, batch=1)
    grid = explain(model, x)
    up = explain(model, x, size="input")
    assert up.shape[-2:] == x.shape[-2:]
    ref = torch.nn.functional.interpolate(grid[0].unsqueeze(1), size=x.shape[-2:], mode="bilinear",
                                          align_corners=False)
    assert torch.allclose(up[0], ref[:, 0])
    bic = explain(model, x, size=(30, 40), interpolation="bicubic")
    assert bic.shape[-2:] == (30, 40)


def test_model_is_left_unchanged():
    model, size = zoo.get("clip_b32")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        explain(model, zoo.images(size), targets=[1, 2])
        assert model.training and all(m.training for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
        assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    finally:
        model.eval()


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(layer=13), ValueError, "layer=13"),
    (dict(layer=-13), ValueError, "layer=-13"),
    (dict(start_block=0), ValueError, "start_block"),
    (dict(start_block=5, layer=4), ValueError, "start_block"),
    (dict(order="forward"), ValueError, "order"),
    (dict(scalar="entropy"), ValueError, "scalar"),
    (dict(scalar="learned"), ValueError, "weights"),
    (dict(targets="cls"), ValueError, "targets"),
    (dict(targets=[0, 99]), IndexError, r"\[0, 13\)"),
    (dict(targets=torch.tensor([0.5])), TypeError, "integers"),
    (dict(interpolation="nearest", size=(8, 8)), ValueError, "interpolation"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_options_raise_clear_errors(kwargs, err, match):
    model, size = zoo.get("dino_s16")
    with pytest.raises(err, match=match):
        explain(model, zoo.images(size, batch=1), **kwargs)


def test_bad_images_raise_clear_errors():
    model, _ = zoo.get("dino_s16")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        explain(model, torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        explain(model, torch.randn(1, 3, 40, 32, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating"):
        explain(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("model_key", MODEL_KEYS)
@pytest.mark.parametrize("order", ["rollout", "paper"])
def test_native_backend_matches_torch_backend(model_key, order):
    from ultra_fast.ops import is_available
    if not is_available("cpu"):
        pytest.skip("native ops not built (pip install --no-build-isolation -e .)")
    model, size = zoo.get(model_key, torch.float32)
    x = zoo.images(size, dtype=torch.float32)
    native = explain(model, x, order=order, targets="all", backend="native")
    torch_ = explain(model, x, order=order, targets="all", backend="torch")
    assert rel_err(native, torch_) <= 1e-5
    model64, _ = zoo.get(model_key)
    ref = explain_naive(model64, x.double(), order=order, targets="all")
    assert rel_err(native.double(), ref) <= 1e-4
    assert rel_err(explain(model64, x.double(), order=order, targets="all", backend="native"), ref) <= 1e-9


@pytest.mark.parametrize("model_key", MODEL_KEYS)
@pytest.mark.parametrize("backward", ["manual", "autograd"])
def test_both_block_backwards_match_naive(model_key, backward):
    model, size = zoo.get(model_key)
    x = zoo.images(size)
    for kw in (dict(order="paper", start_block=2, layer=-2, targets="all"), dict(order="rollout", layer=1)):
        fast = explain(model, x, backward=backward, **kw)
        assert rel_err(fast, explain_naive(model, x, **kw)) <= 1e-9


def test_blocks_outside_the_manual_backward_fall_back_to_autograd():
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4, qk_norm=True,
                              num_classes=0).eval().double()
    x = zoo.images((32, 24))
    with pytest.raises(ValueError, match="not a plain pre-norm ViT block"):
        explain(model, x, backward="manual")
    assert rel_err(explain(model, x), explain_naive(model, x)) <= 1e-9


def test_compute_dtype_bfloat16_is_close_to_float32(bf16_cpu):
    """The bf16 backward mode: inexact by design; maps stay close to the exact fp32 maps."""
    import timm
    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    exact = explain(m, x)[0]
    fast = explain(m, x, compute_dtype=torch.bfloat16)[0]
    assert fast.dtype == exact.dtype and fast.shape == exact.shape
    cos = torch.nn.functional.cosine_similarity(exact.flatten(1), fast.flatten(1), dim=1)
    assert cos.min() > 0.99, cos.min()
    assert not torch.equal(exact, fast)  # it really ran in bf16
    with pytest.raises(ValueError, match="hand-written backward"):
        explain(m, x, compute_dtype=torch.bfloat16, backward="autograd")


@pytest.mark.parametrize("model_key", MODEL_KEYS)
@pytest.mark.parametrize("low_rank", [True, False])
def test_explained_block_hands_down_low_rank_or_dense_cotangents(model_key, low_rank, monkeypatch, bf16_cpu):
    """Both forms of the explained block's input cotangent (``LowRankCotangent`` or dense), forced
    whatever the token count, give the naive maps; bf16 mode takes the low-rank form too."""
    from ultra_fast.engine import block_backward as bb
    monkeypatch.setattr(bb, "low_rank_pays", lambda N, H: low_rank)
    model, size = zoo.get(model_key)
    x = zoo.images(size)
    for kw in (dict(targets="all", scalar="norm"), dict(order="paper", layer=-2, start_block=2, targets=[0, 2])):
        assert rel_err(explain(model, x, **kw), explain_naive(model, x, **kw)) <= 1e-9
    if model_key == "dino_s16":
        m32, _ = zoo.get(model_key, torch.float32)
        exact = explain(m32, x.float())
        fast = explain(m32, x.float(), compute_dtype=torch.bfloat16)
        cos = torch.nn.functional.cosine_similarity(exact.flatten(2), fast.flatten(2), dim=2)
        assert cos.min() > 0.99, cos.min()


def test_low_rank_cotangent_matches_its_dense_form():
    from ultra_fast.engine.block_backward import LowRankCotangent, _layer_norm_backward_low_rank
    from ultra_fast.engine.reference_ops import layer_norm_backward_
    g = torch.Generator().manual_seed(0)
    T, B, N, r, D, M = 3, 2, 9, 4, 8, 5
    u, pm = torch.randn(T, B, N, r, generator=g, dtype=torch.float64), torch.randn(T, B, r, D, generator=g,
                                                                                   dtype=torch.float64)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    xhat = (x - x.mean(-1, keepdim=True)) / x.std(-1, unbiased=False, keepdim=True)
    rstd = torch.rand(B, N, 1, generator=g, dtype=torch.float64) + 0.5
    tok = torch.randint(0, N, (T, B), generator=g)
    row = torch.nn.functional.one_hot(tok, N).double().unsqueeze(-1)
    res = torch.randn(T, B, D, generator=g, dtype=torch.float64)
    u = torch.cat([u, row], -1)  # the last column marks the target's own row
    pm = torch.cat([pm, torch.randn(T, B, 1, D, generator=g, dtype=torch.float64)], -2)
    lr = _layer_norm_backward_low_rank(u, pm, xhat, rstd, res)
    want = layer_norm_backward_(u @ pm, xhat, rstd) + row * res.unsqueeze(-2)
    assert lr.u.shape[-1] == r + 2
    assert isinstance(lr, LowRankCotangent)
    torch.testing.assert_close(lr.dense(), want, rtol=1e-12, atol=1e-12)
    w = torch.randn(D, M, generator=g, dtype=torch.float64)
    torch.testing.assert_close(lr.matmul(w), want @ w, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("model_key", ["dino_s16", "dinov2_s14_reg", "open_clip_b32"])
def test_cuda_engine_matches_cpu_float64(model_key, backend):
    """explain on CUDA in float32 (TF32 off) = the CPU float64 engine, every token, two images."""
    import copy
    m64, size = zoo.get(model_key, torch.float64)
    x = zoo.images(size, batch=2)
    ref = explain(m64, x, targets="all", backend="torch")
    m32 = copy.deepcopy(m64).float().cuda()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = explain(m32, x.float().cuda(), targets="all", backend=backend)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert got.is_cuda and got.dtype == torch.float32
    assert float((got.double().cpu() - ref).norm() / ref.norm()) < 1e-4
