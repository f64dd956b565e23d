"""Native ops vs pure-PyTorch formulations, at ViT-B/16-like (N=197, H=12) and ViT-H/14-like
(N=257, H=16) block sizes, T=64 targets, B=1, float32, CPU.

Run:
    pytest benchmarks/bench_ops.py --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=min,median,mean,rounds
The parenthesised factors in each group's table are ratios to its fastest row (same run).
For a one-screen summary of native-vs-best-torch speedups:
    python benchmarks/bench_ops.py

v is dense (not one-hot: the native rollout kernel skips zero entries of v, which would
flatter it). G is the (B, T, H, N, N) gradient, the largest operand; all formulations read the
same tensors.
"""
from __future__ import annotations

import functools
import time

import pytest
import torch

from ultra_fast import ops
from ultra_fast.engine import reference_ops as ref

SIZES = {"N197_H12_T64": (1, 64, 12, 197), "N257_H16_T64": (1, 64, 16, 257)}


@functools.lru_cache(maxsize=1)
def inputs(size: str):
    B, T, H, N = SIZES[size]
    g = torch.Generator().manual_seed(0)
    A = torch.rand(B, H, N, N, generator=g).softmax(-1)
    G = torch.randn(B, T, H, N, N, generator=g)
    v = torch.rand(B, T, N, generator=g)
    P = torch.randn(B, T, N, N, generator=g)
    return v, P, G, A


# Pure-torch formulations. relu(G) * A == relu(G * A) because A >= 0, which lets the in-place
# variants fuse the clamp into one temporary.
def contribution_inplace(G, A):
    return (G * A.unsqueeze(1)).clamp_(min=0).sum(2).div_(A.shape[1])


IMPLS = {
    "contribution": {
        "native": lambda v, P, G, A: ops.contribution(G, A),
        "torch_reference": lambda v, P, G, A: ref.contribution(G, A),
        "torch_inplace": lambda v, P, G, A: contribution_inplace(G, A),
    },
    "rollout_step": {
        "native": lambda v, P, G, A: ops.rollout_step(v, G, A),
        "torch_reference": lambda v, P, G, A: ref.rollout_step(v, G, A),
        "torch_broadcast": lambda v, P, G, A: v + (
            (G.clamp(min=0) * A.unsqueeze(1)) * v[..., None, :, None]).sum((2, 3)) / A.shape[1],
        "torch_matmul": lambda v, P, G, A: v + (
            v[:, :, None, None, :] @ (G * A.unsqueeze(1)).clamp_(min=0)).sum((2, 3)) / A.shape[1],
        "torch_contribution_bmm": lambda v, P, G, A: v + (
            v.unsqueeze(-2) @ contribution_inplace(G, A)).squeeze(-2),
    },
    "paper_step": {
        "native": lambda v, P, G, A: ops.paper_step(P, G, A),
        "torch_reference": lambda v, P, G, A: ref.paper_step(P, G, A),
        "torch_inplace_baddbmm": lambda v, P, G, A: torch.baddbmm(
            P.flatten(0, 1), contribution_inplace(G, A).flatten(0, 1),
            P.flatten(0, 1)).view_as(P),
    },
}

CASES = [(op, impl) for op in IMPLS for impl in IMPLS[op]]


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op, impl", CASES, ids=[f"{o}-{i}" for o, i in CASES])
def test_op(benchmark, op, impl, size):
    if impl == "native" and not ops.is_available("cpu"):
        pytest.skip("native ops not built (pip install --no-build-isolation -e .)")
    benchmark.group = f"{op} {size} fp32 cpu"
    args = inputs(size)
    out = benchmark.pedantic(IMPLS[op][impl], args=args, rounds=7, iterations=1,
                             warmup_rounds=1)
    expected = getattr(ref, op)(*{"contribution": args[2:], "rollout_step": (args[0], *args[2:]),
                                   "paper_step": args[1:]}[op])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _min_time(fn, args, rounds=7):
    fn(*args)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native build: {ops.build_info()}")
    for size in SIZES:
        args = inputs(size)
        for op, impls in IMPLS.items():
            times = {name: _min_time(fn, args) for name, fn in impls.items()}
            best_torch = min((t, n) for n, t in times.items() if n != "native")
            print(f"{op:13s} {size}: native {times['native'] * 1e3:7.1f} ms | best torch "
                  f"({best_torch[1]}) {best_torch[0] * 1e3:7.1f} ms | speedup "
                  f"{best_torch[0] / times['native']:.1f}x")


if __name__ == "__main__":
    main()
