"""Object selection score ITIoU (docs/method.md §6): how well each token's thresholded map covers its own object.

For each image: upsample every patch token's map to the label size (bilinear, align_corners=False),
min-max scale it, threshold at τ into a mask; for each ground-truth class c with at least one token
whose patch centre lies in c, average the IoU between those tokens' masks and the mask of c; average
over classes. ``ITIoU`` then averages over images. Ignored label pixels are excluded from both masks.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Sequence, Tuple, Union, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError

Taus = Union[float, Sequence[float]]

# Upsampled maps are processed this many pixels (tokens x H x W) at a time: 64 MiB in float32.
CHUNK_PIXELS = 1 << 24


def _centre_index(cells: int, pixels: int) -> np.ndarray:
    """Pixel containing the centre of each of ``cells`` equal cells spanning ``pixels`` pixels."""
    return np.minimum(((np.arange(cells) + 0.5) * pixels / cells).astype(np.int64), pixels - 1)


def token_classes(label: np.ndarray, grid: Sequence[int], ignore_index: int = 255) -> np.ndarray:
    """(h*w,) class of the label pixel at each patch centre, in row-major token order.

    Patch (r, c) of the h x w grid, laid over the H x W label, spans rows [r*H/h, (r+1)*H/h); its centre
    (r + 1/2)*H/h falls in pixel floor((r + 1/2)*H/h) (likewise for columns). Tokens whose centre pixel
    is ignored get ``ignore_index``.
    """
    label = _check_label(label)
    h, w = (int(g) for g in grid)
    if h < 1 or w < 1:
        raise ConfigError(f"grid must be (h, w) with positive sides; got {grid}")
    rows, cols = _centre_index(h, label.shape[0]), _centre_index(w, label.shape[1])
    return label[np.ix_(rows, cols)].reshape(-1).astype(np.int64)


def _check_label(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise InputError(f"label must be an (H, W) array of class ids; got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise TypeError(f"label must hold integer class ids; got dtype {label.dtype}")
    return label


def _taus(tau: Taus) -> Tuple[float, ...]:
    # numbers.Real (not float) so numpy scalars count as one threshold; anything else is a sequence.
    taus = ((float(tau),) if isinstance(tau, numbers.Real)
            else tuple(float(t) for t in cast(Sequence[float], tau)))
    if not taus or any(not 0.0 <= t <= 1.0 for t in taus):
        raise ConfigError(f"tau must be a threshold in [0, 1] or a non-empty sequence of them; got {tau!r}")
    return taus


def scaled_upsampled(maps: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(T, h, w) -> (T, H, W): bilinear upsampling (align_corners=False), then min-max per map.

    Scaled after upsampling, as docs/method.md §6 says. A constant map scales to all zeros: it selects nothing.
    """
    up = F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    lo = up.amin((1, 2), keepdim=True)
    span = up.amax((1, 2), keepdim=True) - lo
    return torch.where(span > 0, (up - lo) / span.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(up))


def itiou_image(maps: Union[torch.Tensor, np.ndarray], label: np.ndarray, tau: Taus = 0.2,
                ignore_index: int = 255) -> Dict[float, float]:
    """ITIoU of one image as a fraction in [0, 1], for each threshold: {tau: value}.

    Args:
        maps: (n, h, w) grid-resolution maps of the n = h*w patch tokens, row-major token order.
        label: (H, W) integer classes, ``ignore_index`` for ignored pixels.
        tau: one threshold or a sequence (a sweep costs one upsampling).

    A value is NaN when no class has a token centre (nothing to score); ``ITIoU`` skips those.
    """
    label = _check_label(label)
    taus = _taus(tau)
    maps = torch.as_tensor(maps)
    if maps.dim() == 4 and maps.shape[0] == 1:
        maps = maps[0]
    if maps.dim() != 3 or maps.shape[0] != maps.shape[1] * maps.shape[2]:
        raise InputError(f"maps must be (n, h, w) with one map per patch token (n = h*w); got "
                         f"{tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise TypeError(f"maps must be floating point; got dtype {maps.dtype}")
    maps = maps.detach().cpu()
    if maps.dtype != torch.float64:
        maps = maps.float()
    H, W = label.shape
    cls = token_classes(label, maps.shape[1:], ignore_index)
    scored = np.flatnonzero(cls != ignore_index)
    if scored.size == 0:
        return {t: float("nan") for t in taus}

    valid = torch.from_numpy(label != ignore_index).reshape(-1)
    flat_label = torch.from_numpy(label.astype(np.int64)).reshape(-1)[valid]
    present = np.unique(cls[scored])
    # gt[j] = valid pixels of the j-th present class
    gt = flat_label.unsqueeze(0) == torch.from_numpy(present).unsqueeze(1)  # (classes, V)
    gt_size = gt.sum(1).double()
    row_of = {int(c): j for j, c in enumerate(present)}
    tok_row = torch.tensor([row_of[int(cls[i])] for i in scored])

    ious = torch.zeros(len(taus), len(scored), dtype=torch.float64)
    chunk = max(1, CHUNK_PIXELS // (H * W))
    for s in range(0, len(scored), chunk):
        idx = torch.from_numpy(scored[s:s + chunk])
        scaled = scaled_upsampled(maps[idx], (H, W)).reshape(len(idx), -1)[:, valid]  # (t, V)
        g = gt[tok_row[s:s + chunk]]  # each token's own class mask
        for a, t in enumerate(taus):
            m = scaled >= t
            inter = (m & g).sum(1).double()
            union = m.sum(1).double() + gt_size[tok_row[s:s + chunk]] - inter
            ious[a, s:s + chunk] = inter / union  # union >= |class| > 0
    out = {}
    for a, t in enumerate(taus):
        per_class = [ious[a, tok_row == j].mean().item() for j in range(len(present))]
        out[t] = float(np.mean(per_class))
    return out


class ITIoU:
    """Accumulates ``itiou_image`` results over images; ``summary()`` -> {tau: mean over images x 100}.

    Images whose value is NaN (no class under any token centre) are skipped and counted in ``skipped``.
    """

    def __init__(self) -> None:
        self.sums: Dict[float, float] = {}
        self.counts: Dict[float, int] = {}
        self.skipped: Dict[float, int] = {}

    def update(self, values: Dict[float, float]) -> None:
        for t, v in values.items():
            t, v = float(t), float(v)
            self.sums.setdefault(t, 0.0)
            self.counts.setdefault(t, 0)
            if math.isnan(v):
                self.skipped[t] = self.skipped.get(t, 0) + 1
                continue
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ITIoU per image is a fraction in [0, 1]; got {v} at tau={t}")
            self.sums[t] += v
            self.counts[t] += 1

    def summary(self) -> Dict[float, float]:
        return {t: 100.0 * self.sums[t] / self.counts[t] if self.counts[t] else float("nan")
                for t in sorted(self.sums)}

    def state(self) -> Dict[str, Dict[float, float]]:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "skipped": dict(self.skipped)}

    @classmethod
    def from_state(cls, state: Dict[str, Dict[float, float]]) -> "ITIoU":
        obj = cls()
        obj.sums = {float(t): float(v) for t, v in state["sums"].items()}
        obj.counts = {float(t): int(v) for t, v in state["counts"].items()}
        obj.skipped = {float(t): int(v) for t, v in state.get("skipped", {}).items()}
        return obj
