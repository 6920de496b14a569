"""Distributed helpers: one place that knows whether torch.distributed is up.

Every function works in a plain single process too (no launcher, no process group), so the same
code runs under `deepspeed --num_gpus N`, under `python`, and inside tests.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Start the process group (idempotent).

    Under `deepspeed --num_gpus N` the launcher sets RANK/WORLD_SIZE/MASTER_*. A plain `python` run (or a
    test) gets a one-process group on a free loopback port, passed explicitly rather than through the
    environment, so child processes do not inherit a port this process holds.
    """
    if is_initialized():
        return
    import deepspeed

    if torch.cuda.is_available():
        # Object collectives (all_gather_object) under NCCL use the current device: make it this rank's
        # before anything runs, not only once a DeepSpeed engine exists.
        torch.cuda.set_device(local_device())

    from hsft.engine.verbosity import quiet_stdout

    backend = None if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" in os.environ:
        with quiet_stdout():  # DeepSpeed prints that it built its shared-memory all-reduce op
            deepspeed.init_distributed(dist_backend=backend)
        barrier()  # every rank has mapped every rank's shared-memory buffer by now
        _unlink_shared_memory_buffer()
    else:
        # DeepSpeed would otherwise fall back to MPI discovery; its engine still reads LOCAL_RANK.
        os.environ.setdefault("LOCAL_RANK", "0")
        with quiet_stdout():
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, rank=0, world_size=1,
                                       init_method=f"tcp://127.0.0.1:{_free_port()}")


def shared_memory_buffer() -> Path:
    """This rank's buffer of DeepSpeed's CPU shared-memory all-reduce (named as DeepSpeed 0.19 names it)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank()}")


def _unlink_shared_memory_buffer() -> None:
    """DeepSpeed's CPU all-reduce gives each rank a /dev/shm buffer (about 66 MB) and never removes it:
    every multi-rank CPU run would hold that memory until the machine restarts. Once every rank has
    mapped every buffer (the end of init) the names can go; the mappings live until the processes end."""
    try:
        shared_memory_buffer().unlink()
    except FileNotFoundError:  # not a CPU run with the shared-memory all-reduce
        pass


def local_device() -> torch.device:
    """This rank's device: the accelerator DeepSpeed assigns it (cuda:LOCAL_RANK), or the CPU where
    there is none. The model, every tensor of a batch and the tensors of collectives live here."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def collective_device() -> torch.device:
    """Where the tensors of a collective must live: NCCL reduces GPU tensors only, gloo CPU tensors."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """The strided share of `items` that this rank processes (every rank gets a disjoint part)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return list(items[r::w])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one rank."""
    if not is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(values: list[float]) -> list[float]:
    """Element-wise mean of `values` over ranks (every rank passes a list of the same length)."""
    if not is_initialized() or world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size()).tolist()
