"""Scale-out on torch.distributed: process groups from `torchrun`, DDP and FSDP2 wrapping.

Launched as `torchrun --nproc_per_node N -m bitnet158.cli train ...` (or any script calling
`bitnet158.train`), every process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment
torchrun sets. Without them the run is a single process and nothing here does anything.
The backend is gloo on CPU (nccl when CUDA is used).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (once); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def current() -> DistInfo:
    """The process group this process is in (a single-process DistInfo when none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    return DistInfo()


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP or FSDP2 (`fully_shard` per decoder block, then the root) when the run is distributed."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    blocks = getattr(model, "layers", None)
    if blocks is None:  # a Hugging Face causal LM: model.model.layers
        blocks = getattr(getattr(model, "model", None), "layers", None)
    for block in blocks or []:
        fully_shard(block)
    fully_shard(model)
    return model


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of `value` over every process (itself in a single-process run)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 / AMX), so autocast pays."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single-process run)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown(wait: bool = True) -> None:
    """Leave the process group. With `wait`, every process first waits for the others, so none
    tears down its connections while a peer still uses them (gloo can abort at exit then)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(backend: str | None = None) -> Iterator[DistInfo]:
    """`init_distributed` for the length of a run, leaving the group at the end when this call
    joined it; after an error, at once (a barrier could wait forever on a failed peer)."""
    joined = dist.is_available() and not dist.is_initialized()
    info = init_distributed(backend)
    try:
        yield info
    except BaseException:
        if joined:
            shutdown(wait=False)
        raise
    if joined:
        shutdown()
