"""Running on several processes: `torchrun --nproc_per_node=N -m lorakit train run.yaml`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we join a process group (gloo on CPU, nccl on CUDA).
Every process computes the same global batch order and takes its share of each batch; only rank 0
writes files. Two strategies (`train.distributed`):
- ddp: each process holds the whole model; DistributedDataParallel averages the adapter's gradients.
- fsdp: PyTorch's `fully_shard` (FSDP2) shards every transformer block, frozen base weights included,
  across the processes, for models too large for one device. Only the adapter trains; it is gathered
  from the shards (`full_tensor`) when saved, on every process, and written by rank 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lorakit.models.loading import default_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any_flag(self, flag: bool) -> bool:
        """True on every process when any process raised the flag (e.g. Ctrl-C on one of them)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the processes (one all-reduce for several scalars); the tensor itself alone."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def sum(self, value: float) -> float:
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())


def init_distributed() -> DistContext:
    """Join the torchrun process group when launched by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=default_device())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, strategy: str = "ddp", blocks: nn.ModuleList | None = None):
    """ddp: a DistributedDataParallel wrapper (frozen parameters are not synchronised). fsdp: shard each of
    `blocks` and then the whole model in place; the model itself is returned."""
    if not ctx.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def is_sharded(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor; for a sharded (DTensor) parameter an all-gather every process must join."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Load a whole tensor into a parameter, keeping only this process's shard when it is sharded."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(full)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict; with sharded parameters, gathered whole and keyed by parameter name."""
    if any(is_sharded(p) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if any(is_sharded(p) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
