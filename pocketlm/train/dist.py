"""torchrun integration: the process group from the environment torchrun provides, the one place that
wraps the model for data parallelism (DDP, or FSDP2 sharding within a node and replication across
nodes), and the few collectives the loop needs to keep ranks in step."""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pocketlm.errors import PocketLMError


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
    """One process: no process group. Under torchrun (even with one rank, so that `train.dist: fsdp`
    can shard over a mesh of one): NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
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
        dist.init_process_group(backend=backend, store=_restart_store(world), rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


def _restart_store(world: int):
    """torchrun's store for the process group, under a prefix per restart. The agent's store outlives
    the workers it restarts (--max-restarts), and a restarted rank could read a dead rank's address from
    the attempt before (pytorch/pytorch#135712; seen here as gloo's "Connection refused" on a restart).
    None (env:// as usual) when torchrun does not share its store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"pocketlm/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def choose_strategy(model: torch.nn.Module, strategy: str, info: DistInfo) -> str:
    """`train.dist` resolved for this environment: "none" (the plain module), "ddp" or "fsdp". `auto`
    means the plain module in one process and FSDP2 under torchrun, but DDP for a model with frozen
    weights (LoRA): FSDP2 shards groups of one dtype, the frozen base may be bf16 beside fp32 adapters,
    and an adapter's gradients are small enough to all-reduce."""
    if strategy == "fsdp" and dist.is_initialized():
        return "fsdp"
    if info.world_size == 1:
        return "none"
    if strategy == "auto":
        return "fsdp" if all(p.requires_grad for p in model.parameters()) else "ddp"
    return strategy


def device_mesh(info: DistInfo):
    """1-D over all ranks within one node; 2-D (replicate across nodes x shard within a node: hybrid
    sharding) when torchrun runs fewer ranks per node than in all."""
    from torch.distributed.device_mesh import init_device_mesh

    local = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    if local < info.world_size:
        if info.world_size % local:
            raise PocketLMError(f"torchrun: WORLD_SIZE {info.world_size} is not a multiple of LOCAL_WORLD_SIZE "
                                f"{local} (every node must run as many ranks)")
        return init_device_mesh(info.device.type, (info.world_size // local, local), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))


def wrap_model(model: torch.nn.Module, strategy: str, info: DistInfo, bf16: bool = False) -> torch.nn.Module:
    """The module the training step calls, for this environment and `train.dist` (see choose_strategy).
    DDP wraps `model`, whose parameters stay plain tensors. FSDP2 shards `model` in place, one
    `fully_shard` per block and then the root (embeddings, final norm, head), so its parameters become
    DTensors: build the optimizer after this call. On CUDA with `bf16` the blocks compute in bf16
    parameters and reduce gradients in fp32; on gloo (CPU) everything stays fp32."""
    chosen = choose_strategy(model, strategy, info)
    if chosen == "none":
        return model
    if chosen == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if chosen == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy()
        if bf16 and info.device.type == "cuda":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        mesh = device_mesh(info)
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    raise ValueError(f"unknown parallel strategy {strategy!r}")  # TrainConfig validates the choices


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are FSDP2's DTensor shards (every rank must then run its forwards)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def grad_sync(wrapped: torch.nn.Module, enabled: bool):
    """A context for one micro-batch's backward: skip the gradient reduction when not `enabled` (all but
    the last micro-batch of an accumulated step), where the wrapper supports it."""
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2: accumulate unsharded, reduce-scatter once
        wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
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
    """Destroy the process groups, then collect the garbage that still holds them (FSDP2's meshes sit in
    reference cycles): left to interpreter shutdown, a gloo group's worker threads can die after Python
    and abort the rank (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()
