"""Native ops (torch.ops.ultra_fast.*) against the pure-PyTorch reference ops."""
from __future__ import annotations

import random

import pytest
import torch

from ultra_fast import ops
from ultra_fast.engine import reference_ops as ref

needs_native = pytest.mark.skipif(
    not ops.is_available("cpu"),
    reason="ultra_fast._C not built (pip install --no-build-isolation -e .)")
_cuda_skip = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.is_available("cuda")),
    reason="needs a CUDA device and the extension built with CUDA kernels")


def needs_cuda(test):
    return pytest.mark.cuda(_cuda_skip(test))


OPS = ("contribution", "rollout_step", "paper_step")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(B, T, H, N, dtype=torch.float64, device="cpu", seed=0, layout="contiguous"):
    """Random (v, P, G, A). layout="strided": the views the engine passes (G a transpose(0, 1)
    of a (T, B, H, N, N) tensor) and more (A, v, P non-contiguous too)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, positive=False):
        x = torch.rand(*shape, generator=gen, dtype=torch.float64) if positive else \
            torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x.to(device=device, dtype=dtype)

    if layout == "contiguous":
        A = rnd(B, H, N, N, positive=True).softmax(-1)
        G = rnd(B, T, H, N, N)
        v = rnd(B, T, N, positive=True)
        P = rnd(B, T, N, N)
    else:
        A = rnd(H, B, N, N, positive=True).softmax(-1).transpose(0, 1)
        G = rnd(T, B, H, N, N).transpose(0, 1)
        v = rnd(B, N, T, positive=True).transpose(1, 2)  # non-unit stride along N
        P = rnd(T, B, N, N).transpose(0, 1)
    return v, P, G, A


def args_for(name, v, P, G, A):
    return {"contribution": (G, A), "rollout_step": (v, G, A), "paper_step": (P, G, A)}[name]


def assert_matches_reference(name, args, dtype, rtol=None):
    """Native output vs the reference computed in float64 from the same (rounded) inputs."""
    out = getattr(torch.ops.ultra_fast, name)(*args)
    expected = getattr(ref, name)(*[a.double() for a in args])
    assert out.dtype == dtype and out.shape == expected.shape and out.is_contiguous()
    rtol = TOL[dtype] if rtol is None else rtol
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=rtol * scale)


def random_shapes(count, seed=1234, budget=2_000_000):
    """(B, T, H, N) with N in 2..257, H 1..16, T 1..64, B 1..3, B*T*H*N*N <= budget."""
    rng = random.Random(seed)
    shapes = []
    while len(shapes) < count:
        B, T, H, N = rng.randint(1, 3), rng.randint(1, 64), rng.randint(1, 16), rng.randint(2, 257)
        if B * T * H * N * N <= budget:
            shapes.append((B, T, H, N))
    return shapes


EDGE_SHAPES = [(1, 1, 1, 2), (1, 1, 16, 257), (3, 64, 1, 5), (2, 3, 2, 1), (1, 7, 12, 197)]


# --------------------------------------------------------------------------------------------
# Correctness on CPU


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("shape", EDGE_SHAPES + random_shapes(8), ids=str)
def test_ops_match_reference_cpu(shape, layout, dtype):
    v, P, G, A = make_inputs(*shape, dtype=dtype, seed=hash(shape) % 1000, layout=layout)
    for name in OPS:
        assert_matches_reference(name, args_for(name, v, P, G, A), dtype)


@needs_native
def test_engine_sized_float32():
    """One ViT-B/16-sized block (N=197, H=12, T=64), G as the engine passes it."""
    v, P, G, A = make_inputs(1, 64, 12, 197, dtype=torch.float32, seed=3, layout="strided")
    for name in OPS:
        assert_matches_reference(name, args_for(name, v, P, G, A), torch.float32)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_hot_and_zero_rows(dtype):
    """v starts one-hot (the kernels skip zero entries) and G has exact zeros."""
    B, T, H, N = 2, 6, 3, 11
    v, P, G, A = make_inputs(B, T, H, N, dtype=dtype, seed=5)
    v = torch.zeros_like(v)
    v[:, torch.arange(T), torch.arange(T) % N] = 1.0
    G[..., ::2, :] = 0.0
    assert_matches_reference("rollout_step", (v, G, A), dtype)
    assert_matches_reference("rollout_step", (torch.zeros_like(v), G, A), dtype)
    assert_matches_reference("contribution", (G, A), dtype)


@needs_native
def test_non_unit_last_stride_and_expanded():
    """G and A with a non-unit last stride (copied internally) and A broadcast over B."""
    v, P, G, A = make_inputs(2, 4, 3, 9, seed=7)
    Gt = G.transpose(-1, -2)
    At = A[:1].transpose(-1, -2).expand(2, -1, -1, -1)
    for name in OPS:
        assert_matches_reference(name, args_for(name, v, P, Gt, At), torch.float64)


@needs_native
def test_empty_dimensions():
    v, P, G, A = make_inputs(2, 0, 3, 5)
    assert ops.rollout_step(v, G, A).shape == (2, 0, 5)
    assert ops.contribution(G, A).shape == (2, 0, 5, 5)
    assert ops.paper_step(P, G, A).shape == (2, 0, 5, 5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unbatched_wrappers(dtype):
    v, P, G, A = make_inputs(1, 5, 4, 13, dtype=dtype, seed=11, layout="strided")
    v0, P0, G0, A0 = v[0], P[0], G[0], A[0]
    c = ops.contribution(G0, A0)
    r = ops.rollout_step(v0, G0, A0)
    p = ops.paper_step(P0, G0, A0)
    assert c.shape == (5, 13, 13) and r.shape == (5, 13) and p.shape == (5, 13, 13)
    torch.testing.assert_close(c, ops.contribution(G, A)[0], rtol=0, atol=0)
    torch.testing.assert_close(r, ops.rollout_step(v, G, A)[0], rtol=0, atol=0)
    torch.testing.assert_close(p, ops.paper_step(P, G, A)[0], rtol=0, atol=0)
    assert_matches_reference("rollout_step", (v, G, A), dtype)


@needs_native
def test_chain_of_rollout_steps_equals_product():
    """Streaming v <- v + v C over blocks equals e_i^T (I + C_l) ... (I + C_s)."""
    B, T, H, N, L = 1, 4, 2, 9, 3
    blocks = [make_inputs(B, T, H, N, seed=20 + k)[2:] for k in range(L)]
    v = torch.zeros(B, T, N, dtype=torch.float64)
    v[0, torch.arange(T), torch.arange(T)] = 1.0
    for G, A in blocks:  # blocks in backward order: latest first
        v = ops.rollout_step(v, G, A)
    P = torch.eye(N, dtype=torch.float64).expand(B, T, N, N).contiguous()
    for G, A in blocks:
        P = ops.paper_step(P, G, A)
    expected_rows = torch.stack([
        torch.linalg.multi_dot([torch.eye(N, dtype=torch.float64)]
                               + [torch.eye(N, dtype=torch.float64) + ref.contribution(G, A)[0, t]
                                  for G, A in blocks])[t] for t in range(T)])
    torch.testing.assert_close(v[0], expected_rows, rtol=1e-12, atol=1e-12)
    expected_P = torch.stack([
        torch.linalg.multi_dot([torch.eye(N, dtype=torch.float64)]
                               + [torch.eye(N, dtype=torch.float64) + ref.contribution(G, A)[0, t]
                                  for G, A in reversed(blocks)]) for t in range(T)])
    torch.testing.assert_close(P[0], expected_P, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Argument checking


@needs_native
@pytest.mark.parametrize("call, match", [
    (lambda v, P, G, A: ops.contribution(G[:, :, :, :-1], A),
     r"contribution: G must have shape \(B, T, H, N, N\) matching A"),
    (lambda v, P, G, A: ops.contribution(G, A[..., :-1]),
     r"contribution: A must have shape \(B, H, N, N\)"),
    (lambda v, P, G, A: ops.contribution(G[:, :, :2], A),
     r"contribution: G must have shape"),
    (lambda v, P, G, A: ops.rollout_step(v[:, :-1], G, A),
     r"rollout_step: v must have shape \(B, T, N\) matching G"),
    (lambda v, P, G, A: ops.rollout_step(v, G[:1], A),
     r"rollout_step: G must have shape \(B, T, H, N, N\) matching A"),
    (lambda v, P, G, A: ops.paper_step(P[..., :-1], G, A),
     r"paper_step: P must have shape \(B, T, N, N\) matching G"),
    (lambda v, P, G, A: torch.ops.ultra_fast.rollout_step(v[0], G[0], A[0]),
     r"rollout_step: A must have shape \(B, H, N, N\)"),
    (lambda v, P, G, A: ops.rollout_step(v.float(), G, A),
     r"rollout_step: v must have G.s dtype"),
    (lambda v, P, G, A: ops.paper_step(P, G.float(), A),
     r"paper_step: G and A must have the same dtype"),
    (lambda v, P, G, A: ops.contribution(G.half(), A.half()),
     r"contribution: the CPU kernels support float32 and float64; got Half"),
    (lambda v, P, G, A: ops.rollout_step(v.int(), G.int(), A.int()),
     r"rollout_step: the CPU kernel supports float32, float64 and bfloat16; got Int"),
    (lambda v, P, G, A: ops.contribution(G[:, :, :0], A[:, :0]),
     r"contribution: need at least one head"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_errors_name_the_argument(call, match):
    v, P, G, A = make_inputs(2, 3, 4, 6)
    with pytest.raises(RuntimeError, match=match):
        call(v, P, G, A)


@needs_native
def test_device_mismatch_is_reported():
    v, P, G, A = make_inputs(1, 2, 2, 4)
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(RuntimeError, match=r"rollout_step: .*same (dtype and )?device"):
        ops.rollout_step(v, G.to(other), A)
    with pytest.raises(RuntimeError, match=r"contribution: all inputs must be on the same device"):
        ops.contribution(G, A.to(other))


def test_missing_extension_reports_how_to_build(monkeypatch):
    monkeypatch.setattr(ops, "_LOADED", False)
    assert not ops.is_available("cpu") and not ops.is_available("cuda")
    assert ops.build_info()["built"] is False
    G, A = torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        ops.contribution(G, A)


@needs_native
def test_build_info_and_availability():
    info = ops.build_info()
    assert info["built"] and info["cpu"] is True
    assert isinstance(info["cuda"], bool) and isinstance(info["openmp"], bool)
    assert info["torch"] == torch.__version__
    assert ops.is_available("cpu")
    assert ops.is_available("cuda") == info["cuda"]
    assert not ops.is_available("mps")


# --------------------------------------------------------------------------------------------
# torch.library checks (schema, fake kernels, autograd registration, AOT dispatch)


@needs_native
@pytest.mark.parametrize("name", OPS)
def test_opcheck_cpu(name):
    for layout in ("contiguous", "strided"):
        v, P, G, A = make_inputs(2, 3, 2, 5, seed=4, layout=layout)
        torch.library.opcheck(getattr(torch.ops.ultra_fast, name), args_for(name, v, P, G, A))
    v, P, G, A = (x.requires_grad_() for x in make_inputs(1, 2, 2, 4, seed=8))
    torch.library.opcheck(getattr(torch.ops.ultra_fast, name), args_for(name, v, P, G, A))


@needs_native
@pytest.mark.parametrize("name", OPS)
def test_gradients_match_reference(name):
    small = [x.clone().requires_grad_()
             for x in args_for(name, *make_inputs(1, 2, 2, 3, seed=10, layout="strided"))]
    torch.autograd.gradcheck(getattr(ops, name), small)
    v, P, G, A = make_inputs(2, 3, 2, 5, seed=9)
    args = [x.clone().requires_grad_() for x in args_for(name, v, P, G, A)]
    args_ref = [x.detach().clone().requires_grad_() for x in args]
    out, out_ref = getattr(ops, name)(*args), getattr(ref, name)(*args_ref)
    grad = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad(out, args, grad),
                        torch.autograd.grad(out_ref, args_ref, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


@needs_native
def test_torch_compile_fullgraph():
    v, P, G, A = make_inputs(1, 3, 2, 6, seed=12)
    f = torch.compile(lambda v, G, A: ops.rollout_step(v, G, A) * 2, fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(v, G, A), 2 * ref.rollout_step(v, G, A), rtol=1e-12,
                               atol=1e-12)


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("shape", EDGE_SHAPES + random_shapes(4, seed=99), ids=str)
def test_ops_match_reference_cuda(shape, layout, dtype):
    v, P, G, A = make_inputs(*shape, dtype=dtype, device="cuda", seed=1, layout=layout)
    for name in OPS:
        args = args_for(name, v, P, G, A)
        out = getattr(torch.ops.ultra_fast, name)(*args)
        assert out.device.type == "cuda" and out.dtype == dtype
        # Reference in float32 from the same (rounded) inputs; kernels accumulate in float32.
        expected = getattr(ref, name)(*[a.float() for a in args])
        scale = expected.abs().max().item() or 1.0
        torch.testing.assert_close(out.float(), expected, rtol=TOL[dtype],
                                   atol=TOL[dtype] * scale)


@needs_cuda
def test_cuda_float64_and_current_stream():
    v, P, G, A = make_inputs(2, 5, 3, 33, dtype=torch.float64, device="cuda", layout="strided")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        outs = {name: getattr(torch.ops.ultra_fast, name)(*args_for(name, v, P, G, A))
                for name in OPS}
    stream.synchronize()
    for name in OPS:
        expected = getattr(ref, name)(*args_for(name, v, P, G, A))
        torch.testing.assert_close(outs[name], expected, rtol=1e-12, atol=1e-12)


@needs_cuda
@pytest.mark.parametrize("name", OPS)
def test_opcheck_cuda(name):
    v, P, G, A = make_inputs(2, 3, 2, 5, device="cuda", seed=4, layout="strided")
    torch.library.opcheck(getattr(torch.ops.ultra_fast, name), args_for(name, v, P, G, A))


@needs_cuda
def test_cuda_errors():
    v, P, G, A = make_inputs(1, 2, 2, 4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        ops.rollout_step(v, G, A.cpu())
    with pytest.raises(RuntimeError, match="CUDA kernels support"):
        ops.contribution(G.int(), A.int())
