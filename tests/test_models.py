"""Adapters reproduce the unmodified models, leave them untouched, and refuse what they cannot run."""
import pytest
import torch
from torch import nn

from ultra_fast import UnsupportedModelError, create_model, wrap
from ultra_fast.models import preprocess

import models_zoo as zoo


def test_open_clip_adapter_reproduces_the_model():
    import open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = model.encode_image(x)
        out = wrap(model)(x)
    assert ref.abs().max() > 1e-3
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name, size", [
    ("vit_base_patch32_clip_224", (224, 224)),
    ("vit_base_patch32_clip_224", (96, 160)),
    ("vit_small_patch16_224", (64, 48)),
    ("vit_small_patch14_reg4_dinov2", (56, 84)),
])
def test_timm_adapter_reproduces_the_model(name, size):
    import timm
    model = timm.create_model(name, pretrained=False).eval()
    # The same weights with timm's own dynamic-size path are the oracle for non-native sizes.
    dyn = timm.create_model(name, pretrained=False, dynamic_img_size=True).eval()
    dyn.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = dyn.forward_head(dyn.forward_features(x))
        out = wrap(model)(x)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("key", list(zoo.MODELS))
def test_attention_probabilities_are_in_the_graph(key):
    model, size = zoo.get(key)
    adapter = wrap(model)
    x = zoo.images(size, batch=1)
    z = adapter.embed(x)
    out, attn = adapter.block(0, z)
    N = z.shape[1]
    assert attn.shape == (1, adapter.num_heads, N, N)
    assert torch.allclose(attn.sum(-1), torch.ones(1, adapter.num_heads, N, dtype=attn.dtype))
    assert attn.requires_grad and attn.grad_fn is not None


def test_prefix_tokens_and_metadata():
    assert wrap(zoo.get("dinov2_s14_reg")[0]).num_prefix_tokens == 5
    assert wrap(zoo.get("clip_b32")[0]).num_prefix_tokens == 1
    oc = wrap(zoo.get("open_clip_b32")[0])
    assert (oc.num_prefix_tokens, oc.num_blocks, oc.num_heads, oc.embed_dim) == (1, 12, 12, 768)


def test_unsupported_models_are_named():
    with pytest.raises(UnsupportedModelError, match="Sequential"):
        wrap(nn.Sequential(nn.Linear(2, 2)))
    import timm
    with pytest.raises(UnsupportedModelError, match="ResNet"):
        wrap(timm.create_model("resnet18", pretrained=False))


def test_create_model_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no_such_vit'"):
        create_model("no_such_vit")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        create_model("open_clip:ViT-Nope")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        create_model("vit_small_patch16_224", checkpoint=str(tmp_path / "missing.pt"))


def test_local_checkpoint_is_loaded(tmp_path):
    import timm
    src = timm.create_model("vit_small_patch16_224", pretrained=False)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    adapter = create_model("vit_small_patch16_224", pretrained=False, checkpoint=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[k], v)


def test_preprocess_policy():
    import numpy as np
    from PIL import Image
    cfg = wrap(zoo.get("dino_s16")[0]).preprocessing
    rgba = Image.fromarray(np.random.randint(0, 255, (50, 70, 4), dtype=np.uint8), "RGBA")
    gray16 = Image.fromarray(np.random.randint(0, 65535, (50, 70), dtype=np.uint16))
    x = preprocess([rgba, gray16], cfg, size=(64, 96))
    assert x.shape == (2, 3, 64, 96)
    y = preprocess(rgba, cfg, size=40)  # shorter side 40 -> 48 (patch multiple), aspect kept
    assert y.shape[-2:] == (48, 64)
    with pytest.raises(ValueError, match="different sizes"):
        preprocess([rgba, rgba.resize((20, 70))], cfg, size=40)
