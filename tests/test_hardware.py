"""Capability-aware fast modes: refusal of a non-native half dtype, the ``auto`` / ``--fast`` choice,
float32 statistics under a bf16 backward, the memory model, and the CUDA-ops self-check."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import ultra_fast
from ultra_fast import ops
from ultra_fast.engine import backend, hardware, options, reference_ops
from ultra_fast.engine.block_backward import block_forward, cast_block
from ultra_fast.errors import ConfigError, UnsupportedHardwareError

import models_zoo

CPU = torch.device("cpu")


@pytest.fixture
def avx2_cpu(monkeypatch):
    """This CPU as an AVX2-only one (no AVX-512, AVX512_BF16 or AMX), as the package's probes see it."""
    monkeypatch.setenv(hardware.CAPABILITY_ENV, "AVX2")


def _model():
    model, size = models_zoo.get("dino_s16", torch.float32)
    return model, models_zoo.images(size, batch=1, dtype=torch.float32)


def test_probe_reports_avx2_override(avx2_cpu):
    capability, features = hardware.cpu_features()
    assert capability == "AVX2" and features["avx512_bf16"] is False and features["amx_tile"] is False
    native, why = hardware.cpu_native(torch.bfloat16)
    assert not native and "AVX2" in why and "AVX512_BF16" in why
    assert hardware.cpu_native(torch.float32)[0]


def test_explicit_bf16_refused_before_any_work(avx2_cpu, monkeypatch):
    model, x = _model()
    adapter = ultra_fast.wrap(model)
    calls = []
    monkeypatch.setattr(type(adapter), "embed", lambda self, *a: calls.append(1))
    for name in ("bfloat16", torch.bfloat16):
        with pytest.raises(UnsupportedHardwareError) as e:
            ultra_fast.explain(adapter, x, targets=[1, 2], compute_dtype=name)
        msg = str(e.value)
        assert "AVX2" in msg and "bfloat16" in msg and "--target-stride" in msg and "auto" in msg
    assert calls == []  # refused before the forward
    assert isinstance(e.value, ValueError)  # a config error: users' `except ValueError` keeps working


def test_auto_without_native_bf16_is_exact(avx2_cpu):
    model, x = _model()
    assert options.resolve_compute_dtype("auto", CPU) is None
    exact = ultra_fast.explain(model, x, targets=[1, 5, 9])
    auto = ultra_fast.explain(model, x, targets=[1, 5, 9], compute_dtype="auto")
    assert torch.equal(auto, exact)
    mode = options.fast_mode(CPU)
    assert mode.compute_dtype is None and mode.target_stride == options.FAST_STRIDE
    assert "AVX2" in mode.reason


def test_auto_with_native_bf16_picks_bf16(bf16_cpu):
    assert options.resolve_compute_dtype("auto", CPU) == torch.bfloat16
    assert options.resolve_compute_dtype("bfloat16", CPU) == torch.bfloat16
    mode = options.fast_mode(CPU)
    assert mode.compute_dtype == torch.bfloat16 and mode.target_stride == 1
    # a half-precision model has nothing faster to go to
    assert options.resolve_compute_dtype("auto", CPU, torch.bfloat16) is None


def test_compute_dtype_names_validated_in_one_place():
    assert options.parse_compute_dtype(None) is None and options.parse_compute_dtype("exact") is None
    assert options.resolve_compute_dtype("float32", CPU, torch.float32) is None  # the model's own dtype
    assert options.resolve_compute_dtype("float32", CPU, torch.float64) == torch.float32
    with pytest.raises(ConfigError, match="unknown compute_dtype 'bf16'"):
        options.parse_compute_dtype("bf16")
    with pytest.raises(ConfigError, match="not supported"):
        options.parse_compute_dtype(torch.int8)


def test_auto_on_this_cpu_is_not_slower_than_fp32():
    """For real, on whatever CPU runs the tests: ``auto`` takes bfloat16 only where a bf16 product is not
    slower than a float32 one. The margin is wide on purpose: a non-native bf16 product is ~100-500x slower,
    a native one 2-4x faster, so only a wrong choice can fail this."""
    chosen = options.resolve_compute_dtype("auto", CPU)
    if chosen is None:
        assert not hardware.cpu_native(torch.bfloat16)[0]
        return
    a32, b32 = torch.randn(512, 512), torch.randn(512, 512)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def best(a, b):
        torch.mm(a, b)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    assert best(a16, b16) <= 3.0 * best(a32, b32)


def _cli(args, env_extra, timeout):
    env = {**os.environ, **env_extra}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ultra_fast", *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    return p, time.perf_counter() - t0


BENCH = ["bench", "--model", "vit_tiny_patch16_224", "--pretrained", "0", "--size", "64", "--repeats", "1",
         "--warmup", "0", "--matmul-n", "256", "--json"]


def test_cli_bench_bf16_refused_fast_on_avx2():
    p, seconds = _cli(BENCH + ["--compute-dtype", "bfloat16"], {hardware.CAPABILITY_ENV: "AVX2"}, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "AVX2" in p.stderr and "bfloat16" in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""  # nothing was timed


def test_cli_bench_fast_on_avx2_runs_exact_with_stride():
    p, _ = _cli(BENCH + ["--fast"], {hardware.CAPABILITY_ENV: "AVX2"}, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["compute_dtype"] is None
    assert r["targets"] == 4 * 4 // 4  # 64 px / 16 = a 4x4 grid, every 2nd patch along rows and columns
    assert "--fast: exact float32 backward with target stride 2" in p.stderr
    hw = r["hardware"]
    assert hw["cpu_capability"] == "AVX2" and hw["capability_forced_by"].endswith("AVX2") and hw["cpu_model"]
    assert r["matmul_rates"]["bfloat16"] == {**r["matmul_rates"]["bfloat16"], "n": 256, "native": False}
    assert r["matmul_rates"]["float32"]["native"] is True


def test_layer_norm_statistics_stay_float32_under_bf16():
    model, x = _model()
    adapter = ultra_fast.wrap(model)
    spec = adapter.block_spec(0)
    with torch.no_grad():
        attn, saved = block_forward(spec, adapter.embed(x))
    _, attn16, kept = cast_block(spec, attn, saved, torch.bfloat16)
    assert attn16.dtype == torch.bfloat16 and kept["xhat1"].dtype == torch.bfloat16
    assert kept["rstd1"].dtype == torch.float32 and kept["rstd2"].dtype == torch.float32
    assert torch.equal(kept["rstd1"], saved["rstd1"])


@pytest.mark.parametrize("impl", ["native", "torch"])
def test_layer_norm_backward_bf16_grad_float32_rstd(impl):
    if impl == "native" and not ops.is_available("cpu"):
        pytest.skip("native ops not built")
    f = ops.layer_norm_backward_ if impl == "native" else reference_ops.layer_norm_backward_
    g = torch.Generator().manual_seed(0)
    grad, xhat = torch.randn(3, 2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g)
    rstd = torch.rand(2, 7, generator=g) * 40 + 10  # large: bf16 rounding of rstd would show
    want = reference_ops.layer_norm_backward_(grad.double(), xhat.double(), rstd.double())
    got = f(grad.bfloat16(), xhat.bfloat16(), rstd)
    assert got.dtype == torch.bfloat16
    err32 = ((got.double() - want).norm() / want.norm()).item()
    rounded = f(grad.bfloat16(), xhat.bfloat16(), rstd.bfloat16() if impl == "torch" else rstd.bfloat16())
    err16 = ((rounded.double() - want).norm() / want.norm()).item()
    assert err32 < 8e-3 and err32 <= err16


def test_native_layer_norm_backward_rejects_float64_rstd_for_bf16():
    if not ops.is_available("cpu"):
        pytest.skip("native ops not built")
    grad, xhat = torch.randn(2, 5, 8).bfloat16(), torch.randn(5, 8).bfloat16()
    with pytest.raises(RuntimeError, match="rstd must have grad's dtype"):
        ops.layer_norm_backward_(grad, xhat, torch.rand(5, dtype=torch.float64))


def test_bytes_per_target_counts_half_backward_and_float32_copy():
    B, N, H, d = 1, 197, 12, 768
    fp32 = options.bytes_per_target(B, N, H, d, 4, "paper")
    bf16 = options.bytes_per_target(B, N, H, d, 4, "paper", compute_elem=2)
    copied = options.bytes_per_target(B, N, H, d, 4, "paper", compute_elem=2, casts_G=True)
    assert bf16 == fp32 - (4 * H * N * N + 16 * N * d) * 2
    assert copied - bf16 == H * N * N * 4


def test_bf16_paper_order_chunks_account_for_the_copy(bf16_cpu, monkeypatch):
    """explain sizes its chunks with the float32 copy of G that a bf16 paper-order step keeps."""
    seen = []
    real = options.bytes_per_target

    def spy(*a, **k):
        seen.append(k)
        return real(*a, **k)

    import importlib
    explain_mod = importlib.import_module("ultra_fast.engine.explain")
    monkeypatch.setattr(explain_mod, "bytes_per_target", spy)
    model, x = _model()
    ultra_fast.explain(model, x, targets=[1, 2], order="paper", compute_dtype="bfloat16")
    ultra_fast.explain(model, x, targets=[1, 2], order="rollout", compute_dtype="bfloat16")
    assert seen[0] == {"compute_elem": 2, "casts_G": True}
    assert seen[1]["compute_elem"] == 2 and seen[1]["casts_G"] is (not ops.is_available("cpu"))


def test_ops_self_check_passes_and_catches_a_wrong_kernel(monkeypatch):
    """The check ``backend='auto'`` runs before trusting CUDA kernels, exercised on the CPU kernels."""
    if not ops.is_available("cpu"):
        pytest.skip("native ops not built")
    backend._self_check.cache_clear()
    assert backend._self_check(CPU, torch.float32) == (True, "passed")
    monkeypatch.setattr(ops, "rollout_step", lambda v, G, A: reference_ops.rollout_step(v, G, A) * 1.001)
    backend._self_check.cache_clear()
    ok, why = backend._self_check(CPU, torch.float32)
    assert not ok and "rollout_step" in why
    backend._self_check.cache_clear()


def test_trust_env_overrides_self_check(monkeypatch):
    monkeypatch.setattr(backend, "_self_check", lambda device, dtype: (False, "kernel wrong"))
    monkeypatch.setenv(backend.TRUST_ENV, "1")
    assert backend.cuda_ops_trusted(torch.device("cuda", 0), torch.float32)
    monkeypatch.setenv(backend.TRUST_ENV, "0")
    assert not backend.cuda_ops_trusted(torch.device("cuda", 0), torch.float32)


def test_gpu_check_dry_run_lists_the_plan(tmp_path):
    """benchmarks/gpu_check.py, as gpu.sh runs it without a GPU: the plan, written, exit 0."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    summary = json.loads((tmp_path / "gpu_summary.json").read_text())
    assert summary["dry_run"] is True and summary["hardware"]["cpu_model"]
    plan = "\n".join(summary["plan"])
    for needle in ("self-check", "open_clip", "DINOv2-S/14", "backend=torch, backward bfloat16", "batch 8, tf32"):
        assert needle in plan
    assert "DRY RUN" in (tmp_path / "gpu_summary.md").read_text()


def test_capped_isa_reads_as_no_native_bf16_and_is_really_slow():
    """For real: this CPU with torch's and oneDNN's ISA capped at AVX2 behaves as an AVX2-only CPU (its bf16
    product takes the slow path), and the probes see it that way, so ``auto`` stays exact."""
    code = ("import time, torch\n"
            "from ultra_fast.engine import options\n"
            "def t(dt):\n"
            "    a = torch.randn(768, 768).to(dt); torch.mm(a, a); s = time.perf_counter(); torch.mm(a, a)\n"
            "    return time.perf_counter() - s\n"
            "print(options.resolve_compute_dtype('auto', 'cpu'), min(t(torch.bfloat16) for _ in range(3)) / "
            "min(t(torch.float32) for _ in range(3)))\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
           "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    env.pop(hardware.CAPABILITY_ENV, None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    chosen, slowdown = p.stdout.split()
    assert chosen == "None"
    assert float(slowdown) > 3.0  # the non-native bf16 path: ~16x slower at 768² here, ~500x on a Zen 3
