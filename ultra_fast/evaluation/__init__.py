"""Evaluation of segmentations and explanation maps against labels (docs/method.md §6)."""
from .baselines import cls_rollout_map, foreground_mask, kmeans_segmentation, kmeans_token_clusters, upsample_nearest
from .harness import EvalConfig, run_evaluation, summarise
from .itiou import ITIoU, itiou_image, token_classes
from .metrics import (
    DatasetWideMatching,
    DatasetWideResult,
    PerImageMatching,
    confusion,
    segment_histograms,
    segment_mean_features,
)
from .perturbation import (
    PerturbationPlan,
    PerturbationScores,
    patch_mask,
    perturbation_test,
    perturbed_inputs,
    plan_perturbation,
)

__all__ = ["PerImageMatching", "confusion", "DatasetWideMatching", "DatasetWideResult", "segment_histograms",
           "segment_mean_features", "ITIoU", "itiou_image", "token_classes", "PerturbationPlan",
           "PerturbationScores", "patch_mask", "perturbation_test", "perturbed_inputs", "plan_perturbation",
           "cls_rollout_map", "foreground_mask", "kmeans_segmentation", "kmeans_token_clusters",
           "upsample_nearest", "EvalConfig", "run_evaluation", "summarise"]
