"""``ultra-fast eval``: score ULTra segmentation, object selection and faithfulness on a labelled dataset."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Optional, Tuple, TypeVar, Union, cast

from ..errors import ConfigError
from .common import add_chain_args, add_fast_mode_args, add_model_args, explain_config, load_model

T = TypeVar("T")

DEFAULT_SIZE = 224

EPILOG = """\
outputs in --out DIR:
  run.json            the settings every cached record was made with, and the images of the last run
  cache/<sample>.pt   one image's records (written atomically before the next image starts)
  results.json        every number: per protocol one row per method/setting (mIoU, accuracy,
                      segments/img), ITIoU per tau, perturbation distances, seconds per image
  results.md          the same as tables;  layers.png, thresholds.png, itiou.png  plots (when they apply)
Rerunning with the same settings skips cached images (resume; a larger --images/--limit extends the run);
other settings are refused unless --overwrite. --summarise-only rebuilds the results from the cache alone.
"""


def add_parser(sub) -> None:
    from ..data import DATASETS
    p = sub.add_parser("eval", help="evaluate ULTra segmentation / ITIoU / perturbation on a labelled dataset",
                       description="Unsupervised segmentation mIoU and accuracy (per-image and dataset-wide "
                                   "protocols), ITIoU object selection and the perturbation test (docs/method.md §6), "
                                   "with k-means and CLS-rollout baselines; cached per image and resumable.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, help="dataset layout (required unless --summarise-only)")
    p.add_argument("--root", help="the dataset's folder (required unless --summarise-only)")
    p.add_argument("--split", default="val", help="(default: %(default)s)")
    p.add_argument("--image-list", default=None, help="text file of sample names to keep (one per line)")
    p.add_argument("--out", required=True, help="output folder DIR (see below)")
    add_model_args(p)
    p.add_argument("--size", default=None,
                   help="model input: shorter side S (aspect kept) or HxW exactly (default: 224; with --weights: "
                        "the size W was trained at)")
    p.add_argument("--protocol", default="both", choices=["per-image", "dataset", "both"],
                   help="segmentation protocol(s) reported (default: %(default)s)")
    p.add_argument("--scalars", default="sum", help="comma list of sum,energy,norm (default: %(default)s)")
    p.add_argument("--weights", default=None, help="a W checkpoint (ultra-fast train-w): adds the scalar 'learned'")
    p.add_argument("--assign", default="argmax,token", help="pixel rules, comma list (default: %(default)s)")
    p.add_argument("--thresholds", default="0.25,0.3,0.4,0.5",
                   help="clustering cuts ζ, comma list (default: %(default)s)")
    p.add_argument("--aggregation", default="paper", metavar="NAMES",
                   help="aggregation strategies, comma list starting with paper (the paper's clustering); the others "
                        "are cut to its segment counts and compared with feature k-means / spectral at those counts: "
                        "paper, spectral, joint, refined, propagated, and each +clean (artefact tokens neutralised) "
                        "(default: %(default)s)")
    p.add_argument("--maps-cache", default=None, metavar="DIR",
                   help="keep every image's maps in DIR and reuse them: runs differing only in how maps are "
                        "segmented or scored (zeta, rules, aggregations) explain each image once")
    p.add_argument("--layers", default="-1", help="layers to explain, e.g. -1 or 4,6,8,10,12 (default: %(default)s)")
    p.add_argument("--baselines", default="kmeans,cls_rollout",
                   help="kmeans, cls_rollout (VOC-style datasets only), or none (default: %(default)s)")
    p.add_argument("--taus", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                   help="ITIoU thresholds τ, comma list, or none (no ITIoU) (default: %(default)s)")
    p.add_argument("--perturbation", action=argparse.BooleanOptionalAction, default=True,
                   help="run the perturbation test on the primary setting (default: on)")
    p.add_argument("--perturb-k", type=int, default=10, help="tokens tested per image (default: %(default)s)")
    p.add_argument("--images", default=None, metavar="START:STOP",
                   help="evaluate this slice of the samples sorted by name, e.g. 0:100")
    p.add_argument("--limit", type=int, default=None, help="at most this many images (after --images)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    fast = p.add_argument_group("explanation options and fast modes (--start-block > 1, --compute-dtype, "
                                "--target-stride: inexact) of every ULTra explanation, not of the baselines")
    add_chain_args(fast)
    add_fast_mode_args(fast)  # with --target-stride, ITIoU and perturbation use each token's nearest explained map
    p.add_argument("--overwrite", action="store_true", help="discard a cache made with other settings")
    p.add_argument("--summarise-only", action="store_true",
                   help="rebuild results.json/md and plots from DIR's cache; computes nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_list(text: str, convert: Callable[[str], T], what: str) -> Tuple[T, ...]:
    """Comma-separated values, each converted, with an error naming the option and the bad item."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what} is empty")
    out = []
    for item in items:
        try:
            out.append(convert(item))
        except ValueError:
            raise ConfigError(f"{what} {text!r}: cannot read {item!r}") from None
    return tuple(out)


def parse_size(text: str) -> Union[int, Tuple[int, int]]:
    """'224' -> 224; '224x320' -> (224, 320)."""
    parts = str(text).lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise ConfigError(f"--size {text!r}: expected S or HxW in pixels, e.g. 224 or 224x320") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ConfigError(f"--size {text!r}: expected S or HxW with positive sides")
    return values[0] if len(values) == 1 else (values[0], values[1])


def parse_slice(text: Optional[str]) -> slice:
    """'START:STOP' (either may be empty) -> slice; None -> everything."""
    if text is None:
        return slice(None)
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ConfigError(f"--images {text!r}: expected START:STOP, e.g. 0:100 or 100:") from None
    if (start is not None and start < 0) or (stop is not None and stop < 0):
        raise ConfigError(f"--images {text!r}: START and STOP must be >= 0")
    return slice(start, stop)


def config_from_args(args: argparse.Namespace):
    from ..evaluation.harness import EvalConfig
    scalars = parse_list(args.scalars, str, "--scalars")
    bad = [s for s in scalars if s not in ("sum", "energy", "norm")]
    if bad:
        raise ConfigError(f"--scalars {bad}: expected some of sum, energy, norm (--weights adds 'learned')")
    size = parse_size(args.size) if args.size is not None else DEFAULT_SIZE
    weights = None
    if args.weights:
        from ..engine.w_checkpoint import load_w
        weights = str(Path(args.weights).resolve())
        scalars += ("learned",)
        if args.size is None:
            # W fixes the patch grid: default to its input size
            size = cast(Tuple[int, int], tuple(load_w(weights).size))
    baselines = () if str(args.baselines).strip().lower() == "none" else parse_list(args.baselines, str,
                                                                                     "--baselines")
    protocols = ("per-image", "dataset") if args.protocol == "both" else (args.protocol,)
    return EvalConfig(size=size, scalars=scalars, layers=parse_list(args.layers, int, "--layers"),
                      assigns=parse_list(args.assign, str, "--assign"),
                      thresholds=parse_list(args.thresholds, float, "--thresholds"), protocols=protocols,
                      baselines=baselines,
                      taus=() if str(args.taus).strip().lower() == "none" else parse_list(args.taus, float, "--taus"),
                      perturbation=args.perturbation, perturb_k=args.perturb_k, weights=weights, seed=args.seed,
                      explain=explain_config(args), target_stride=args.target_stride,
                      aggregations=parse_list(args.aggregation, str, "--aggregation"))


def _print_summary(results) -> None:
    from ..evaluation.report import context, method_label
    print(f"{context(results)}, mode {results['mode']['name']}: {results['timing']['seconds_per_image']:.1f} s/image")
    primary = results["primary"]
    for protocol, rows in results["segmentation"].items():
        for r in rows:
            matched = "|" in str(r.get("baseline") or "")  # a feature baseline at one setting's counts
            if (r["method"] == "ULTra" or matched) and (r["scalar"], r["layer"], r["threshold"]) != (
                    primary["scalar"], primary["layer"], primary["threshold"]):
                continue
            extra = f" {r['assign']} ζ={r['threshold']:g}" if r["method"] == "ULTra" else ""
            miou = "–" if r["mIoU"] is None else f"{r['mIoU']:.1f}"
            acc = "–" if r["accuracy"] is None else f"{r['accuracy']:.1f}"
            print(f"  [{protocol}] {method_label(r)}{extra}: mIoU {miou}  acc {acc}  "
                  f"segments/img {r['mean_segments']:.1f}")


def run(args: argparse.Namespace) -> int:
    from ..data import open_dataset
    from ..evaluation.harness import run_evaluation, summarise

    if args.summarise_only:
        results = summarise(args.out)
        _print_summary(results)
        return 0
    if not args.dataset or not args.root:
        raise ConfigError("--dataset and --root are required (unless --summarise-only)")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit} is impossible (>= 1)")
    config = config_from_args(args)
    config.validate()
    options = {"image_list": args.image_list} if args.image_list else {}
    dataset = open_dataset(args.dataset, args.root, args.split, **options)
    total = len(dataset)
    dataset = dataset.subset(parse_slice(args.images))
    if args.limit is not None:
        dataset = dataset.subset(slice(0, args.limit))
    if not len(dataset):
        raise ConfigError(f"--images {args.images} selects none of the {total} samples of {args.dataset}")
    t0 = time.perf_counter()
    model = load_model(args)
    info = {"name": args.model, "pretrained": str(args.pretrained),
            "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None, "dtype": args.dtype}
    results = run_evaluation(model, dataset, config, args.out, model_info=info, overwrite=args.overwrite,
                             progress=not args.no_progress, maps_cache=args.maps_cache)
    _print_summary(results)
    print(f"wrote {Path(args.out) / 'results.json'}, results.md and plots ({time.perf_counter() - t0:.0f} s)")
    return 0
