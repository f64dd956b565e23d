"""ULTra_W checkpoints: the format lives in ``ultra_fast.engine.w_checkpoint`` (the engine reads it for
``scalar="learned"``); re-exported here, beside the training loop that writes it."""
from ..engine.w_checkpoint import (
    FORMAT,
    VERSION,
    WCheckpoint,
    check_compatible,
    load_w,
    read_checkpoint,
    save_checkpoint,
)

__all__ = ["FORMAT", "VERSION", "WCheckpoint", "check_compatible", "load_w", "read_checkpoint", "save_checkpoint"]
