"""FLOP counts, peak memory, stride targets and ``ultra-fast bench`` (ultra_fast.profiling)."""
import json
import time

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from ultra_fast import explain
from ultra_fast.cli.bench_cmd import parse_bytes
from ultra_fast.cli.main import main
from ultra_fast.profiling import explain_flops, matmul_rate
from ultra_fast.profiling.bench import parse_targets, stride_targets
from ultra_fast.profiling.memory import PeakMemory

BIG = 1 << 40  # a memory budget that keeps every target in one chunk


def tiny_vit():
    """32 px, patch 16 -> n = 4 patches + CLS, N = 5; d = 8, H = 2, MLP m = 16, L = 3 blocks."""
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=8, depth=3, num_heads=2, mlp_ratio=2,
                             num_classes=0).eval()


def test_flops_hand_count():
    # N=5, d=8, H=2, m=16, n=4, p=16, L=3, all 4 patch targets, one image.
    # block forward: 2N(3d²+d²+2dm) + 4N²d = 10·512 + 800 = 5920; patch embedding 2·n·3p²·d = 49152
    # forward = 49152 + 3·5920 = 66912
    # recompute (no fc2): 2N(3d²+d²+dm) + 4N²d = 10·384 + 800 = 4640 per block, 3 blocks, 1 chunk = 13920
    # per target: explained block 4dm + 2d² + 2Nd + 2Nd + 4Nd² + 2d² = 512+128+80+80+1280+128 = 2208
    #             block 2 (dense, input cotangent) 4Ndm + 2Nd² + 4·2N²d + 6Nd² = 2560+640+1600+1920 = 6720
    #             block 1 (dense, no input cotangent) 2560 + 640 + 400 = 3600  -> 12528, ×4 targets = 50112
    # chain (rollout): 3HN² = 150 per target and block -> 150·3·4 = 1800
    fc = explain_flops(tiny_vit(), 32, memory_budget=BIG)
    assert (fc.forward, fc.recompute, fc.backward_matmul, fc.chain_ops) == (66912, 13920, 50112, 1800)
    assert fc.total == 132744 and (fc.tokens, fc.targets, fc.chunk, fc.chunks) == (5, 4, 4, 1)
    # paper order: + 2N³ = 250 per target and block, + 2N² = 50 per target for the row pick
    assert explain_flops(tiny_vit(), 32, order="paper", memory_budget=BIG).chain_ops == 4 * (3 * 400 + 50)
    # one target per chunk: the recompute runs 4 times
    one = explain_flops(tiny_vit(), (32, 32), memory_budget=1)
    assert (one.chunk, one.chunks, one.recompute) == (1, 4, 4 * 13920)
    # two images, layer 1 only: the explained block is the lowest one, no input cotangent:
    # 4dm + 2d² + 2Nd = 512 + 128 + 80 = 720 per target
    two = explain_flops(tiny_vit(), 32, layer=1, batch=2, targets=3, memory_budget=BIG)
    assert two.backward_matmul == 2 * 3 * 720 and two.forward == 2 * (49152 + 5920)


class _NoModuleTracking:
    """FlopCounterMode's module tracker hooks every module's tensors with multi-grad hooks, which
    torch refuses inside the ``autograd.grad`` the engine calls for the activation's derivative
    ("A leaf node was passed to _will_engine_execute_node ..."); the flop counting itself needs only
    the ``parents`` set, so count everything under "Global"."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def torch_counted_flops(model, x, **kw) -> int:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        explain(model, x, backend="torch", **kw)
    return counter.get_total_flops()


@pytest.mark.parametrize("kw", [
    dict(),
    dict(order="paper"),
    dict(layer=2, start_block=2, memory_budget=1),
    dict(targets="all", memory_budget=3000),
    dict(backward="autograd"),
], ids=str)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("size", [32, 64], ids=["N5-dense", "N17-low-rank"])
def test_flops_match_torch_flop_counter(kw, batch, size):
    """The matrix products agree exactly. The one known difference: the pure-PyTorch chain ops run
    v·C̄ (rollout) or C̄·P (paper) as batched products, which FlopCounterMode counts, while the fused
    native op folds v into its 3·H·N² loop; ``reference_chain_matmul`` is that extra product.
    At 64 px (N = 17 > 2H+2) the explained block hands a LowRankCotangent down (``low_rank_pays``)."""
    model = tiny_vit()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    fc = explain_flops(model, size, batch=batch, memory_budget=kw.get("memory_budget", BIG),
                       **{k: v for k, v in kw.items() if k != "memory_budget"})
    counted = torch_counted_flops(model, x, memory_budget=kw.get("memory_budget", BIG),
                                  **{k: v for k, v in kw.items() if k != "memory_budget"})
    assert counted == fc.matmul + fc.reference_chain_matmul


def test_flops_bad_input():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        explain_flops(tiny_vit(), 30)
    with pytest.raises(ValueError, match="number of targets"):
        explain_flops(tiny_vit(), 32, targets=6)
    with pytest.raises(ValueError, match="order"):
        explain_flops(tiny_vit(), 32, order="sideways")


def test_matmul_rate_positive():
    rate = matmul_rate(torch.float32, n=64, repeats=2)
    assert 1e6 < rate < 1e15


def test_peak_memory_sees_200mb():
    with PeakMemory("cpu") as pm:
        x = torch.ones(50_000_000)  # 200 MB, every page touched
        time.sleep(0.05)
        del x
    assert 0.95 * 200e6 <= pm.peak_bytes <= 200e6 + 40e6, pm.peak_bytes
    assert pm.peak_rss >= pm.start_bytes + pm.peak_bytes
    with PeakMemory("cpu") as quiet:
        time.sleep(0.02)
    assert quiet.peak_bytes < 20e6


def test_peak_memory_bad_device():
    with pytest.raises(ValueError, match="cpu and cuda"):
        PeakMemory("meta")


def test_stride_targets():
    # grid 4x6, one prefix token: rows 0, 2 and columns 0, 2, 4 -> tokens 1 + (r·6 + c)
    assert stride_targets((4, 6), 1, 2) == [1, 3, 5, 13, 15, 17]
    # grid 5x5, no prefix: rows 0, 3 and columns 0, 3
    assert stride_targets((5, 5), 0, 3) == [0, 3, 15, 18]
    assert parse_targets("stride:2", (4, 6), 1) == [1, 3, 5, 13, 15, 17]
    assert parse_targets("3", (4, 6), 1) == [1, 2, 3]
    assert parse_targets("patches", (4, 6), 1) == "patches"
    for bad in ("stride:0", "stride:x", "0", "25", "some"):
        with pytest.raises(ValueError, match="targets"):
            parse_targets(bad, (4, 6), 1)


def test_stride_targets_pick_the_grid_patches():
    """The maps of stride targets are the all-patch maps at the lattice positions (r, c) = (k·i, k·j)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2,
                              num_classes=0).eval()
    x = torch.randn(1, 3, 64, 48)  # grid 4x3
    full = explain(model, x, backend="torch")
    picked = explain(model, x, targets=stride_targets((4, 3), 1, 2), backend="torch")
    expected = full[0].reshape(4, 3, 4, 3)[::2, ::2].reshape(-1, 4, 3)
    torch.testing.assert_close(picked[0], expected, rtol=1e-5, atol=1e-6)


def test_parse_bytes():
    assert parse_bytes("1024") == 1024
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("1.5GiB") == 3 << 29
    with pytest.raises(Exception, match="byte count"):
        parse_bytes("lots")


def test_bench_cli_json(capsys):
    rc = main(["bench", "--model", "vit_tiny_patch16_224", "--pretrained", "0", "--device", "cpu", "--size", "64",
               "--targets", "stride:2", "--repeats", "2", "--warmup", "0", "--matmul-n", "128", "--backend",
               "torch", "--segment", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    keys = {"model", "device", "dtype", "image_size", "grid", "tokens", "targets", "batch", "chunk", "chunks",
            "seconds_per_image_best", "seconds_per_image_median", "images_per_second", "flops",
            "flops_breakdown", "achieved_flops_per_second", "matmul_flops_per_second", "utilisation",
            "peak_memory_bytes", "torch_threads", "segment_images_per_second"}
    assert keys <= set(r)
    assert r["grid"] == [4, 4] and r["tokens"] == 17 and r["targets"] == 4  # stride 2 on 4x4
    assert r["seconds_per_image_best"] <= r["seconds_per_image_median"]
    assert r["images_per_second"] == pytest.approx(1 / r["seconds_per_image_best"])
    assert r["utilisation"] == pytest.approx(r["achieved_flops_per_second"] / r["matmul_flops_per_second"])
    assert r["achieved_flops_per_second"] == pytest.approx(r["flops"] / r["seconds_per_image_best"])
    assert r["flops"] == r["flops_breakdown"]["total"] > 0 and r["segment_images_per_second"] > 0


def test_bench_cli_rejects_bad_size(capsys):
    rc = main(["bench", "--model", "vit_tiny_patch16_224", "--pretrained", "0", "--device", "cpu", "--size", "50",
               "--json"])
    assert rc == 2 and "multiple" in capsys.readouterr().err


def _summarize_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize.py"
    spec = importlib.util.spec_from_file_location("bench_summarize", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summarize_ratios():
    def bench(impl, dtype, seconds, **extra):
        return {"group": "g", "name": impl, "params": {"impl": impl}, "stats": {"min": seconds, "rounds": 1},
                "extra_info": {"impl": impl, "dtype": dtype, **extra}}
    data = {"benchmarks": [bench("authors", "float32", 24.1), bench("ultra_fast[bf16]", "bfloat16", 0.5),
                           bench("ultra_fast[native]", "float32", 1.0, gflops_per_s=12.0, utilisation=0.25,
                                 peak_memory_bytes=3 << 20)]}
    rows = _summarize_module().summarize(data).splitlines()
    table = [r for r in rows if r.startswith("| ultra") or r.startswith("| authors")]
    assert table[0] == "| ultra_fast[native] | float32 | 1.00 s | 1 | 1.00× | 12.0 | 25.0 % | 3 MiB |"
    assert "| 0.50× (2.00× faster) |" in table[1] and "| 24.1× |" in table[2]


def test_malloc_reuse_is_on_after_explain_and_the_heap_can_be_given_back():
    """On glibc the first CPU explain turns off mmap for large blocks and heap trimming (the engine's
    tensors are reused instead of page-faulted in every block); release_freed_heap gives the kept
    memory back: the RSS falls after freeing a large tensor."""
    import os
    import sys

    import psutil

    from ultra_fast.engine import allocator, release_freed_heap
    if not sys.platform.startswith("linux") or allocator._libc() is None or os.environ.get("ULTRA_FAST_NO_MALLOPT"):
        pytest.skip("glibc malloc tuning applies on Linux/glibc without ULTRA_FAST_NO_MALLOPT")
    explain(tiny_vit(), torch.randn(1, 3, 32, 32))
    assert allocator._applied
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB from the heap, touched
    del x
    kept = rss()
    release_freed_heap()
    assert rss() < kept - (32 << 20)
