"""The ULTra_W self-consistency objective (docs/method.md §5): segment, perturb outside each segment, compare tokens.

For an image x segmented with the current W, and a segment c, ``x̃^c`` is x perturbed on the pixels
outside c. A token i whose whole patch lies inside c sees unchanged pixels, so a good explanation
scalar should not move: the loss is the mean over such (c, i) of ``(w_iᵀ (z_i − z̃_i^c))²``.

z and z̃ do not depend on W, so one batch's differences ``z_i − z̃_i^c`` are computed once (no
gradients, model frozen) and cached as ``ConsistencyPairs``; the optimiser then works on them alone.
Each patch token lies in at most one segment, so a batch caches at most one difference per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, cast

import numpy as np
import torch

from ..engine import explain_with
from ..engine.config import ExplainConfig
from ..engine.options import eval_mode, resolve_layer
from ..engine.scalars import LearnedScalar
from ..errors import ConfigError, InputError
from ..models import Adapter
from ..segmentation import segment_maps

PERTURBATIONS = ("noise", "mask")
#: Perturbed copies forwarded together; bounds memory, not the result.
FORWARD_BATCH = 16


@dataclass
class ConsistencyPairs:
    """The cached differences of one batch.

    tokens: (M,) patch-token position (0..n-1, row-major, prefix tokens excluded) of each pair.
    diffs: (M, d) float64, ``z_i − z̃_i^c`` at the trained layer.
    num_segments: segments that were perturbed (had a token inside and pixels outside).
    """

    tokens: torch.Tensor
    diffs: torch.Tensor
    num_segments: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @staticmethod
    def concat(parts: List["ConsistencyPairs"], dim: int) -> "ConsistencyPairs":
        if not parts:
            return ConsistencyPairs(torch.zeros(0, dtype=torch.long), torch.zeros(0, dim, dtype=torch.float64), 0)
        return ConsistencyPairs(torch.cat([p.tokens for p in parts]), torch.cat([p.diffs for p in parts]),
                                sum(p.num_segments for p in parts))


def directions(theta: torch.Tensor) -> torch.Tensor:
    """w_i = θ_i / ||θ_i||; a zero row has no direction and is refused."""
    norms = torch.linalg.vector_norm(theta, dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise InputError("theta has an all-zero row: its direction w_i = θ_i/||θ_i|| is undefined")
    return theta / norms


def self_consistency_loss(theta: torch.Tensor, tokens: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``(w_{tokens[m]}ᵀ diffs[m])²`` with w_i = θ_i/||θ_i||; differentiable in θ.

    theta: (n, d); tokens: (M,) integer positions into theta's rows; diffs: (M, d). M = 0 is refused
    (a mean over nothing).
    """
    if theta.dim() != 2:
        raise InputError(f"theta must be (n, d); got shape {tuple(theta.shape)}")
    if tokens.dim() != 1 or tokens.dtype not in (torch.int32, torch.int64):
        raise InputError(f"tokens must be a 1-D integer tensor; got shape {tuple(tokens.shape)}, {tokens.dtype}")
    if diffs.shape != (tokens.shape[0], theta.shape[1]):
        raise InputError(f"diffs must be (M, d) = ({tokens.shape[0]}, {theta.shape[1]}); got {tuple(diffs.shape)}")
    if tokens.numel() == 0:
        raise InputError("no (segment, token) pairs: the loss is a mean over nothing")
    if int(tokens.min()) < 0 or int(tokens.max()) >= theta.shape[0]:
        raise InputError(f"token positions must lie in 0..{theta.shape[0] - 1}; got "
                         f"{int(tokens.min())}..{int(tokens.max())}")
    w = directions(theta)[tokens]
    proj = (w * diffs.to(theta.dtype)).sum(-1)
    return (proj * proj).mean()


def tokens_at(adapter: Adapter, images: torch.Tensor, layer: int) -> torch.Tensor:
    """z^(layer) (B, N, d): a graph-free forward of the frozen model, in eval mode."""
    l = resolve_layer(layer, adapter.num_blocks)
    with torch.no_grad(), eval_mode(adapter):
        return adapter.run(images, upto=l).tokens


def segment_with_w(adapter: Adapter, images: torch.Tensor, theta: torch.Tensor, layer: int,
                   threshold: float = 0.4, assign: str = "token",
                   config: Optional[ExplainConfig] = None) -> np.ndarray:
    """(B, H, W) int32 segment ids at the model-input resolution, from the ULTra_W maps of the current θ
    (explained with ``config``'s other options; default: ``explain``'s)."""
    fn = LearnedScalar(theta.detach(), adapter.num_prefix_tokens)
    config = (config or ExplainConfig()).replace(layer=layer, scalar=fn, targets="patches")
    maps = explain_with(adapter, images, config)
    size = cast(Tuple[int, int], tuple(images.shape[-2:]))  # (H, W) of the (B, 3, H, W) batch
    return np.stack([segment_maps(m, size, threshold=threshold, assign=assign).labels for m in maps])


def inside_tokens(labels: np.ndarray, patch_size) -> np.ndarray:
    """(h*w,) the segment id of every patch whose pixels all share one id, -1 for patches that straddle."""
    ph, pw = patch_size
    H, W = labels.shape
    if H % ph or W % pw:
        raise InputError(f"labels of size {(H, W)} are not tiled by {ph}x{pw} patches")
    blocks = labels.reshape(H // ph, ph, W // pw, pw).transpose(0, 2, 1, 3).reshape(H // ph, W // pw, -1)
    first = blocks[..., 0]
    uniform = (blocks == first[..., None]).all(-1)
    return np.where(uniform, first, -1).reshape(-1)


def perturb_outside(image: torch.Tensor, outside: torch.Tensor, perturb: str, delta: float,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x̃ = x changed on the ``outside`` pixels only: + δ·N(0, 1) noise (``"noise"``) or set to 0 (``"mask"``).

    image: (3, H, W) preprocessed (normalised) tensor; outside: (H, W) bool. Zero in the normalised
    space is the dataset mean colour. The noise is drawn on the CPU from ``generator`` (reproducible).
    """
    if perturb == "mask":
        return image.masked_fill(outside.to(image.device), 0)
    if perturb == "noise":
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        eps = torch.randn(image.shape, generator=generator, dtype=dtype).to(image.device, image.dtype)
        return image + float(delta) * eps * outside.to(image.device, image.dtype)
    raise ConfigError(f"unknown perturbation {perturb!r}; expected one of {PERTURBATIONS}")


def consistency_pairs(adapter: Adapter, images: torch.Tensor, labels: np.ndarray, layer: int,
                      delta: float = 0.3, perturb: str = "noise",
                      generator: Optional[torch.Generator] = None) -> ConsistencyPairs:
    """The cached differences ``z_i − z̃_i^c`` of a batch, for every segment c and token i inside c.

    images: (B, 3, H, W) preprocessed; labels: (B, H, W) segment ids at that resolution. Segments with
    no token entirely inside them, or with no pixel outside them (nothing to perturb), are skipped.
    Perturbed copies are drawn image by image, segment by segment in increasing id order.
    """
    if perturb not in PERTURBATIONS:
        raise ConfigError(f"unknown perturbation {perturb!r}; expected one of {PERTURBATIONS}")
    if perturb == "noise" and not delta > 0:
        raise ConfigError(f"delta (the noise std) must be > 0; got {delta}")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0], *images.shape[-2:]):
        raise InputError(f"labels must be (B, H, W) = {(images.shape[0], *images.shape[-2:])}; got {labels.shape}")
    P = adapter.num_prefix_tokens
    patch = adapter.preprocessing.patch_size
    z = tokens_at(adapter, images, layer)
    parts = []
    for b in range(images.shape[0]):
        owner = inside_tokens(labels[b], patch)
        lab = torch.from_numpy(np.ascontiguousarray(labels[b]))
        segs = [int(c) for c in np.unique(owner[owner >= 0]) if bool((lab != c).any())]
        perturbed = [perturb_outside(images[b], lab != c, perturb, delta, generator) for c in segs]
        for start in range(0, len(segs), FORWARD_BATCH):
            zt = tokens_at(adapter, torch.stack(perturbed[start:start + FORWARD_BATCH]), layer)
            for k, c in enumerate(segs[start:start + FORWARD_BATCH]):
                tok = torch.from_numpy(np.flatnonzero(owner == c))
                rows = P + tok.to(z.device)
                d = (z[b, rows] - zt[k, rows]).double().cpu()
                parts.append(ConsistencyPairs(tok, d, 1))
    return ConsistencyPairs.concat(parts, z.shape[-1])
