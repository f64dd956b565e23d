"""The evaluation run (docs/method.md §6): per-image records, cached and resumable, summarised from the cache alone.

One image costs one preprocessing, one graph-free forward (the last-layer patch tokens) and one
``explain`` per (scalar, layer); every (ζ, assign rule) is then segmented from the same maps. What is
kept per image is small and protocol-agnostic (``OUT/cache/<sample>.pt``, written atomically before the
next image starts):

- for every segmentation (ULTra settings and baselines): the (K, C) class histogram of each segment id
  (valid pixels only) and the (K, D) mean feature of each segment. The per-image protocol rebuilds the
  confusion matrix from the histogram; the dataset-wide protocol clusters the features over the split;
- ITIoU of every (scalar, layer) at every τ; the perturbation distances of the primary setting;
- seconds per stage.

That is about K·D·4 bytes per segmentation setting (24 settings x 10 segments x 384 dims: 0.4 MB per
image). ``OUT/run.json`` holds the settings the records were made with (a different request is refused)
and the images of the latest run, which are the ones ``summarise`` scores.

Choices, documented here and in ``results.json`` (``notes``):

- **Features** (k-means baselines and the dataset-wide protocol's segment features) are the last
  block's residual-stream patch tokens (before any final norm), whatever layer is explained: the most
  semantic tokens, and one representation for every method so that the protocol compares segmentations,
  not features. A segment's feature is the mean of the patch tokens weighted by the number of the
  segment's pixels (at label resolution, ignored pixels included: they are image content) lying in each
  token's patch, so it is defined for any segmentation and any pixel rule.
- **Primary setting**: the first requested scalar at the last requested layer, cut at ζ = 0.4 when
  requested (docs/method.md §4 default), else at the first ζ. The perturbation test (4k perturbed forwards per
  image) runs only for its maps; the k-means baseline "k = segments" uses its cluster count.
- **Baselines**: k-means (scikit-learn, seeded) on the L2-normalised last-layer tokens with k = the
  primary setting's clusters and with k = the number of classes, nearest-upsampled; the CLS token's
  gradient rollout (ULTra_S engine with target CLS, last block), thresholded at its mean into
  foreground/background, only for datasets whose class 0 is "background" (VOC) and models with a CLS.
- **Seeds**: each image's seed (k-means, perturbation tokens and noise) is derived from ``seed`` and the
  sample name, so a number never depends on which slice of the split a run covers.
- **Fast modes** (``explain.start_block``, ``explain.compute_dtype``, ``target_stride``; exact by default;
  ``explain`` is the run's ``ExplainConfig``) apply to every ULTra explanation of the run, never to the baselines. With ``target_stride`` k > 1 only every k-th
  patch is explained: segmentation clusters those maps (``segment_maps(token_positions=...)``), and ITIoU
  and the perturbation test score every token with the map of its nearest explained token (the fast
  mode's stand-in for the map it did not compute). At their defaults these fields are left out of the
  run's key, so caches made before they existed stay valid. ``results.json`` names the mode (``mode``).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import nn

from ..data.datasets import SegDataset
from ..engine.options import resolve_layer
from ..errors import ConfigError
from ..models import Adapter, wrap
from .eval_config import EvalConfig, RunPlan, aggregation_key, maps_key, matched_key, mode_of, ultra_key
from .image_eval import evaluate_image, nearest_filled, pixel_patches, segment_features
from .metrics import segment_histograms
from .record_cache import _sha256, cache_path, load_record, prepare_out, save_record
from .summary import _confusion_from_hist, summarise

PathLike = Union[str, Path]

# The names callers import from here (the run's pieces live in the modules above).
__all__ = ["EvalConfig", "RunPlan", "make_plan", "run_evaluation", "summarise", "evaluate_image", "cache_path",
           "load_record", "save_record", "prepare_out", "ultra_key", "aggregation_key", "matched_key", "maps_key",
           "mode_of", "nearest_filled", "pixel_patches", "segment_features", "segment_histograms",
           "_confusion_from_hist", "wrap"]


def make_plan(adapter: Adapter, dataset: SegDataset, config: EvalConfig,
              model_info: Optional[Dict[str, Any]] = None) -> RunPlan:
    """Resolve ``config`` against the model (layers) and the dataset (classes, baseline applicability)."""
    config.validate()
    layers = tuple(dict.fromkeys(resolve_layer(int(l), adapter.num_blocks) for l in config.layers))
    if len(layers) != len(config.layers):
        raise ConfigError(f"layers {list(config.layers)} name the same block twice (resolved: "
                          f"{[resolve_layer(int(l), adapter.num_blocks) for l in config.layers]})")
    if config.explain.start_block > min(layers):
        raise ConfigError(f"start_block {config.explain.start_block} lies after layer {min(layers)}: every "
                          f"explained layer needs start_block <= layer")
    # "auto" and a non-native half dtype are settled here, once, before the run key is made
    config = dataclasses.replace(config, explain=config.explain.on(adapter.device, adapter.dtype))
    info = {"name": dataset.name, "root": str(Path(dataset.root).resolve()), "split": dataset.split,
            "num_classes": int(dataset.num_classes), "class_names": list(dataset.class_names),
            "ignore_index": int(dataset.ignore_index)}
    model = dict(model_info) if model_info else {"name": adapter.name}
    model.setdefault("dtype", str(adapter.dtype).replace("torch.", ""))
    background = bool(dataset.class_names) and dataset.class_names[0].lower() == "background"
    return RunPlan(config, layers, info, model,
                   weights_sha256=_sha256(config.weights) if config.weights else None,
                   cls_rollout=background and adapter.num_prefix_tokens >= 1)


def run_evaluation(model: Union[nn.Module, Adapter], dataset: SegDataset, config: EvalConfig, out: PathLike,
                   model_info: Optional[Dict[str, Any]] = None, overwrite: bool = False,
                   progress: bool = True, maps_cache: Optional[PathLike] = None) -> Dict[str, Any]:
    """Evaluate every sample of ``dataset`` (already sliced by the caller), caching each image's record in
    ``OUT/cache`` before the next; images cached with the same settings are skipped. Writes and returns
    the summary (``summarise``).

    ``model_info``: what identifies the model in ``OUT/run.json`` (default: the adapter's name and dtype);
    a cache made for another model, dataset or settings is refused unless ``overwrite``. ``maps_cache``:
    a folder keeping every image's maps (``explain_cached``), shared by runs that differ only in how the
    maps are segmented or scored (ζ, rules, aggregations), so that such a sweep explains each image once.
    """
    from tqdm.auto import tqdm
    adapter = wrap(model)
    plan = make_plan(adapter, dataset, config, model_info)
    names = [s.name for s in dataset.samples]
    if len(set(names)) != len(names):
        raise ConfigError(f"{dataset.name}: sample names repeat; they name the cache files")
    prepare_out(out, plan, names, overwrite)
    digest = plan.digest()
    todo = []
    for s in dataset.samples:
        path = cache_path(out, s.name)
        if path.is_file():
            try:
                if load_record(path).get("digest") == digest:
                    continue
            except ValueError as e:
                warnings.warn(f"{e}; recomputing it")
        todo.append(s)
    bar = tqdm(total=len(names), initial=len(names) - len(todo), unit="img", desc=f"eval {dataset.name}",
               disable=not progress)
    for s in todo:
        label = dataset.load_label(s)
        record = evaluate_image(adapter, plan, s, dataset.load_image(s), label,
                                **({"maps_cache": maps_cache} if maps_cache is not None else {}))
        save_record(cache_path(out, s.name), record)
        bar.set_postfix(s_per_img=f"{record['seconds']['total']:.1f}")
        bar.update(1)
    bar.close()
    return summarise(out)


