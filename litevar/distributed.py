"""Rank, world size and the process group for commands started under ``torchrun``.

Without the torchrun environment (RANK / WORLD_SIZE / LOCAL_RANK) everything runs in one process and no
process group is created. Under torchrun the group uses gloo on CPU and nccl on CUDA, each rank on
``cuda:LOCAL_RANK``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank of ``size`` processes and the device it computes on.

    Args:
        rank: global rank (0 in a single process).
        size: number of processes.
        local_rank: rank on this machine (selects ``cuda:LOCAL_RANK``).
        device: the device this rank computes on.
        grouped: True when a ``torch.distributed`` process group is live.

    Example:
        >>> World().is_main, World().owns(3)
        (True, True)
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    grouped: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        """Chunks are dealt round-robin: chunk j belongs to rank j % size."""
        return chunk % self.size == self.rank

    def barrier(self) -> None:
        if not self.grouped:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def total(self, value: int) -> int:
        """The sum of ``value`` over all ranks."""
        if not self.grouped:
            return value
        summed = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(summed)
        return int(summed.item())

    def run_on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; every rank raises if it failed, so no rank goes on alone.

        Rank 0 re-raises the original exception; the other ranks raise ``ValueError`` with its message.
        Doubles as a barrier: no rank returns before rank 0 has finished ``fn``.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
                error = err
        if self.grouped:
            message = [f"{error}" if error is not None else None]
            dist.broadcast_object_list(message, src=0, device=self.device if self.device.type == "cuda" else None)
            if error is None and message[0] is not None:
                raise ValueError(f"{message[0]} (reported by rank 0)")
        if error is not None:
            raise error
        return result


def env_ranks(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment variables, or None outside torchrun."""
    environ = os.environ if environ is None else environ
    present = [k for k in _ENV_KEYS if k in environ]
    if not present:
        return None
    if len(present) != len(_ENV_KEYS):
        missing = sorted(set(_ENV_KEYS) - set(present))
        raise ValueError(f"torchrun environment incomplete: {', '.join(missing)} not set; start with torchrun "
                         "or unset RANK / WORLD_SIZE / LOCAL_RANK")
    try:
        rank, size, local = (int(environ[k]) for k in _ENV_KEYS)
    except ValueError:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got "
                         f"{[environ[k] for k in _ENV_KEYS]}") from None
    if not 0 <= rank < size:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {size}")
    return rank, size, local


def _rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("`device` cuda was asked for but CUDA is not available; use `device` cpu")
        return torch.device("cuda", local_rank)
    return device


@contextmanager
def process_group(device: str | torch.device = "cpu", environ: Mapping[str, Any] | None = None) -> Iterator[World]:
    """Yield this process's :class:`World`; under torchrun, with a process group that is destroyed on exit.

    Args:
        device: the requested device; "cuda" becomes ``cuda:LOCAL_RANK`` under torchrun.
        environ: the environment to read (default ``os.environ``).

    Example:
        >>> with process_group("cpu") as world:  # doctest: +SKIP
        ...     print(world.rank, world.size)
    """
    ranks = env_ranks(environ)
    if ranks is None:
        yield World(device=torch.device(device))
        return
    rank, size, local = ranks
    rank_device = _rank_device(device, local)
    if rank_device.type == "cuda":
        torch.cuda.set_device(rank_device)
        dist.init_process_group("nccl", rank=rank, world_size=size)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=size)
    world = World(rank=rank, size=size, local_rank=local, device=rank_device, grouped=True)
    try:
        yield world
        # No rank tears its connections down while another still uses them: without this, a rank sometimes
        # aborted at exit ("terminate called without an active exception") after finishing its work.
        world.barrier()
    finally:
        dist.destroy_process_group()
