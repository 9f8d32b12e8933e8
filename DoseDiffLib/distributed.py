"""Multi-process training under torchrun: the process group, ranks and what replicas share.

Kept apart from the training loop and the CLI so that a single process never touches
torch.distributed beyond asking whether it is initialised.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Rank 0 as torchrun numbered it (also after the group is gone): the one that validates and writes."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Join torchrun's process group when WORLD_SIZE > 1; yields this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        yield device
        dist.barrier()  # leave together: gloo aborts a process whose peer tore the group down first
    finally:
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model as the loss sees it: DDP (gradients all-reduced) with several processes."""
    if rank_and_world()[1] == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's copy of a tensor (just this one in a single process)."""
    world = rank_and_world()[1]
    if world == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor)
    return out
