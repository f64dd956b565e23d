"""``ultra-fast train-w``: learn ULTra_W's per-token directions with the self-consistency loss (docs/method.md §5)."""
from __future__ import annotations

import argparse
import math
import sys
import time

from ..errors import ConfigError
from .common import add_chain_args, add_fast_mode_args, add_model_args, explain_config, load_model

EPILOG = """\
The checkpoint (--out) is written atomically after every batch. Running the same command again resumes
from it (a larger --epochs trains on); a checkpoint made with other settings is refused. Use it with
  ultra_fast.explain(model, x, scalar="learned", weights="w.pt")
where x must give the patch grid W was trained on (the checkpoint's "size")."""


def add_parser(sub) -> None:
    p = sub.add_parser("train-w", help="learn ULTra_W (one direction per patch position) on images",
                       description="Self-consistency training of ULTra_W: segment each image with the current "
                                   "W, perturb outside each segment, and make w_i^T z_i insensitive to it.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", nargs="+", required=True, metavar="INPUTS",
                   help="image files, folders (walked recursively), globs, or .txt files listing paths")
    p.add_argument("--n-images", type=int, default=256,
                   help="train on the first N images in sorted order (default: %(default)s)")
    p.add_argument("--out", required=True, help="checkpoint file to write (and resume from), e.g. w.pt")
    add_model_args(p)
    p.add_argument("--size", type=int, default=224,
                   help="shorter side of the first image fed to the model; every image uses that input size "
                        "(default: %(default)s)")
    p.add_argument("--layer", type=int, default=-1, help="train the tokens after this block (default: last)")
    p.add_argument("--threshold", type=float, default=0.4, help="segmentation cut ζ (default: %(default)s)")
    p.add_argument("--assign", default="token", choices=["token", "argmax"],
                   help="segmentation pixel rule (default: %(default)s: a pixel belongs to its patch's segment)")
    p.add_argument("--delta", type=float, default=0.3,
                   help="std of the Gaussian noise on the normalised input (default: %(default)s)")
    p.add_argument("--perturb", default="noise", choices=["noise", "mask"],
                   help="perturbation outside each segment (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the images (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="Adam steps per batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    add_chain_args(p)
    add_fast_mode_args(p, stride=False)  # W has one vector per patch: every patch is explained
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted order in every epoch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..data import list_inputs
    from ..training import train_w

    if args.n_images < 1:
        raise ConfigError(f"--n-images {args.n_images} is impossible (>= 1)")
    items = list_inputs(args.images)
    if not items:
        raise FileNotFoundError(f"no images found in {' '.join(args.images)}")
    items = items[:args.n_images]
    t0 = time.perf_counter()
    adapter = load_model(args)
    result = train_w(adapter, [it.path for it in items], names=[it.name for it in items], size=args.size,
                     layer=args.layer, threshold=args.threshold, delta=args.delta, perturb=args.perturb,
                     batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, steps=args.steps,
                     seed=args.seed, out=args.out, progress=not args.no_progress, assign=args.assign,
                     shuffle=not args.no_shuffle, model_name=args.model, explain=explain_config(args))
    done = [h for h in result.history if not math.isnan(h["loss_before"])]
    trend = (f"loss {done[0]['loss_before']:.4g} -> {done[-1]['loss_after']:.4g}" if done
             else "no batch had two segments: W unchanged")
    h, w = result.grid
    print(f"{adapter.name}: W for a {h}x{w} grid at layer {result.settings['layer']} from {len(items)} images, "
          f"{len(result.history)} batches{' (resumed)' if result.resumed else ''}, {trend}, "
          f"{time.perf_counter() - t0:.1f} s -> {args.out}", file=sys.stderr)
    return 0
