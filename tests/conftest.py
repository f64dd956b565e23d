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
