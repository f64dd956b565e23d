"""End-to-end cost of explaining every patch token: ultra_fast vs the naive loop vs the authors' algorithm.

Run: pytest benchmarks/bench_engine.py --benchmark-group-by=group --benchmark-columns=min,mean,rounds
The table's parenthesised factors are the ratios to the fastest row of each group (same run).
"""
import functools

import pytest
import torch

from ultra_fast import explain, explain_authors, explain_naive
from ultra_fast.ops import is_available

# geometry -> (timm architecture, input size); random weights: speed does not depend on them.
GEOMETRIES = {
    "clip_b32_224": ("vit_base_patch32_clip_224", 224),
}


@functools.lru_cache(maxsize=None)
def model(arch):
    torch.manual_seed(0)
    import timm
    return timm.create_model(arch, pretrained=False).eval()


def images(size):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


IMPLS = {
    "ultra_fast[native]": lambda m, x: explain(m, x, backend="native"),
    "ultra_fast[torch]": lambda m, x: explain(m, x, backend="torch"),
    "naive_loop": explain_naive,
    "authors": explain_authors,
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_all_patch_tokens(benchmark, geometry, impl):
    if impl.endswith("[native]") and not is_available("cpu"):
        pytest.skip("native ops not built")
    arch, size = GEOMETRIES[geometry]
    m, x = model(arch), images(size)
    benchmark.group = f"explain all patch tokens: {geometry} fp32 cpu"
    rounds = 2 if impl == "authors" else 5
    maps = benchmark.pedantic(IMPLS[impl], args=(m, x), rounds=rounds, iterations=1, warmup_rounds=1)
    assert maps.shape[1] == (size // 32) ** 2


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_backends_clip_b16(benchmark, backend):
    """Native vs pure-torch chain ops inside the engine, where the ops matter more (N=197)."""
    if backend == "native" and not is_available("cpu"):
        pytest.skip("native ops not built")
    m, x = model("vit_base_patch16_clip_224"), images(224)
    benchmark.group = "explain all patch tokens: clip_b16_224 fp32 cpu, chain backend"
    maps = benchmark.pedantic(lambda: explain(m, x, backend=backend), rounds=2, iterations=1, warmup_rounds=1)
    assert maps.shape[1] == 196
