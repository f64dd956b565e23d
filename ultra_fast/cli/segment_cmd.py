"""``ultra-fast segment``: zero-shot segmentation of many images (folders, globs, lists), resumable, shardable."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import distributed, pipeline
from ..data import list_inputs
from ..errors import ConfigError
from ..segmentation.run import SegmentSettings
from .common import add_clustering_args, add_method_args, add_model_args, load_model, target_stride

DEFAULT_SIZE = 224

EPILOG = """\
outputs (per image, <name> = its path relative to the folder/glob/list it came from, '/' -> '__'):
  DIR/labels/<name>.png    palette PNG, pixel value = segment id, at the image's own resolution
  DIR/overlays/<name>.png  the image tinted by segment
  DIR/maps/<name>.npz      with --save-maps: token maps, token clusters, linkage
  DIR/manifest.jsonl       one line per input (status ok|error, outputs, num_segments, seconds)
  DIR/run.json             the settings, written with the first finished image
A restart with the same DIR skips finished images (resume); unreadable files are reported and skipped.
One run at a time per DIR; DIR may lie inside an input folder (it is skipped) but not be one.
Many processes: torchrun --nproc_per_node=K -m ultra_fast segment ... (rank r takes inputs r::K).
"""


def add_parser(sub) -> None:
    p = sub.add_parser("segment", help="zero-shot segmentation of images, folders, globs or .txt lists",
                       description="Cluster the ULTra maps of all patch tokens of each image into segments "
                                   "(docs/method.md §4) and write label PNGs and overlays.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUTS",
                   help="image files, folders (walked recursively), globs, or .txt files listing paths")
    p.add_argument("--out", required=True, help="output folder DIR")
    add_model_args(p)
    add_method_args(p, fast_modes=True)
    p.set_defaults(size=DEFAULT_SIZE)
    for a in p._actions:  # the shared --size help names 448; segmentation defaults to a cheaper size
        if a.dest == "size":
            a.help = (f"shorter image side fed to the model, rounded to the patch size (default: {DEFAULT_SIZE}; "
                      "cost grows ~ with the square of the number of patches)")
    add_cluster_args(p)
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="shrink an image whose patch grid would exceed this many patches (extreme aspect "
                        "ratios; default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per forward/backward; only images of one input size are batched (default: 1)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images (default: 2)")
    p.add_argument("--save-maps", action="store_true", help="also write DIR/maps/<name>.npz")
    p.add_argument("--max-images", type=int, default=None,
                   help="stop after segmenting this many new images (per process); a later run resumes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--threshold", type=float, default=None,
                     help="cut the dendrogram at this distance (0 < threshold <= 2 for cosine; default: 0.4)")
    cut.add_argument("--n-clusters", type=int, default=None, help="cut into this many clusters instead")
    add_clustering_args(p)
    p.add_argument("--assign", default="argmax", choices=["argmax", "token"],
                   help="pixel rule: argmax of the cluster maps (paper) or the cluster of its patch's token")
    add_aggregation_arg(p)


def add_aggregation_arg(p: argparse.ArgumentParser) -> None:
    from ..segmentation.aggregation import AGGREGATIONS
    p.add_argument("--aggregation", default="paper", choices=AGGREGATIONS,
                   help="how the token maps become segments: paper (the paper's hierarchical clustering, cut at "
                        "--threshold), spectral (normalised cut of the token-to-token relevance), joint (the same "
                        "on relevance and feature similarity), refined (the paper's clusters refined by k-means "
                        "on the maps), propagated (the same on features averaged along the maps); +clean "
                        "neutralises high-norm artefact tokens first. spectral and joint take --n-clusters or "
                        "pick the count by the eigengap; the others cut at --threshold (default: %(default)s)")


def settings_from_args(args):
    threshold = args.threshold if args.threshold is not None else (None if args.n_clusters is not None else 0.4)
    s = SegmentSettings(model=args.model, checkpoint=str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                        pretrained=str(args.pretrained), dtype=args.dtype, size=args.size,
                        max_tokens=getattr(args, "max_tokens", 4096), layer=args.layer, scalar=args.scalar,
                        order=args.order, start_block=args.start_block, threshold=threshold,
                        n_clusters=args.n_clusters, metric=args.metric, method=args.linkage, assign=args.assign,
                        aggregation=getattr(args, "aggregation", "paper"),
                        compute_dtype=getattr(args, "compute_dtype", None), target_stride=target_stride(args))
    s.validate()
    return s


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    for name in ("batch_size", "workers"):
        if getattr(args, name) < (1 if name == "batch_size" else 0):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} is impossible")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a folder")
    items = list_inputs(args.inputs, exclude=[out_dir])
    if not items:
        raise FileNotFoundError(f"no images found in {' '.join(args.inputs)}")
    pipeline.check_no_overwrite(items, out_dir, save_maps=True)
    pipeline.check_out_dir(args.inputs, out_dir)
    rank, world, device = distributed.init(args.device)
    # Rank 0 holds the folder for the whole run (the other ranks wait at the barrier until it has it);
    # run.json is only checked here: it is written once the first image is finished.
    lock = pipeline.OutputLock(out_dir)
    try:
        if rank == 0:
            lock.acquire()
        pipeline.check_settings(out_dir, settings.to_json())
        distributed.barrier()
        args.device = device
        t0 = time.perf_counter()
        adapter = load_model(args)
        t_load = time.perf_counter() - t0
        summary = pipeline.run(adapter, items, out_dir, settings, rank=rank, world=world,
                               batch_size=args.batch_size, workers=args.workers, save_maps=args.save_maps,
                               max_images=args.max_images, backend=args.backend, progress=not args.no_progress)
        rate = summary.done / summary.seconds if summary.seconds > 0 and summary.done else 0.0
        who = f"rank {rank}/{world}: " if world > 1 else ""
        print(f"{who}{adapter.name}: {summary.done} segmented, {summary.skipped} already done, "
              f"{summary.errors} errors, of {summary.total} inputs in {summary.seconds:.1f} s "
              f"({rate:.2f} img/s; model load {t_load:.1f} s) -> {out_dir}", file=sys.stderr)
    finally:
        lock.release()
        distributed.destroy()
    return 0
