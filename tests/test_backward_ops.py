"""The fused backward pieces (softmax_backward_, layer_norm_backward_) against the pure-torch
formulas, opcheck, errors; and the bfloat16 CPU rollout_step against float64."""
import pytest
import torch

from ultra_fast import ops
from ultra_fast.engine import reference_ops as ref

needs_native = pytest.mark.skipif(not ops.is_available("cpu"), reason="native ops not built")
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and ops.is_available("cuda")),
                                reason="needs a CUDA device and the CUDA build")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}

# (leading dims of attn, T, R, M): engine-like (B, H), single group, R != M, wide rows
SOFTMAX_SHAPES = [((1, 12), 5, 197, 197), ((2, 3), 1, 7, 7), ((4,), 3, 5, 9), ((1, 2), 2, 3, 1025)]
# (grad shape, xhat shape): repeated over targets, per-target rows (the explained block), 1 row
LN_SHAPES = [((6, 2, 17, 64), (2, 17, 64)), ((5, 3, 48), (5, 3, 48)), ((3, 1, 1, 768), (1, 1, 768))]


def softmax_inputs(lead, T, R, M, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(*lead, T, R, M, generator=g, dtype=torch.float64)
    attn = torch.rand(*lead, R, M, generator=g, dtype=torch.float64).softmax(-1)
    return grad.to(device, dtype), attn.to(device, dtype)


def ln_inputs(gshape, xshape, dtype, device="cpu", seed=0, residual=True):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(*gshape, generator=g, dtype=torch.float64)
    xhat = torch.randn(*xshape, generator=g, dtype=torch.float64)
    rstd = torch.rand(*xshape[:-1], 1, generator=g, dtype=torch.float64) + 0.5
    res = torch.randn(*gshape, generator=g, dtype=torch.float64) if residual else None
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(grad), cast(xhat), cast(rstd), cast(res)


def close(out, expected, dtype):
    scale = expected.abs().max().clamp_min(1.0)
    err = (out.double() - expected).abs().max() / scale
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"
    assert err >= 0  # a NaN fails the comparison above


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=str)
def test_softmax_backward_matches_formula(shape, dtype):
    grad, attn = softmax_inputs(*shape, dtype)
    expected = ref.softmax_backward_(grad.double().clone(), attn.double())
    out = ops.softmax_backward_(grad, attn)
    assert out.data_ptr() == grad.data_ptr()  # in place
    close(out, expected, dtype)


@needs_native
def test_softmax_backward_is_the_softmax_vjp():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    attn = x.softmax(-1)
    cot = torch.randn(2, 3, 4, 6, 6, dtype=torch.float64)  # 4 targets
    expected = torch.stack([torch.autograd.grad(attn, x, cot[:, :, t], retain_graph=True)[0] for t in range(4)], 2)
    out = ops.softmax_backward_(cot.clone(), attn.detach())
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shapes", LN_SHAPES, ids=str)
@pytest.mark.parametrize("residual", [True, False])
def test_layer_norm_backward_matches_formula(shapes, residual, dtype):
    grad, xhat, rstd, res = ln_inputs(*shapes, dtype, residual=residual)
    expected = ref.layer_norm_backward_(grad.double().clone(), xhat.double(), rstd.double(),
                                        None if res is None else res.double())
    out = ops.layer_norm_backward_(grad, xhat, rstd, res)
    assert out.data_ptr() == grad.data_ptr()
    close(out, expected, dtype)


@needs_native
def test_layer_norm_backward_is_the_layer_norm_vjp():
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, dtype=torch.float64)
    y = torch.nn.functional.layer_norm(x, (10,), w, None, eps=1e-6)
    cot = torch.randn(5, 3, 10, dtype=torch.float64)
    expected = torch.stack([torch.autograd.grad(y, x, cot[t], retain_graph=True)[0] for t in range(5)])
    mean, var = x.detach().mean(-1, keepdim=True), x.detach().var(-1, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + 1e-6)
    out = ops.layer_norm_backward_((cot * w).contiguous(), (x.detach() - mean) * rstd, rstd)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@needs_native
def test_opcheck():
    grad, attn = softmax_inputs((1, 2), 3, 4, 5, torch.float32)
    torch.library.opcheck(torch.ops.ultra_fast.softmax_backward_, (grad, attn))
    g, x, r, res = ln_inputs((3, 2, 8), (2, 8), torch.float32)
    torch.library.opcheck(torch.ops.ultra_fast.layer_norm_backward_, (g, x, r, res))
    torch.library.opcheck(torch.ops.ultra_fast.layer_norm_backward_, (g, x, r, None))


@needs_native
@pytest.mark.parametrize("call, match", [
    (lambda: ops.softmax_backward_(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4)), "does not match"),
    (lambda: ops.softmax_backward_(torch.zeros(2, 3, 4, 4).transpose(-1, -2), torch.zeros(2, 4, 4)),
     "contiguous"),
    (lambda: ops.softmax_backward_(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.float64)), "dtype"),
    (lambda: ops.softmax_backward_(torch.zeros(1, 2, 3, 3, dtype=torch.int32), torch.zeros(1, 3, 3, dtype=torch.int32)),
     "support"),
    (lambda: ops.layer_norm_backward_(torch.zeros(2, 3, 8), torch.zeros(4, 8), torch.zeros(4)), "trailing"),
    (lambda: ops.layer_norm_backward_(torch.zeros(2, 3, 8), torch.zeros(3, 8), torch.zeros(2)), "rstd"),
    (lambda: ops.layer_norm_backward_(torch.zeros(2, 3, 8), torch.zeros(3, 8), torch.zeros(3), torch.zeros(3, 8)),
     "residual"),
])
def test_errors_name_the_problem(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


@needs_native
@pytest.mark.parametrize("strided", [False, True])
def test_rollout_step_bfloat16_cpu(strided):
    g = torch.Generator().manual_seed(3)
    B, T, H, N = 2, 5, 4, 37
    v = torch.randn(B, T, N, generator=g, dtype=torch.float64)
    G = torch.randn(T, B, H, N, N, generator=g, dtype=torch.float64)
    G = G.transpose(0, 1) if strided else G.transpose(0, 1).contiguous()
    A = torch.rand(B, H, N, N, generator=g, dtype=torch.float64).softmax(-1)
    bf = lambda t: t.bfloat16()  # noqa: E731
    # The reference sees the same bfloat16-rounded inputs, so only accumulation differs.
    expected = ref.rollout_step(bf(v).double(), bf(G).double(), bf(A).double())
    out = ops.rollout_step(bf(v), bf(G), bf(A))
    assert out.dtype == torch.bfloat16
    close(out, expected, torch.bfloat16)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_formula(dtype):
    for shape in SOFTMAX_SHAPES:
        grad, attn = softmax_inputs(*shape, dtype, device="cuda")
        expected = ref.softmax_backward_(grad.double().cpu().clone(), attn.double().cpu())
        close(ops.softmax_backward_(grad, attn).cpu(), expected, dtype)
    for shapes in LN_SHAPES:
        grad, xhat, rstd, res = ln_inputs(*shapes, dtype, device="cuda")
        expected = ref.layer_norm_backward_(grad.double().cpu().clone(), xhat.double().cpu(), rstd.double().cpu(),
                                            res.double().cpu())
        close(ops.layer_norm_backward_(grad, xhat, rstd, res).cpu(), expected, dtype)


@needs_native
def test_rollout_step_float32_state_with_bfloat16_G_cpu():
    """explain(compute_dtype=bfloat16) keeps the chain state in float32 with a bf16 G."""
    g = torch.Generator().manual_seed(4)
    B, T, H, N = 1, 6, 3, 29
    v = torch.randn(B, T, N, generator=g, dtype=torch.float64)
    G = torch.randn(B, T, H, N, N, generator=g, dtype=torch.float64).bfloat16()
    A = torch.rand(B, H, N, N, generator=g, dtype=torch.float64).softmax(-1).bfloat16()
    out = ops.rollout_step(v.float(), G, A)
    assert out.dtype == torch.float32
    expected = ref.rollout_step(v.float().double(), G.double(), A.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="float32 with a bfloat16"):
        ops.rollout_step(v, G, A)  # float64 state with bf16 G is not a supported mix
