"""Perturbation test (docs/method.md §6): does a token's map point at the patches the token actually depends on?

For k random patch tokens i of an image: rank the other patches by i's map; perturb the top ``fraction``
of them (positive) or the bottom ``fraction`` (negative) — the same number, never i's own patch — in the
model input, either zeroed ("mask") or with Gaussian noise added ("noise"); run the model to ``layer``
and measure ``||z_i - z~_i||``. A faithful map gives positive > negative.

Both perturbations act on the preprocessed (normalised) input tensor, so "mask" sets a patch to the
normalisation mean colour and ``noise_std`` is in normalised units.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
from torch import nn

from ..engine.options import eval_mode, resolve_layer
from ..errors import ConfigError, InputError
from ..models import Adapter, wrap

MODES = ("mask", "noise")
SIDES = ("positive", "negative")


@dataclass(frozen=True)
class PerturbationPlan:
    """Which tokens are tested and which patches each test removes (patch indices, row-major)."""

    tokens: np.ndarray    # (k,) tested patch tokens
    positive: np.ndarray  # (k, m) the m most relevant other patches of each token's map
    negative: np.ndarray  # (k, m) the m least relevant other patches


def plan_perturbation(maps: Union[torch.Tensor, np.ndarray], k: int = 10, fraction: float = 0.25,
                      seed: int = 0) -> PerturbationPlan:
    """Choose k distinct tokens (seeded) and, for each, its m = round(fraction * (n-1)) top and bottom patches.

    ``maps``: (n, h, w) maps of the n = h*w patch tokens. Ties in a map are broken by patch index, so the
    plan is deterministic.
    """
    maps = _check_maps(maps)
    n = maps.shape[0]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ConfigError(f"k={k!r} must be an int in 1..{n} (the number of patch tokens)")
    if not 0.0 < float(fraction) <= 0.5:
        # above one half the positive and negative sets would share patches
        raise ConfigError(f"fraction={fraction!r} must be in (0, 0.5]")
    if n < 3:
        raise ConfigError(f"the perturbation test needs at least 3 patch tokens; the maps have {n}")
    m = max(1, int(round(float(fraction) * (n - 1))))
    tokens = np.sort(np.random.default_rng(seed).choice(n, size=int(k), replace=False))
    flat = maps.reshape(n, n)
    pos, neg = [], []
    for t in tokens:
        others = np.delete(np.arange(n), t)
        values = flat[t, others]
        pos.append(others[np.argsort(-values, kind="stable")[:m]])
        neg.append(others[np.argsort(values, kind="stable")[:m]])
    return PerturbationPlan(tokens, np.stack(pos), np.stack(neg))


def _check_maps(maps) -> np.ndarray:
    maps = maps.detach().cpu().double().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float64)
    if maps.ndim == 4 and maps.shape[0] == 1:
        maps = maps[0]
    if maps.ndim != 3 or maps.shape[0] != maps.shape[1] * maps.shape[2]:
        raise InputError(f"maps must be (n, h, w), one grid-resolution map per patch token (n = h*w); got "
                         f"shape {maps.shape}")
    if not np.isfinite(maps).all():
        raise InputError("maps contain non-finite values")
    return maps


def patch_mask(patches: Sequence[int], grid: Tuple[int, int], patch_size: Tuple[int, int],
               device: Optional[torch.device] = None) -> torch.Tensor:
    """(H, W) bool, True on the pixels of the given patches: patch (r, c) covers rows r*ph:(r+1)*ph and
    columns c*pw:(c+1)*pw."""
    h, w = grid
    ph, pw = patch_size
    cells = torch.zeros(h * w, dtype=torch.bool, device=device)
    cells[torch.as_tensor(np.asarray(patches, dtype=np.int64), device=device)] = True
    return cells.reshape(h, w).repeat_interleave(ph, 0).repeat_interleave(pw, 1)


def perturbed_inputs(image: torch.Tensor, plan: PerturbationPlan, grid: Tuple[int, int],
                     patch_size: Tuple[int, int], mode: str, noise_std: float = 0.3, seed: int = 0) -> torch.Tensor:
    """(2k, 3, H, W): rows 0..k-1 perturb each token's positive patches, rows k..2k-1 its negative ones.

    "noise" draws one N(0, noise_std²) field per tested token (seeded) and uses it for both of that
    token's variants, so positive and negative differ only in where the noise lands.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown perturbation mode {mode!r}; expected one of {MODES}")
    k = len(plan.tokens)
    masks = torch.stack([patch_mask(p, grid, patch_size, image.device)
                         for p in list(plan.positive) + list(plan.negative)])  # (2k, H, W)
    if tuple(masks.shape[-2:]) != tuple(image.shape[-2:]):
        raise InputError(f"patch grid {grid} x patch {patch_size} does not tile the image "
                         f"{tuple(image.shape[-2:])}")
    masks = masks.unsqueeze(1).to(image.dtype)
    x = image.expand(2 * k, -1, -1, -1)
    if mode == "mask":
        return x * (1 - masks)
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(k, *image.shape[1:], generator=g, dtype=torch.float64) * float(noise_std)
    noise = noise.to(device=image.device, dtype=image.dtype).repeat(2, 1, 1, 1)
    return x + masks * noise


def _token_rows(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, N, d), (B,) -> (B, d): token rows[b] of image b."""
    return z[torch.arange(len(z), device=z.device), rows]


def perturbation_test(model: Union[nn.Module, Adapter], image: torch.Tensor, maps: Union[torch.Tensor, np.ndarray],
                      layer: int = -1, k: int = 10, fraction: float = 0.25,
                      modes: Sequence[str] = MODES, noise_std: float = 0.3, seed: int = 0,
                      batch_size: Optional[int] = None) -> Dict[str, Dict[str, List[float]]]:
    """Distances ``||z_i - z~_i||`` at ``layer`` for k random patch tokens of one image.

    Args:
        model: a ViT (wrapped automatically) or an ``Adapter``.
        image: (1, 3, H, W) preprocessed.
        maps: (n, h, w) grid maps of the image's patch tokens at ``layer`` (e.g. ``explain(model, image)[0]``).
        k, fraction, seed: see ``plan_perturbation``; ``noise_std``: see ``perturbed_inputs``.
        batch_size: perturbed images per forward (default: all 2k variants of a mode at once).

    Returns:
        {mode: {"positive": [k distances], "negative": [k distances]}}, token order of the plan.
    """
    adapter = wrap(model)
    adapter.check_images(image)
    if image.shape[0] != 1:
        raise InputError(f"perturbation_test takes one image (1, 3, H, W); got {tuple(image.shape)}")
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"unknown perturbation mode {mode!r}; expected one of {MODES}")
    image = image.to(device=adapter.device, dtype=adapter.dtype)
    l = resolve_layer(layer, adapter.num_blocks)
    grid = adapter.grid_size(image)
    np_maps = _check_maps(maps)
    if tuple(np_maps.shape[1:]) != tuple(grid):
        raise InputError(f"maps are on a {tuple(np_maps.shape[1:])} grid but the image gives a {tuple(grid)} grid")
    plan = plan_perturbation(np_maps, k, fraction, seed)
    patch = cast(Tuple[int, int], tuple(adapter.preprocessing.patch_size))  # (ph, pw) by the config's type
    rows = torch.as_tensor(np.concatenate([plan.tokens, plan.tokens]) + adapter.num_prefix_tokens,
                           device=adapter.device)
    out: Dict[str, Dict[str, List[float]]] = {}
    with torch.no_grad(), eval_mode(adapter):
        z0 = adapter.run(image, upto=l).tokens[0, rows]  # (2k, d)
        for mode in modes:
            x = perturbed_inputs(image, plan, grid, patch, mode, noise_std, seed)
            step = len(x) if batch_size is None else max(1, int(batch_size))
            z = torch.cat([_token_rows(adapter.run(x[s:s + step], upto=l).tokens, rows[s:s + step])
                           for s in range(0, len(x), step)])
            d = (z - z0).double().norm(dim=-1).cpu().tolist()
            kk = len(plan.tokens)
            out[mode] = {"positive": d[:kk], "negative": d[kk:]}
    return out


class PerturbationScores:
    """Accumulates ``perturbation_test`` results over images.

    ``summary()`` -> {mode: {"positive": mean, "negative": mean, "count": tokens, "positive_wins": fraction of
    tokens whose positive distance exceeds their negative one}}.
    """

    def __init__(self) -> None:
        self.values: Dict[str, Dict[str, List[float]]] = {}

    def update(self, result: Dict[str, Dict[str, Sequence[float]]]) -> None:
        for mode, sides in result.items():
            if set(sides) != set(SIDES) or len(sides["positive"]) != len(sides["negative"]):
                raise ValueError(f"result[{mode!r}] must have equally long 'positive' and 'negative' lists")
            store = self.values.setdefault(mode, {s: [] for s in SIDES})
            for s in SIDES:
                store[s].extend(float(v) for v in sides[s])

    def summary(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for mode, v in self.values.items():
            pos, neg = np.asarray(v["positive"]), np.asarray(v["negative"])
            n = len(pos)
            out[mode] = {"positive": float(pos.mean()) if n else float("nan"),
                         "negative": float(neg.mean()) if n else float("nan"),
                         "count": n,
                         "positive_wins": float((pos > neg).mean()) if n else float("nan")}
        return out

    def state(self) -> Dict[str, Dict[str, List[float]]]:
        return {m: {s: list(v[s]) for s in SIDES} for m, v in self.values.items()}

    @classmethod
    def from_state(cls, state: Dict[str, Dict[str, Sequence[float]]]) -> "PerturbationScores":
        obj = cls()
        obj.update(state)
        return obj
