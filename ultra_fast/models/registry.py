"""The adapter registry: one declarative entry per model family, looked up by ``wrap(model)``.

An entry says how to recognise a family (``matches``), how to build its adapter (``build``) and the
line that loads such a model (``loading``, for error messages and the README). timm and open_clip
ViTs have their own adapter classes; the Hugging Face vision families share ``HFVisionAdapter`` and
differ only in their ``HFVisionLayout`` (where the blocks, norms, q/k/v and prefix tokens are), so
adding a Hugging Face family is one ``hf_entry(HFVisionLayout(...))`` plus tests::

    from ultra_fast.models import registry
    from ultra_fast.models.hf_vision import HFVisionLayout, prefix_cls

    registry.register(registry.hf_entry(HFVisionLayout(
        family="my-vit", classes=("MyViTModel",), num_prefix_tokens=prefix_cls,
        layers="encoder.layer", norm1="norm_before", norm2="norm_after", attention="attn",
        o="proj", final_norm="layernorm", loading='AutoModel.from_pretrained("me/my-vit")')))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, TypedDict

from torch import nn

from .base import Adapter, TokenAdapter, UnsupportedModelError
from .hf_vision import (
    HALF,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    HFVisionAdapter,
    HFVisionLayout,
    Path,
    matches,
    prefix_cls,
    prefix_cls_distillation,
    prefix_cls_registers,
    prefix_none,
)
from .open_clip_vit import OpenClipViTAdapter, is_open_clip_vit
from .timm_vit import TimmViTAdapter, is_timm_vit


@dataclass(frozen=True)
class AdapterEntry:
    """One model family: how to recognise it, how to wrap it, and how users load it."""

    family: str
    matches: Callable[[nn.Module], bool]
    build: Callable[..., Adapter]
    loading: str
    layout: Optional[HFVisionLayout] = None


def hf_entry(layout: HFVisionLayout) -> AdapterEntry:
    """The registry entry of a Hugging Face vision family described by ``layout``."""
    return AdapterEntry(
        family=layout.family,
        matches=lambda model: matches(layout, model),
        build=lambda model, image_processor=None: HFVisionAdapter(model, layout, image_processor=image_processor),
        loading=layout.loading,
        layout=layout)


class _CLIPParts(TypedDict):
    """``HFVisionLayout`` fields a group of families shares, passed as ``**kwargs``: CLIP and SigLIP."""

    layers: Path
    norm1: Path
    norm2: Path
    attention: Path
    o: Path


class _ViTParts(_CLIPParts):
    """ViT and DeiT: the same fields plus the final norm."""

    final_norm: Path


class _DINOv2Parts(_ViTParts):
    """DINOv2 with and without registers: plus the layer scales and the normalisation."""

    ls1: Path
    ls2: Path
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


# Hugging Face layouts for the installed transformers (5.x: ``q_proj``/``o_proj`` names); the
# tuples list the 4.x names as alternatives.
_VIT_LIKE: _ViTParts = dict(layers=("layers", "encoder.layer"), norm1="layernorm_before", norm2="layernorm_after",
                            attention="attention", o=("o_proj", "output.dense"), final_norm="layernorm")
_DINOV2_LIKE: _DINOv2Parts = dict(layers="encoder.layer", norm1="norm1", norm2="norm2", attention="attention",
                                  o=("o_proj", "output.dense"), ls1="layer_scale1", ls2="layer_scale2",
                                  final_norm="layernorm", mean=IMAGENET_MEAN, std=IMAGENET_STD)
_CLIP_LIKE: _CLIPParts = dict(layers="encoder.layers", norm1="layer_norm1", norm2="layer_norm2", attention="self_attn",
                              o="out_proj")

HF_LAYOUTS = (
    HFVisionLayout(family="hf-vit", classes=("ViTModel",), num_prefix_tokens=prefix_cls, mean=HALF, std=HALF,
                   loading='transformers.ViTModel.from_pretrained("google/vit-base-patch16-224-in21k")',
                   **_VIT_LIKE),
    HFVisionLayout(family="hf-deit", classes=("DeiTModel",), num_prefix_tokens=prefix_cls_distillation,
                   loading='transformers.DeiTModel.from_pretrained("facebook/deit-base-distilled-patch16-224")',
                   **_VIT_LIKE),
    HFVisionLayout(family="hf-dinov2", classes=("Dinov2Model",), num_prefix_tokens=prefix_cls,
                   loading='transformers.Dinov2Model.from_pretrained("facebook/dinov2-small")', **_DINOV2_LIKE),
    HFVisionLayout(family="hf-dinov2-registers", classes=("Dinov2WithRegistersModel",),
                   num_prefix_tokens=prefix_cls_registers,
                   loading='transformers.Dinov2WithRegistersModel.from_pretrained("facebook/dinov2-with-registers-small")',
                   **_DINOV2_LIKE),
    HFVisionLayout(family="hf-clip", classes=("CLIPVisionModel", "CLIPVisionTransformer"), num_prefix_tokens=prefix_cls,
                   pre_norm="pre_layrnorm", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                   loading='transformers.CLIPModel.from_pretrained("openai/clip-vit-base-patch16")  '
                           '# or CLIPVisionModel', **_CLIP_LIKE),
    HFVisionLayout(family="hf-siglip", classes=("SiglipVisionModel", "SiglipVisionTransformer"),
                   num_prefix_tokens=prefix_none, final_norm="post_layernorm", mean=HALF, std=HALF,
                   loading='transformers.SiglipVisionModel.from_pretrained("google/siglip-base-patch16-224")',
                   **_CLIP_LIKE),
)

REGISTRY: List[AdapterEntry] = [
    AdapterEntry("timm", is_timm_vit, lambda model, **_: TimmViTAdapter(model),
                 'timm.create_model("vit_base_patch16_clip_224.openai", pretrained=True)'),
    AdapterEntry("open_clip", is_open_clip_vit, lambda model, **_: OpenClipViTAdapter(model),
                 'open_clip.create_model("ViT-B-32", pretrained="openai")'),
    *(hf_entry(layout) for layout in HF_LAYOUTS),
]


def register(entry: AdapterEntry, first: bool = False) -> None:
    """Add a family (``first``: ahead of the built-in ones, e.g. to override one of them)."""
    if any(e.family == entry.family for e in REGISTRY):
        raise ValueError(f"an adapter family named {entry.family!r} is already registered")
    REGISTRY.insert(0, entry) if first else REGISTRY.append(entry)


def find_entry(model: nn.Module) -> Optional[AdapterEntry]:
    """The first registered family that recognises ``model``, or None."""
    return next((e for e in REGISTRY if e.matches(model)), None)


def wrap(model: Any, image_processor: Any = None) -> Adapter:
    """The adapter for ``model`` (returned as is when it already is one). The model is not modified.

    ``image_processor``: for Hugging Face models, their ``AutoImageProcessor`` (used by
    ``adapter.preprocess``); ignored by the other families.
    """
    if isinstance(model, Adapter):
        return model
    if isinstance(model, TokenAdapter):  # e.g. a text adapter: it has no images, patch grid or preprocessing
        raise UnsupportedModelError(
            f"{model.name} is a {type(model).__name__}, not an image adapter: explain its tokens with "
            f"ultra_fast.text or ultra_fast.engine.explain_rows")
    entry = find_entry(model) if isinstance(model, nn.Module) else None
    if entry is None:
        families = "; ".join(f"{e.family}: {e.loading}" for e in REGISTRY)
        raise UnsupportedModelError(
            f"no ultra_fast adapter for {type(model).__module__}.{type(model).__name__}. Supported families "
            f"(and how to load one): {families}. Language models go through ultra_fast.text (wrap_text).")
    return entry.build(model, image_processor=image_processor)


__all__ = ["AdapterEntry", "HF_LAYOUTS", "REGISTRY", "find_entry", "hf_entry", "register", "wrap"]
