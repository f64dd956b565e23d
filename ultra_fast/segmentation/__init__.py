"""Zero-shot unsupervised segmentation by clustering the maps of all patch tokens (SPEC §4)."""
from .cluster import cluster_tokens, cut, linkage, min_max
from .segment import ASSIGN_RULES, Segmentation, segment, segment_maps

__all__ = ["segment", "segment_maps", "Segmentation", "ASSIGN_RULES", "cluster_tokens", "cut", "linkage",
           "min_max"]
