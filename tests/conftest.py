import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(os.environ.get("ULTRA_FAST_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))


def assets_dir(*parts: str) -> Path:
    """A folder of ../shared/assets, or skip the test with the reason."""
    path = ASSETS.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"shared assets not found at {path} (set ULTRA_FAST_ASSETS)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def explain_spy(monkeypatch):
    """Records the options (``ExplainConfig.kwargs()``, a compute dtype by its name) of every explanation
    that goes through ``explain`` / ``explain_with`` (the real one runs)."""
    import sys

    import torch
    module = sys.modules["ultra_fast.engine.explain"]
    real = module.explain_rows_with
    calls = []

    def spy(adapter, inputs, config):
        kw = config.kwargs()
        if isinstance(kw["compute_dtype"], torch.dtype):
            kw["compute_dtype"] = str(kw["compute_dtype"]).replace("torch.", "")
        calls.append(kw)
        return real(adapter, inputs, config)

    monkeypatch.setattr(module, "explain_rows_with", spy)
    return calls


def slowed_cli(argv, delay_s: float) -> list:
    """A command line running ``ultra-fast <argv>`` in a fresh interpreter, each batch delayed by ``delay_s``
    (so that a test can act on a run mid-way, e.g. kill it). The delay is patched in from outside: the
    package has no test hook of its own."""
    import sys
    code = ("import sys, time\n"
            "import ultra_fast.pipeline.runner as r\n"
            "_seg = r.segment_tensors\n"
            f"r.segment_tensors = lambda *a, **k: (time.sleep({float(delay_s)!r}), _seg(*a, **k))[1]\n"
            "from ultra_fast.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    return [sys.executable, "-c", code, *[str(a) for a in argv]]


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This CPU as one with AVX512_BF16, whatever it really has: tests of the bf16 mode's plumbing run
    everywhere (the mode itself is refused on CPUs without native bf16, see tests/test_hardware.py)."""
    from ultra_fast.engine import hardware
    monkeypatch.delenv(hardware.CAPABILITY_ENV, raising=False)
    real = hardware._torch_cpu_features()
    monkeypatch.setattr(hardware, "cpu_features", lambda: ("AVX512", {**real[1], "avx512_bf16": True}))


def two_image_folder_dataset(root: Path):
    """A generic images/ + labels/ dataset of two random 30x40 photos, each with a square object (class 1)."""
    import numpy as np
    from PIL import Image

    from ultra_fast.data import open_dataset
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        label = np.zeros((30, 40), np.uint8)
        label[5:25, 10:30] = 1
        Image.fromarray(label).save(root / "labels" / f"{i}.png")
    return open_dataset("folder", root, class_names=("background", "a"))
