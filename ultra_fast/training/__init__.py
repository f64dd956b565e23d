"""ULTra_W (docs/method.md §5): learn one direction per patch position with the self-consistency loss."""
from .checkpoint import WCheckpoint, check_compatible, load_w, read_checkpoint, save_checkpoint
from .self_consistency import (
    PERTURBATIONS,
    ConsistencyPairs,
    consistency_pairs,
    inside_tokens,
    perturb_outside,
    segment_with_w,
    self_consistency_loss,
    tokens_at,
)
from .train_w import TrainResult, batch_seed, epoch_order, train_w

__all__ = ["train_w", "TrainResult", "load_w", "WCheckpoint", "check_compatible", "read_checkpoint",
           "save_checkpoint", "self_consistency_loss", "consistency_pairs", "ConsistencyPairs", "segment_with_w",
           "perturb_outside", "inside_tokens", "tokens_at", "PERTURBATIONS", "batch_seed", "epoch_order"]
