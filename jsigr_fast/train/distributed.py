"""torchrun / DistributedDataParallel plumbing.

``torchrun --nproc_per_node=N -m jsigr_fast train ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`setup` then joins the process group (NCCL on GPU, gloo on CPU) and pins
rank r to ``cuda:LOCAL_RANK``. Without those variables it is a single process.

Double backprop under DDP: the library's losses take input gradients out of place with
``autograd.grad(create_graph=True)`` and the trainer calls one ordinary ``loss.backward()``, so
DDP's reducer sees one backward per forward (pytorch#63812 is about ``backward(create_graph=True)``,
which we never call). Auxiliary passes (saliency, attacks, SmoothGrad, forward-mode JVPs) run on
the unwrapped module.

The J-SIGR / JARN adaptor and discriminator are not DDP modules: they are stepped by their own
Adam optimizers inside the criterion, which averages their gradients over the ranks of the process
group itself (``SaliencyGAN(sync_grads=None)``), so every rank's copy stays identical, as if trained
on the global batch. The trainer builds the criterion with ``auto_step=False`` and commits those
updates only after a step was accepted on every rank, so a non-finite batch moves nothing.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = ["DistEnv", "setup", "teardown", "all_reduce_", "gather_objects", "broadcast_module"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    created_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(spec: str, local_rank: int, distributed: bool) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available (use --device cpu)")
        if distributed:
            dev = torch.device("cuda", local_rank)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ConfigError(f"device {spec!r} is not supported by the trainer (cpu or cuda)")
    return dev


def setup(device_spec: str) -> DistEnv:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=_pick_device(device_spec, 0, False))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_spec, local, True)
    created = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
        created = True
    return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device,
                   created_group=created)


def teardown(env: DistEnv) -> None:
    if env.created_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_(t: torch.Tensor, env: DistEnv, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=op)
    return t


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj`` (a picklable value), in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's parameters and buffers to every rank (identical starting copies)."""
    if env.distributed:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
