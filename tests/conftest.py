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
    """Records the keyword arguments of every ``ultra_fast.engine.explain`` call (the real one runs)."""
    import ultra_fast.engine
    real = ultra_fast.engine.explain
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ultra_fast.engine, "explain", spy)
    return calls
