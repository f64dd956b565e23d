"""Floating-point operation counts of the fast engine, and this machine's matrix-multiply rate.

The count follows what ``ultra_fast.engine.explain`` does (docs/method.md §3), step by step, so that the
achieved rate of a timed run (FLOPs / seconds) can be compared with the rate of one large matrix
product on the same device and dtype (``matmul_rate``): their ratio is the utilisation.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple, Union, cast

import torch
from torch import nn

from ..engine.block_backward import low_rank_pays
from ..engine.options import bytes_per_target, check_order, chunk_size, resolve_layer, resolve_start
from ..errors import ConfigError
from ..models import Adapter, wrap

ImageSize = Union[int, Tuple[int, int]]
TargetSpec = Union[str, int, Sequence[int], torch.Tensor]


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one ``explain`` call, split by phase (all for the whole batch).

    ``forward``: the graph-free forward to the explained layer (patch embedding included).
    ``recompute``: each chunk's recomputation of blocks s..l (``block_forward``), and the per-image
    product the block below the explained one shares between targets (``xhat·W``, see
    ``LowRankCotangent``).
    ``backward_matmul``: the matrix products of the batched block backward.
    ``chain_ops``: the fused chain ops' arithmetic (rollout_step / paper_step).
    ``reference_chain_matmul``: not part of ``total``: the matrix products the pure-PyTorch chain ops
    (``backend="torch"``) run instead (v·C̄ or C̄·P per block, and the paper order's final row pick);
    this is what ``torch.utils.flop_counter`` sees of the chain there.
    """

    forward: int
    recompute: int
    backward_matmul: int
    chain_ops: int
    reference_chain_matmul: int
    batch: int
    targets: int
    tokens: int
    chunk: int
    chunks: int

    @property
    def total(self) -> int:
        return self.forward + self.recompute + self.backward_matmul + self.chain_ops

    @property
    def matmul(self) -> int:
        """The matrix products outside the chain ops (what a FLOP counter sees of them on any backend)."""
        return self.forward + self.recompute + self.backward_matmul

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(total=self.total, matmul=self.matmul)
        return out


@dataclass(frozen=True)
class _Geometry:
    num_blocks: int
    num_heads: int
    dim: int
    num_prefix: int
    patch: Tuple[int, int]
    mlp_hidden: Tuple[int, ...]  # per block
    manual: Tuple[bool, ...]  # per block: the hand-written backward (True) or autograd (False)


def _mlp_hidden_fallback(adapter: Adapter) -> int:
    """MLP width for blocks without a ``PreNormBlock`` spec: the first Linear widening d to neither d nor 3d."""
    d = adapter.embed_dim
    for m in adapter.modules():
        if isinstance(m, nn.Linear) and m.in_features == d and m.out_features not in (d, 3 * d):
            return m.out_features
    return 4 * d


def _geometry(adapter: Adapter, autograd: bool = False) -> _Geometry:
    specs = [adapter.block_spec(i) for i in range(adapter.num_blocks)]
    fallback = None if all(s is not None for s in specs) else _mlp_hidden_fallback(adapter)
    # fallback is None only when every block has a spec, so it is never used then
    hidden = tuple(int(s.fc1_weight.shape[0]) if s is not None else cast(int, fallback) for s in specs)
    manual = tuple(s is not None and not autograd for s in specs)
    patch = cast(Tuple[int, int], tuple(adapter.preprocessing.patch_size))  # (ph, pw) by the config's type
    return _Geometry(adapter.num_blocks, adapter.num_heads, adapter.embed_dim, adapter.num_prefix_tokens,
                     patch, hidden, manual)


def _num_targets(targets: TargetSpec, n: int, P: int) -> int:
    if isinstance(targets, str):
        counts = {"patches": n, "all": n + P, "prefix": P}
        if targets not in counts:
            raise ConfigError(f"unknown targets {targets!r}; expected 'patches', 'all', 'prefix', a count or indices")
        T = counts[targets]
    elif isinstance(targets, bool):
        raise TypeError("targets must be a name, a count or token indices; got a bool")
    elif isinstance(targets, int):
        T = targets
    elif isinstance(targets, torch.Tensor):
        T = int(targets.shape[-1]) if targets.dim() else 1
    else:
        T = len(targets)
    if not 1 <= T <= n + P:
        raise ConfigError(f"number of targets must lie in 1..{n + P} (the token count); got {T}")
    return T


def block_forward_flops(N: int, d: int, m: int, with_fc2: bool = True) -> int:
    """One block's forward on N tokens: qkv, scores, A·V, proj, fc1 (and fc2)."""
    mlp = 2 * d * m if with_fc2 else d * m
    return 2 * N * (3 * d * d + d * d + mlp) + 4 * N * N * d


def explained_block_flops(N: int, d: int, m: int, H: int, need_input_grad: bool) -> int:
    """Backward of the explained block per target, which runs on one row (``block_backward_one_row``)."""
    mlp = 2 * 2 * d * m
    proj = 2 * d * d
    g_row = 2 * N * d  # go · vᵀ for the target's row
    if not need_input_grad:
        return mlp + proj + g_row
    gq_row = 2 * N * d  # (softmax-backward row) · k
    q_row = 2 * d * d
    if low_rank_pays(N, H):
        r = 2 * H + 1  # k and v per head, the target's row
        kv_path = 2 * 2 * d * d + 2 * N * r + 2 * N * d * r  # per-head factors; LayerNorm's two row means
    else:
        kv_path = 2 * N * 2 * d * d  # dense k/v cotangents through the qkv weight
    return mlp + proj + g_row + gq_row + kv_path + q_row


def low_rank_input_flops(N: int, d: int, m: int, H: int, manual: bool) -> Tuple[int, int]:
    """(per target, per image and chunk) change to the next block's cost when it receives the explained
    block's ``LowRankCotangent`` (rank r = 2H+2): fc2's transposed product as u·(p·W) - w·(xhat·W) instead
    of 2·N·d·m, plus the dense form the residual path needs (2·N·r·d). An autograd block only densifies."""
    r = 2 * H + 2
    dense = 2 * N * r * d
    if not manual:
        return dense, 0
    return dense + 2 * r * d * m + 2 * N * r * m - 2 * N * d * m, 2 * N * d * m


def dense_block_flops(N: int, d: int, m: int, need_input_grad: bool) -> int:
    """Backward of a block over all N rows per target (``block_backward``)."""
    out = 2 * 2 * N * d * m + 2 * N * d * d + 2 * N * N * d  # MLP, proj, G = go·vᵀ
    if need_input_grad:
        out += 3 * 2 * N * N * d + 2 * N * 3 * d * d  # gv, gq, gk, and the qkv weight
    return out


def explain_flops(model_or_adapter: Union[nn.Module, Adapter], image_size: ImageSize,
                  targets: TargetSpec = "patches", layer: int = -1, start_block: int = 1,
                  order: str = "rollout", batch: int = 1, memory_budget: Optional[int] = None,
                  backward: str = "auto") -> FlopCount:
    """FLOPs of ``ultra_fast.explain`` on ``batch`` images of ``image_size`` (an int or (H, W)).

    What is counted: matrix products as 2·M·N·K (linear layers, the patch-embedding convolution,
    the attention products, the backward's products), and the fused chain ops' arithmetic: per
    target and block, 3·H·N² for ``rollout_step`` (relu, multiply, accumulate; the row vector's
    weight is folded into the same loop) and additionally 2·N³ for ``paper_step``'s product, plus the
    paper order's final row pick (2·N² per target). LayerNorm, softmax, activations, biases and other
    elementwise work are not counted. The one-row explained block costs per target: MLP 2·2·d·m,
    proj 2·d², G row 2·N·d, and when the input cotangent is needed q-gradient row 2·N·d, k/v path
    2·N·2d·d, q row 2·d². A dense block costs per target: MLP 2·2·N·d·m, proj 2·N·d², G 2·N²·d, and
    when the input cotangent is needed (all but block s) 3·2·N²·d (gv, gq, gk) + 2·N·3d·d (qkv).
    Where the explained block hands a rank-(2H+2) cotangent down (``low_rank_pays``: 2H+2 < N) its
    k/v path costs 4·d² + 2·N·(2H+1)·(d+1) instead, and the block below runs fc2's product in
    factored form (``low_rank_input_flops``). Recomputation skips fc2, which the backward does not
    need. Blocks the hand-written backward cannot take (autograd) are counted as a
    full forward and a dense backward, the explained block included. ``targets``: ``"patches"``,
    ``"all"``, ``"prefix"``, a count or token indices. Chunks follow the engine's own rule
    (``options.chunk_size``) for ``memory_budget`` on the model's device and dtype.
    """
    adapter = wrap(model_or_adapter)
    check_order(order)
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a positive int; got {batch!r}")
    if backward not in ("auto", "manual", "autograd"):
        raise ConfigError(f"unknown backward {backward!r}; expected 'auto', 'manual' or 'autograd'")
    g = _geometry(adapter, backward == "autograd")
    H_img, W_img = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    ph, pw = g.patch
    if H_img % ph or W_img % pw or H_img < ph or W_img < pw:
        raise ConfigError(f"image size {H_img}x{W_img} is not a positive multiple of the patch size {ph}x{pw}")
    n = (H_img // ph) * (W_img // pw)
    N, d, Hh = n + g.num_prefix, g.dim, g.num_heads
    l = resolve_layer(layer, g.num_blocks)
    s = resolve_start(start_block, l)
    T = _num_targets(targets, n, g.num_prefix)
    elem = torch.empty((), dtype=adapter.dtype).element_size()
    per_target = bytes_per_target(batch, N, Hh, d, elem, order)
    step = chunk_size(memory_budget, per_target, T, adapter.device)
    chunks = math.ceil(T / step)

    blocks = range(s - 1, l)  # 0-based indices of blocks s..l
    embed = 2 * n * (3 * ph * pw) * d
    forward = batch * (embed + sum(block_forward_flops(N, d, g.mlp_hidden[b]) for b in range(l)))
    recompute = chunks * batch * sum(block_forward_flops(N, d, g.mlp_hidden[b], with_fc2=not g.manual[b])
                                     for b in blocks)
    per_target_bwd = 0
    for b in blocks:
        m = g.mlp_hidden[b]
        if b == l - 1 and g.manual[b]:
            per_target_bwd += explained_block_flops(N, d, m, Hh, need_input_grad=b > s - 1)
            if b > s - 1 and low_rank_pays(N, Hh):
                below, shared = low_rank_input_flops(N, d, g.mlp_hidden[b - 1], Hh, g.manual[b - 1])
                per_target_bwd += below
                recompute += chunks * batch * shared
        else:
            per_target_bwd += dense_block_flops(N, d, m, need_input_grad=b > s - 1)
    nb = len(blocks)
    chain = 3 * Hh * N * N * nb
    ref_chain = 2 * N * N * nb
    if order == "paper":
        chain += 2 * N ** 3 * nb + 2 * N * N
        ref_chain = 2 * N ** 3 * nb + 2 * N * N
    bt = batch * T
    return FlopCount(forward=forward, recompute=recompute, backward_matmul=bt * per_target_bwd,
                     chain_ops=bt * chain, reference_chain_matmul=bt * ref_chain, batch=batch, targets=T,
                     tokens=N, chunk=step, chunks=chunks)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 4096, device: Union[str, torch.device] = "cpu",
                repeats: int = 3) -> float:
    """FLOP/s of one n×n by n×n matrix product (2·n³ FLOPs), best of ``repeats`` after one warm-up."""
    if n < 1 or repeats < 1:
        raise ConfigError(f"n and repeats must be positive; got n={n}, repeats={repeats}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
