"""torchrun support: process-group setup from the environment, exact sharding, all-reduced totals.

Every rank evaluates the indices ``rank::world_size`` of the data set: the shards are disjoint,
cover every image once and are never padded (DistributedSampler pads the last shard with repeated
images, which is why the official distributed evaluation scores 50,016 images instead of 50,000).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from rmt.errors import ConfigError, EvalError, RMTError, first_line

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly one-process) evaluation."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes results (rank 0)."""
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1


def context_from_env() -> DistributedContext:
    """The rank and world of this process as torchrun (or any env:// launcher) describes them."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    except ValueError as e:
        raise ConfigError(f"bad torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK): {e}") from None
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank < max(local_world_size, 1):
        raise ConfigError(f"bad torchrun environment: RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world_size}")
    return DistributedContext(rank, world_size, local_rank, max(local_world_size, 1))


def resolve_device(device: str, context: DistributedContext) -> torch.device:
    """``auto`` = CUDA when available, else CPU; under torchrun each rank takes GPU ``LOCAL_RANK``."""
    if device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device must be auto, cuda or cpu, got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no CUDA device (use --device cpu or auto)")
    if context.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK {context.local_rank} has no GPU: this node has {torch.cuda.device_count()} "
            f"(start at most that many processes per node)"
        )
    return torch.device("cuda", context.local_rank)


@contextmanager
def process_group(context: DistributedContext, device: torch.device) -> Iterator[DistributedContext]:
    """Join the torchrun process group for the duration (NCCL on CUDA, gloo on CPU); one process: nothing."""
    if not context.initialized or dist.is_initialized():
        yield context
        return
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    except (ValueError, RuntimeError) as e:  # no MASTER_ADDR/MASTER_PORT, a store that cannot be reached
        raise ConfigError(f"cannot join the torchrun process group ({first_line(e)}): start with torchrun") from None
    try:
        yield context
    finally:
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of a data set: disjoint shards, no padding."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def all_reduce_sum(values: Sequence[int], device: torch.device) -> list[int]:
    """Sum integer totals over all ranks (the values themselves when not distributed)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_max(value: float, device: torch.device) -> float:
    """The largest value over all ranks (the slowest rank's time is the evaluation's time)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def raise_if_any_rank_failed(failure: Optional[BaseException], context: DistributedContext, device: torch.device) -> None:
    """Raise on every rank when any rank failed this step, so that none is left waiting in a collective.

    Every rank must call it at the same points. The rank that failed raises its own exception;
    the others raise the first failing rank's: an RMTError with its class and message, so that
    every rank prints the same line and exits with the same code; any other error as an EvalError
    naming that rank.
    """
    if not dist.is_initialized():
        if failure is not None:
            raise failure
        return
    flag = torch.tensor([context.rank if failure is not None else context.world_size], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    first = int(flag.item())
    if first == context.world_size:
        return
    # only the first failing rank's error is sent: every rank takes part in this gather too
    errors: list[Optional[tuple[type, str]]] = [None] * context.world_size
    mine = (type(failure), first_line(failure)) if failure is not None else None
    dist.all_gather_object(errors, mine)
    if failure is not None:
        raise failure
    kind, message = errors[first]
    if issubclass(kind, RMTError):
        try:
            error = kind(message)
        except TypeError:  # a subclass taking more than a message
            error = RMTError(message)
        raise error
    raise EvalError(f"rank {first} failed: {message}")


def gather_lists(items: list[T]) -> list[T]:
    """Concatenate every rank's list in rank order (the list itself when not distributed)."""
    if not dist.is_initialized():
        return list(items)
    gathered: list[list[T]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
