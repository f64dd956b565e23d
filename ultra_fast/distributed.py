"""torch.distributed helpers for runs started by ``torchrun``: one process per rank, sharded inputs.

A process group is created only when ``WORLD_SIZE`` > 1 is in the environment (set by torchrun);
otherwise everything here is a no-op for a single process (rank 0 of 1).
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch


def env_world() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def init(device: str = "cpu", timeout_s: Optional[float] = None) -> Tuple[int, int, str]:
    """Join the process group if torchrun started us; returns (rank, world size, this rank's device).

    Backend: nccl for CUDA devices, gloo on CPU. The default timeout is long (24 h, or
    ``$ULTRA_FAST_DIST_TIMEOUT_S``) because ranks wait at the final barrier for the slowest shard.
    """
    rank, world, local = env_world()
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist
    if str(device).startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        timeout_s = timeout_s or float(os.environ.get("ULTRA_FAST_DIST_TIMEOUT_S", 24 * 3600))
        kw: Dict[str, Any] = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "nccl":
            kw["device_id"] = torch.device(device)
        dist.init_process_group(**kw)
    return dist.get_rank(), dist.get_world_size(), device


def is_initialized() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (a collective: all ranks must call it)."""
    if not is_initialized():
        return ok
    import torch.distributed as dist
    t = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item()) == 0


def shard(items: Sequence, rank: int, world: int) -> list:
    """Rank ``rank`` of ``world`` takes ``items[rank::world]``."""
    return list(items[rank::world])


def destroy() -> None:
    if is_initialized():
        import torch.distributed as dist
        dist.destroy_process_group()
