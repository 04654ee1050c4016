"""The trainer under ``torchrun``: process group, DDP / FSDP2 wrapping, and the few collectives it needs.

``torchrun --nproc-per-node N -m unmask train CONFIG`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; with ``WORLD_SIZE`` > 1 the trainer joins a process group (NCCL on CUDA, one GPU
per process; gloo on CPU). The global batch stays ``batch_size x grad_accum`` windows: the
``grad_accum`` micro-batches of a step are dealt round-robin to the processes, so a run on N
processes takes the same optimizer steps on the same data as a run on one.

Each process scales its loss by 1 / (its micro-batches); DDP and FSDP2 average gradients
across processes, so the gradient is the mean over all micro-batches, as in a single process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from unmask.errors import UnmaskError
from unmask.loading import resolve_device


@dataclass
class DistContext:
    """Where this process stands in a (possibly one-process) run."""

    rank: int = 0  # global rank; 0 logs, evaluates figures and writes files
    world: int = 1  # number of processes
    local_rank: int = 0  # rank on this machine: the GPU it uses
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the model lives
    owns_group: bool = False  # this context created the process group (and destroys it at the end)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise UnmaskError(f"environment variable {name}={value!r} is not an integer") from None


def setup(device: str) -> DistContext:
    """Join the process group when launched by torchrun with more than one process."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistContext(device=resolve_device(device))
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UnmaskError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
        backend = "nccl"
    elif device == "auto" or device == "cpu":
        where, backend = torch.device("cpu"), "gloo"
    else:
        raise UnmaskError(f"device {device!r} under torchrun: use auto, cuda or cpu (each process takes GPU LOCAL_RANK)")
    owns = not dist.is_initialized()  # a caller may have set up the group already, and keeps it
    if owns:
        kwargs = {"device_id": where} if where.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return DistContext(rank, world, local_rank, where, owns)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def local_micro_batches(grad_accum: int, ctx: DistContext) -> list[int]:
    """The micro-batches of each step this process computes (all of them in a single process)."""
    if grad_accum % ctx.world:
        raise UnmaskError(
            f"[train] grad_accum {grad_accum} is not a multiple of the {ctx.world} processes: the global batch is "
            f"batch_size x grad_accum windows and each process computes grad_accum / processes micro-batches"
        )
    return list(range(ctx.rank, grad_accum, ctx.world))


def wrap_model(model: nn.Module, parallel: str, ctx: DistContext) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on each transformer block, then on the root); unchanged alone."""
    if not ctx.enabled:
        return model
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world,))
        if ctx.device.type == "cuda":  # gather bf16 weights for compute, reduce gradients in fp32
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    ddp.config = model.config  # the objectives read model.config
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The model without a DDP wrapper (an FSDP2 model is sharded in place and stays itself)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last local micro-batch of a step."""
    if hasattr(model, "no_sync") and not sync:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    yield


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Sum numbers over the processes (unchanged alone)."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def to_float(value: torch.Tensor) -> float:
    """A scalar tensor as a float; a sharded (DTensor) one is reduced across processes first."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)
