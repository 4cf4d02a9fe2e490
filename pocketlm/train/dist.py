"""torchrun integration: the process group from the environment torchrun provides, the one place that
wraps the model for data parallelism, and the few collectives the loop needs to keep ranks in step."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """One process: no process group. Under torchrun: NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local, device)


def wrap_model(model: torch.nn.Module, strategy: str, info: DistInfo) -> torch.nn.Module:
    """The module the training step calls, for this environment and `train.dist`: one process trains
    the plain module; under torchrun `auto` and `ddp` mean DistributedDataParallel (FSDP2 will be one
    more strategy here). Parameters stay those of `model`, so the optimizer and checkpoints use it."""
    if info.world_size == 1:
        return model
    if strategy in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    raise ValueError(f"unknown parallel strategy {strategy!r}")  # TrainConfig validates the choices


def grad_sync(wrapped: torch.nn.Module, enabled: bool):
    """A context for one micro-batch's backward: skip the gradient all-reduce when not `enabled` (all but
    the last micro-batch of an accumulated step), where the wrapper supports it."""
    if enabled or not hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext()
    return wrapped.no_sync()


def from_main(value: float, device: torch.device) -> float:
    """Rank 0's `value` on every rank (one 1-element broadcast): decisions that read a clock, like the
    time budget's stop and lr progress, must not differ between ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.item()


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
