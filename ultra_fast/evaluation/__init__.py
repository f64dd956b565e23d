"""Evaluation of segmentations against labels (SPEC §6)."""
from .metrics import PerImageMatching, confusion

__all__ = ["PerImageMatching", "confusion"]
