"""The adapter registry: one entry per family, looked up by ``wrap``; adding a family is one entry."""
import pytest
import torch
from torch import nn

from ultra_fast import explain, explain_naive, wrap
from ultra_fast.errors import UnsupportedModelError
from ultra_fast.models import registry
from ultra_fast.models.hf_vision import HFVisionAdapter, HFVisionLayout, prefix_cls, reference_output
from ultra_fast.models.open_clip_vit import OpenClipViTAdapter
from ultra_fast.models.timm_vit import TimmViTAdapter

import models_zoo as zoo

transformers = pytest.importorskip("transformers")


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as shipped, restored after the test (``register`` mutates a module-level list)."""
    monkeypatch.setattr(registry, "REGISTRY", list(registry.REGISTRY))
    return registry


def test_every_family_is_one_entry_with_a_loading_line():
    families = [e.family for e in registry.REGISTRY]
    assert families[:2] == ["timm", "open_clip"]
    assert {"hf-vit", "hf-deit", "hf-dinov2", "hf-dinov2-registers", "hf-clip", "hf-siglip"} <= set(families)
    assert len(families) == len(set(families))
    for entry in registry.REGISTRY:
        assert entry.loading and "(" in entry.loading, entry.family


@pytest.mark.parametrize("key, adapter_type", [("clip_b32", TimmViTAdapter), ("open_clip_b32", OpenClipViTAdapter)])
def test_timm_and_open_clip_are_entries(key, adapter_type):
    model = zoo.get(key)[0]
    assert registry.find_entry(model).family == ("timm" if adapter_type is TimmViTAdapter else "open_clip")
    assert type(wrap(model)) is adapter_type


@pytest.mark.parametrize("key, family", [("hf_vit", "hf-vit"), ("hf_deit", "hf-deit"), ("hf_dinov2", "hf-dinov2"),
                                         ("hf_dinov2_reg", "hf-dinov2-registers"), ("hf_clip", "hf-clip"),
                                         ("hf_clip_vision", "hf-clip"), ("hf_siglip", "hf-siglip")])
def test_hf_classes_find_their_family(key, family):
    assert registry.find_entry(zoo.get_hf(key)[0]).family == family


def test_adapters_are_returned_as_is_and_unknown_models_list_the_families():
    adapter = wrap(zoo.get_hf("hf_vit")[0])
    assert wrap(adapter) is adapter
    with pytest.raises(UnsupportedModelError) as info:
        wrap(nn.Sequential(nn.Linear(2, 2)))
    msg = str(info.value)
    assert "torch.nn.modules.container.Sequential" in msg
    for entry in registry.REGISTRY:
        assert f"{entry.family}: {entry.loading}" in msg


class TinyViTModel(transformers.ViTModel):
    """Stands in for a new family (a user's ViT-shaped model class the registry does not know yet)."""


def test_adding_a_family_is_one_entry(fresh_registry):
    """The README's worked example: register a layout, and wrap / explain work, exact as for the built-ins."""
    torch.manual_seed(0)
    model = TinyViTModel(transformers.ViTConfig(**zoo._HF_SMALL)).eval().double()
    with pytest.raises(UnsupportedModelError):
        wrap(model)
    fresh_registry.register(fresh_registry.hf_entry(HFVisionLayout(
        family="tiny-vit", classes=("TinyViTModel",), num_prefix_tokens=prefix_cls,
        layers="layers", norm1="layernorm_before", norm2="layernorm_after", attention="attention", o="o_proj",
        final_norm="layernorm", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        loading="TinyViTModel(ViTConfig(...))")))
    adapter = wrap(model)
    assert isinstance(adapter, HFVisionAdapter) and adapter.layout.family == "tiny-vit"
    x = zoo.images((24, 32))
    with torch.no_grad():
        assert (adapter(x) - reference_output(model, x)).abs().max().item() <= 1e-12
    fast, ref = explain(model, x, scalar="energy"), explain_naive(model, x, scalar="energy")
    assert (fast - ref).abs().max().item() <= 1e-9 * ref.abs().max().item()
    with pytest.raises(ValueError, match="already registered"):
        fresh_registry.register(fresh_registry.find_entry(model))


def test_a_layout_that_does_not_fit_the_model_is_refused_with_the_missing_parts(fresh_registry):
    model = TinyViTModel(transformers.ViTConfig(**zoo._HF_SMALL)).eval()
    fresh_registry.register(fresh_registry.hf_entry(HFVisionLayout(
        family="tiny-vit-wrong", classes=("TinyViTModel",), num_prefix_tokens=prefix_cls, layers="layers",
        norm1="norm1", norm2="layernorm_after", attention="attention", o="out_proj", loading="-()")))
    with pytest.raises(UnsupportedModelError, match=r"lacks norm1 \(norm1\), o \(out_proj\)"):
        wrap(model)


def test_registering_first_overrides_a_built_in_family(fresh_registry):
    model = zoo.get("clip_b32")[0]
    marker = []
    fresh_registry.register(registry.AdapterEntry(
        "my-timm", lambda m: type(m).__name__ == "VisionTransformer",
        lambda m, **_: marker.append(1) or TimmViTAdapter(m), "timm.create_model(...)"), first=True)
    wrap(model)
    assert marker == [1]
