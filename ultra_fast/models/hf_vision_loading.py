"""Load a Hugging Face vision model (and its image processor) for ``create_model("hf:<name or folder>")``."""
from __future__ import annotations

import os
from typing import Any, Optional, Tuple

from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from .registry import find_entry


def load_hf_vision(source: str, pretrained: bool = True, **kwargs) -> Tuple[nn.Module, Optional[Any]]:
    """(model, image processor or None) from a hub name or a local folder, in eval mode.

    A local folder (``config.json`` and weights, as written by ``save_pretrained``) is read with
    ``local_files_only=True``, so nothing touches the network. ``pretrained=False`` builds the
    architecture from the config with random weights. ``kwargs`` go to ``from_pretrained`` (e.g.
    ``attn_implementation``, ``revision``). The processor is ``AutoImageProcessor``'s, or None when
    the source has none (the adapter then uses the family's usual normalisation).
    """
    try:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of the hf extra
        raise ImportError("hf:<model> needs the 'transformers' package (pip install transformers)") from exc
    if not source:
        raise ConfigError("hf: needs a model: hf:<hub name> (e.g. hf:facebook/dinov2-small) or hf:<local folder>")
    local = os.path.isdir(source)
    if not local and source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"hf:{source}: no such local folder")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load a transformers config from {source!r} "
                      f"({'local folder' if local else 'hub name'}): {exc}") from exc
    if pretrained:
        model = AutoModel.from_pretrained(source, local_files_only=local, **kwargs)
    else:
        model = AutoModel.from_config(config, **kwargs)
    if find_entry(model) is None:
        raise UnsupportedModelError(
            f"hf:{source} is a {type(model).__name__} (model_type {config.model_type!r}); ultra_fast explains "
            f"Hugging Face ViT, DeiT, DINOv2 (with registers), CLIP and SigLIP image towers")
    try:
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError, KeyError):
        processor = None  # no preprocessor_config.json: the family's defaults apply
    return model.eval(), processor
