"""Zero-shot unsupervised segmentation by clustering the maps of all patch tokens (docs/method.md §4)."""
from .aggregation import AGGREGATIONS, Partition, aggregate
from .cluster import TokenClustering, cluster_tokens, cut, linkage, min_max
from .segment import ASSIGN_RULES, Segmentation, segment, segment_maps, token_partition

__all__ = ["segment", "segment_maps", "Segmentation", "ASSIGN_RULES", "cluster_tokens", "cut", "linkage",
           "min_max", "TokenClustering", "token_partition", "AGGREGATIONS", "Partition", "aggregate"]
