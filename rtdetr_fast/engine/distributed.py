"""torchrun support: process group set-up, rank helpers, model wrapping, samplers."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str | None = None) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); NCCL on GPUs,
    gloo on CPU. Without torchrun's variables this is single-process and returns ``device``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    if not is_distributed():
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
