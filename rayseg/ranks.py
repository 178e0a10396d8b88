"""What the ranks of a Ray Train run share: which validation rows each scores, batch norm across ranks, means over
all ranks, and where each rank runs. Plain torch.distributed, tested without Ray where it can be."""

from __future__ import annotations

import socket
import zlib

import torch

SYNC_BN_BELOW = 16  # images per GPU under which per-GPU batch norm statistics are too noisy (SyncBatchNorm's use case)


def is_mine(image_id: str, rank: int, world: int) -> bool:
    """Validation rows are dealt to ranks by a hash of their id: every row exactly once, whatever the order."""
    return zlib.crc32(str(image_id).encode()) % world == rank


def wants_sync_batchnorm(device_type: str, world: int, batch_size: int) -> bool:
    """Batch norm statistics over all ranks' batches, where each GPU's batch alone is too small to estimate them.
    Never on CPU: SyncBatchNorm runs only on CUDA (NCCL), not on gloo."""
    return device_type == "cuda" and world > 1 and batch_size < SYNC_BN_BELOW


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def all_mean(total: torch.Tensor, count: int) -> float:
    """sum(total) / sum(count) over all ranks; `total` stays on its device (NCCL reduces only GPU tensors)."""
    t = torch.stack([total.double(), torch.tensor(float(count), dtype=torch.float64, device=total.device)])
    if _distributed():
        torch.distributed.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def where_ranks_run(rank: int) -> list[dict]:
    """{rank, node_id, hostname} of every rank, gathered from all of them (the same list on each)."""
    import ray

    mine = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}
    if not _distributed():
        return [mine]
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return sorted(every, key=lambda r: r["rank"])
