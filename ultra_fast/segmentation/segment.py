"""Zero-shot segmentation from the maps of all patch tokens (SPEC §4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .cluster import cluster_tokens, min_max

ASSIGN_RULES = ("argmax", "token")


@dataclass
class Segmentation:
    """One image's segmentation.

    labels: (H, W) int32 segment id per pixel, at the requested (original) resolution.
    cluster_maps: (K, H, W) float32 min-max scaled summed maps of each cluster.
    token_clusters: (h, w) cluster id of every patch token.
    linkage: (n-1, 4) the dendrogram (scipy format) of the token maps.
    """

    labels: np.ndarray
    cluster_maps: np.ndarray
    token_clusters: np.ndarray
    linkage: np.ndarray

    @property
    def num_segments(self) -> int:
        return int(len(np.unique(self.labels)))


def segment_maps(maps: torch.Tensor, size: Tuple[int, int], threshold: Optional[float] = 0.4,
                 n_clusters: Optional[int] = None, metric: str = "cosine", method: str = "average",
                 assign: str = "argmax", interpolation: str = "bilinear") -> Segmentation:
    """Segment one image from the (n, h, w) maps of its n patch tokens (row-major token order).

    ``assign="argmax"`` (the paper): each pixel takes the cluster whose summed, upsampled, min-max
    scaled map is largest there. ``assign="token"``: each pixel takes the cluster of the token whose
    patch it lies in.
    """
    if assign not in ASSIGN_RULES:
        raise ValueError(f"unknown assign rule {assign!r}; expected one of {ASSIGN_RULES}")
    n, h, w = maps.shape
    if n != h * w:
        raise ValueError(f"expected the maps of all {h * w} patch tokens, got {n}")
    flat = min_max(maps.reshape(n, -1).double().cpu().numpy())
    ids, Z = cluster_tokens(flat, threshold, n_clusters, metric, method)
    K = int(ids.max()) + 1
    # Upsampling is linear, so summing at grid resolution then upsampling equals summing upsampled maps.
    sums = torch.zeros(K, h * w, dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(ids), torch.from_numpy(flat))
    up = F.interpolate(sums.reshape(1, K, h, w), size=tuple(size), mode=interpolation, align_corners=False)[0]
    lo = up.amin((1, 2), keepdim=True)
    span = up.amax((1, 2), keepdim=True) - lo
    cluster_maps = torch.where(span > 0, (up - lo) / span.clamp_min(1e-300), torch.zeros_like(up))
    token_grid = torch.from_numpy(ids).reshape(1, 1, h, w).double()
    if assign == "argmax":
        labels = cluster_maps.argmax(0)
    else:
        labels = F.interpolate(token_grid, size=tuple(size), mode="nearest")[0, 0].long()
    return Segmentation(labels.numpy().astype(np.int32), cluster_maps.float().numpy(),
                        ids.reshape(h, w), Z)


def segment(model, images: torch.Tensor, sizes: Optional[Sequence[Tuple[int, int]]] = None,
            threshold: Optional[float] = 0.4, n_clusters: Optional[int] = None, metric: str = "cosine",
            method: str = "average", assign: str = "argmax", interpolation: str = "bilinear",
            **explain_kwargs) -> List[Segmentation]:
    """Explain every patch token of each image and segment it; one ``Segmentation`` per image.

    ``sizes``: the (H, W) of each original image (labels come at that resolution); default: the
    input tensor's size. ``explain_kwargs`` go to ``ultra_fast.explain`` (layer, scalar, order, ...).
    """
    from ..engine import explain
    explain_kwargs.setdefault("targets", "patches")
    if explain_kwargs["targets"] != "patches":
        raise ValueError("segmentation needs the maps of all patch tokens (targets='patches')")
    maps = explain(model, images, **explain_kwargs)
    if sizes is None:
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
    if len(sizes) != images.shape[0]:
        raise ValueError(f"{len(sizes)} sizes for {images.shape[0]} images")
    return [segment_maps(m, s, threshold, n_clusters, metric, method,
                         assign, interpolation) for m, s in zip(maps, sizes)]
