"""Adapter for Hugging Face ``transformers`` vision transformers: ViT, DeiT, DINOv2 (with registers), CLIP, SigLIP.

Every family is described by one declarative ``HFVisionLayout`` (where the image tower, the blocks,
their norms, q/k/v projections, layer scales and MLP live, and how many prefix tokens it has); the
registry (``models/registry.py``) holds one layout per family. One adapter class runs them all.

Like the other adapters this one never patches, hooks or reconfigures the user's model:

- ``embed`` calls the model's own embeddings module with ``interpolate_pos_encoding=True`` (any
  input size the patch embedding tiles; at the native size the stored embedding is used as is),
  then the tower's pre-norm if it has one (CLIP's ``pre_layrnorm``);
- each block is run from the layer's own norms, projections, layer scales and MLP, with the
  attention computed explicitly from the q/k/v weights, so the softmax probabilities are in the
  graph whatever ``attn_implementation`` (eager, sdpa, flash, ...) the model was loaded with;
- ``head`` applies the tower's final norm where ``last_hidden_state`` has one (ViT, DeiT, DINOv2,
  SigLIP's ``post_layernorm``; CLIP returns the last block's tokens unnormalised), so
  ``adapter(pixel_values)`` equals the unmodified model's ``last_hidden_state``. Pooling heads
  (CLIP's projection, SigLIP's attention-pooling head) are not explained.

Prefix tokens P (first in the sequence, before the patches): CLS (ViT, DINOv2, CLIP), CLS and the
distillation token (DeiT, P = 2), CLS and the registers (DINOv2 with registers, P = 1 + R), none
(SigLIP, P = 0).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import nn

from ._common import dynamic, patch_grid
from .base import Adapter, Preprocessing, UnsupportedModelError, explicit_attention
from .block_spec import PreNormBlock
from .preprocess import Size, target_size, to_rgb

#: Attribute paths are dotted; a tuple lists alternatives tried in order (transformers renamed
#: several modules across versions, e.g. ``attention.attention.query`` -> ``attention.q_proj``).
Path = Union[str, Tuple[str, ...]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class HFVisionLayout:
    """Where one Hugging Face vision family keeps its parts (all paths relative to the image tower).

    ``classes``: names of the tower classes this layout describes (e.g. ``("Dinov2Model",)``).
    ``attention``: the layer's attention module; ``q``/``k``/``v``/``o`` are relative to it (its
    ``scaling``/``scale`` attribute is the softmax scale, else head_dim ** -0.5).
    The tower is the model itself, its ``vision_model`` (CLIP/SigLIP dual models) or its
    ``base_model`` (task heads such as ``ViTForImageClassification``).
    ``num_prefix_tokens``: P from the tower's config. ``final_norm``: applied by ``head`` to give
    ``last_hidden_state`` (None where the model returns the last block's output as is).
    ``mean``/``std``: the family's usual normalisation, used when no image processor is given.
    """

    family: str
    classes: Tuple[str, ...]
    num_prefix_tokens: Callable[[Any], int]
    layers: Path
    norm1: Path
    norm2: Path
    attention: Path
    o: Path
    q: Path = ("q_proj", "attention.query")
    k: Path = ("k_proj", "attention.key")
    v: Path = ("v_proj", "attention.value")
    mlp: Path = "mlp"
    fc1: Path = ("mlp.fc1", "intermediate.dense")
    act: Path = ("mlp.activation_fn", "mlp.activation", "intermediate.intermediate_act_fn")
    fc2: Path = ("mlp.fc2", "output.dense")
    ls1: Optional[Path] = None
    ls2: Optional[Path] = None
    pre_norm: Optional[Path] = None
    final_norm: Optional[Path] = None
    embeddings: Path = "embeddings"
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    loading: str = ""


def get_path(root: nn.Module, path: Optional[Path]) -> Any:
    """The attribute at a dotted ``path`` (the first of several alternatives that exists), or None."""
    if path is None:
        return None
    for p in (path,) if isinstance(path, str) else path:
        obj: Any = root
        for part in p.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def image_tower(model: nn.Module) -> Optional[nn.Module]:
    """The module holding the image embeddings and blocks: the model, its ``vision_model`` or ``base_model``."""
    for cand in (getattr(model, "vision_model", None), model, getattr(model, "base_model", None)):
        if isinstance(cand, nn.Module) and hasattr(cand, "embeddings") and hasattr(cand, "config"):
            return cand
    return None


def matches(layout: HFVisionLayout, model: nn.Module) -> bool:
    """Whether ``model``'s image tower is one of the layout's classes (by class name, so that the check
    imports nothing; a subclass under another name is another family)."""
    tower = image_tower(model)
    return tower is not None and type(tower).__name__ in layout.classes


def _interpolation_name(resample: Any) -> str:
    """PIL resample code (or name) of an HF image processor -> the package's interpolation name."""
    codes = {0: "nearest", 2: "bilinear", 3: "bicubic"}
    if isinstance(resample, str):
        return resample if resample in ("nearest", "bilinear", "bicubic") else "bicubic"
    value = getattr(resample, "value", resample)
    return codes.get(value, "bicubic")


def _size_pair(size: Any, fallback: Tuple[int, int]) -> Tuple[int, int]:
    """An HF processor size dict ({height, width} / {shortest_edge}) -> (h, w)."""
    if size is None:
        return fallback
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    height, width = get("height"), get("width")
    if height and width:
        return int(height), int(width)
    edge = get("shortest_edge")
    if edge:
        return int(edge), int(edge)
    return fallback


class HFVisionAdapter(Adapter):
    """Runs a Hugging Face vision transformer's image tower block by block with explicit attention.

    ``image_processor``: the model's own ``AutoImageProcessor`` (optional). When given,
    ``preprocess`` feeds it the images after the package's policy (EXIF orientation, 8-bit RGB
    from grayscale / palette / RGBA / 16-bit), so the tensors equal the processor's own output;
    otherwise the package's resize and the family's usual mean/std are used.
    """

    def __init__(self, model: nn.Module, layout: HFVisionLayout, image_processor: Optional[Any] = None):
        super().__init__()
        tower = image_tower(model)
        if tower is None or type(tower).__name__ not in layout.classes:
            raise UnsupportedModelError(
                f"expected a transformers {' / '.join(layout.classes)} (or a model holding one as its "
                f"vision_model / base_model), got {type(model).__name__}")
        layers = get_path(tower, layout.layers)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UnsupportedModelError(f"{type(tower).__name__}: no encoder layers at {layout.layers}")
        for i, layer in enumerate(layers):
            parts = {"norm1": layout.norm1, "norm2": layout.norm2, "attention": layout.attention}
            missing = [f"{name} ({path})" for name, path in parts.items() if get_path(layer, path) is None]
            attn = get_path(layer, layout.attention)
            if attn is not None:
                parts = {"q": layout.q, "k": layout.k, "v": layout.v, "o": layout.o}
                missing += [f"{name} ({path})" for name, path in parts.items()
                            if not isinstance(get_path(attn, path), nn.Linear)]
            if get_path(layer, layout.mlp) is None and any(
                    get_path(layer, p) is None for p in (layout.fc1, layout.act, layout.fc2)):
                missing.append(f"mlp ({layout.mlp})")
            if missing:
                raise UnsupportedModelError(
                    f"{type(tower).__name__} layer {i} ({type(layer).__name__}) lacks {', '.join(missing)}: this "
                    f"transformers version lays the {layout.family} blocks out differently")
        cfg = dynamic(tower).config
        self.model = model
        self.tower = tower
        self.layout = layout
        self.image_processor = image_processor
        self.layers = layers
        self.num_blocks = len(layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.embed_dim = int(cfg.hidden_size)
        self.num_prefix_tokens = int(layout.num_prefix_tokens(cfg))
        ps = cfg.patch_size
        self._patch = (ps, ps) if isinstance(ps, int) else tuple(ps)
        # create_model's name, else the hub name / folder the model was loaded from, else its class.
        self.name = (getattr(model, "ultra_fast_name", None) or getattr(cfg, "_name_or_path", None)
                     or type(model).__name__)
        self._embeddings = get_path(tower, layout.embeddings)
        self._pre_norm = get_path(tower, layout.pre_norm)
        self._final_norm = get_path(tower, layout.final_norm)

    # ---------------------------------------------------------------------------------- parts
    def _attention(self, layer: nn.Module):
        """(q, k, v, o projections, softmax scale) of one layer."""
        attn = get_path(layer, self.layout.attention)
        q, k, v, o = (get_path(attn, p) for p in (self.layout.q, self.layout.k, self.layout.v, self.layout.o))
        scale = None
        for name in ("scaling", "scale"):
            value = getattr(attn, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                scale = float(value)
                break
        if scale is None:  # older layouts keep no scale attribute: the standard 1/sqrt(head_dim)
            scale = (q.out_features // self.num_heads) ** -0.5
        return q, k, v, o, scale

    @staticmethod
    def _fused_qkv(q: nn.Linear, k: nn.Linear, v: nn.Linear):
        """One (3D, D) weight and (3D,) bias in q, k, v order: the layout the engine's backward expects."""
        weight = torch.cat([q.weight, k.weight, v.weight], dim=0)
        biases = [m.bias for m in (q, k, v)]
        if all(b is None for b in biases):
            return weight, None
        bias = torch.cat([b if b is not None else torch.zeros_like(m.weight[:, 0])
                          for b, m in zip(biases, (q, k, v))])
        return weight, bias

    # ------------------------------------------------------------------------------- protocol
    @property
    def preprocessing(self) -> Preprocessing:
        cfg = dynamic(self.tower).config
        size = cfg.image_size
        native = (size, size) if isinstance(size, int) else tuple(size)
        proc = self.image_processor
        if proc is None:
            return Preprocessing(mean=self.layout.mean, std=self.layout.std, input_size=native,
                                 patch_size=self._patch, interpolation="bicubic")
        crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
        mean = tuple(getattr(proc, "image_mean", None) or self.layout.mean)
        std = tuple(getattr(proc, "image_std", None) or self.layout.std)
        return Preprocessing(mean=mean, std=std, input_size=_size_pair(crop or getattr(proc, "size", None), native),
                             patch_size=self._patch, interpolation=_interpolation_name(getattr(proc, "resample", 3)))

    def preprocess(self, images, size: Size = None) -> torch.Tensor:
        """PIL image(s) -> pixel values. With an image processor: the package's colour policy, then the
        processor itself (``size`` None: its own resize and crop; else resized to ``size`` rounded to
        patch multiples, no crop). Without one: ``models.preprocess`` with the family's mean/std."""
        if self.image_processor is None:
            return super().preprocess(images, size=size)
        from PIL import Image
        if isinstance(images, Image.Image):
            images = [images]
        rgb = [to_rgb(im) for im in images]
        kwargs = {}
        if size is not None:
            sizes = {target_size((im.height, im.width), size, self.preprocessing) for im in rgb}
            if len(sizes) > 1:
                raise ValueError(f"images map to different sizes {sorted(sizes)}; pass size=(h, w) to batch them")
            (h, w), = sizes
            kwargs = dict(size={"height": h, "width": w}, do_center_crop=False)
        out = self.image_processor(images=rgb, return_tensors="pt", **kwargs)
        return out["pixel_values"].to(device=self.device, dtype=self.dtype)

    def grid_size(self, images: torch.Tensor) -> Tuple[int, int]:
        return patch_grid(images, self._patch, self.name)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self.grid_size(images)  # a clear error for sizes the patch embedding cannot tile
        # DINOv2 embeddings always interpolate and take no such argument.
        kwargs = {"interpolate_pos_encoding": True} if _takes_interpolate(self._embeddings) else {}
        x = self._embeddings(images, **kwargs)
        return self._pre_norm(x) if self._pre_norm is not None else x

    def block(self, index: int, x: torch.Tensor):
        layer, lay = self.layers[index], self.layout
        q, k, v, o, scale = self._attention(layer)
        weight, bias = self._fused_qkv(q, k, v)
        out, attn = explicit_attention(get_path(layer, lay.norm1)(x), weight, bias, self.num_heads, scale)
        out = o(out)
        ls1, ls2 = get_path(layer, lay.ls1), get_path(layer, lay.ls2)
        x = x + (ls1(out) if ls1 is not None else out)
        m = self._mlp(layer)(get_path(layer, lay.norm2)(x))
        x = x + (ls2(m) if ls2 is not None else m)
        return x, attn

    def _mlp(self, layer: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        mlp = get_path(layer, self.layout.mlp)
        if isinstance(mlp, nn.Module) and not isinstance(mlp, nn.Linear):
            return mlp
        # Older layouts split the MLP over two modules (``intermediate`` and ``output`` with a residual).
        fc1, act, fc2 = (get_path(layer, p) for p in (self.layout.fc1, self.layout.act, self.layout.fc2))
        return lambda h: fc2(act(fc1(h)))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return self._final_norm(z) if self._final_norm is not None else z

    def block_spec(self, index: int):
        layer, lay = self.layers[index], self.layout
        norm1, norm2 = get_path(layer, lay.norm1), get_path(layer, lay.norm2)
        fc1, act, fc2 = (get_path(layer, p) for p in (lay.fc1, lay.act, lay.fc2))
        if not (type(norm1) is nn.LayerNorm and type(norm2) is nn.LayerNorm and isinstance(fc1, nn.Linear)
                and isinstance(fc2, nn.Linear) and callable(act)):
            return None  # e.g. DINOv2's SwiGLU MLP: the engine differentiates it with autograd
        gammas = []
        for path in (lay.ls1, lay.ls2):
            ls = get_path(layer, path)
            gamma = None if ls is None else getattr(ls, "lambda1", None)
            if ls is not None and not isinstance(gamma, torch.Tensor):
                return None
            gammas.append(gamma)
        q, k, v, o, scale = self._attention(layer)
        weight, bias = self._fused_qkv(q, k, v)
        return PreNormBlock(
            norm1.weight, norm1.bias, norm1.eps, weight, bias, self.num_heads, scale,
            o.weight, o.bias, gammas[0], norm2.weight, norm2.bias, norm2.eps,
            fc1.weight, fc1.bias, act, fc2.weight, fc2.bias, gammas[1])


def reference_output(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The unmodified model's ``last_hidden_state`` of its image tower (what the adapter reproduces)."""
    tower = image_tower(model)
    if tower is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no Hugging Face image tower")
    kwargs = {"interpolate_pos_encoding": True} if _takes_interpolate(tower) else {}
    return tower(pixel_values=pixel_values, **kwargs).last_hidden_state


def _takes_interpolate(module: nn.Module) -> bool:
    return "interpolate_pos_encoding" in inspect.signature(module.forward).parameters


def prefix_cls(cfg: Any) -> int:
    return 1


def prefix_cls_distillation(cfg: Any) -> int:
    return 2


def prefix_cls_registers(cfg: Any) -> int:
    return 1 + int(getattr(cfg, "num_register_tokens", 0))


def prefix_none(cfg: Any) -> int:
    return 0


__all__ = ["HFVisionLayout", "HFVisionAdapter", "get_path", "image_tower", "matches", "reference_output",
           "prefix_cls", "prefix_cls_distillation", "prefix_cls_registers", "prefix_none",
           "IMAGENET_MEAN", "IMAGENET_STD", "HALF", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]
