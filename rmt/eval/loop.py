"""The evaluation loop: top-1 / top-5 / ReaL counts of a classifier over a data set, on one or many ranks."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from rmt.data.imagenet import EvalImageDataset
from rmt.data.labels import NUM_CLASSES
from rmt.errors import ConfigError, DatasetError, EvalError, is_out_of_memory
from rmt.eval.distributed import (
    DistributedContext, ShardSampler, all_reduce_max, all_reduce_sum, gather_lists, raise_if_any_rank_failed,
)

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Progress:
    """This rank's running totals, passed to the progress callback after every batch."""

    images: int
    total: int
    top1_correct: int
    seconds: float


@dataclass
class EvalCounts:
    """Totals over all ranks. Percentages are over ``images``; ReaL top-1 over ``real_images``."""

    images: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    real_images: int = 0
    real_top1_correct: int = 0
    skipped: list[str] = field(default_factory=list)  # why each unreadable image was skipped
    skipped_positions: list[int] = field(default_factory=list)  # their positions in the dataset, in the same order
    seconds: float = 0.0

    @property
    def top1(self) -> float:
        return 100.0 * self.top1_correct / self.images if self.images else 0.0

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_correct / self.images if self.images else 0.0

    @property
    def real_top1(self) -> Optional[float]:
        return 100.0 * self.real_top1_correct / self.real_images if self.real_images else None


def default_workers(processes_per_node: int = 1) -> int:
    """DataLoader workers per process: this node's CPUs shared by its processes, one left for the
    process itself, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(processes_per_node, 1) - 1))


def evaluate(
    model: nn.Module,
    dataset: EvalImageDataset,
    *,
    batch_size: int = 128,
    workers: Optional[int] = None,
    device: torch.device = torch.device("cpu"),
    amp: str = "none",
    channels_last: bool = False,
    real_labels: Optional[Sequence[frozenset[int]]] = None,
    skip_bad: bool = False,
    context: DistributedContext = DistributedContext(),
    progress: Optional[Callable[[Progress], None]] = None,
    on_message: Optional[Callable[[str], None]] = None,
) -> EvalCounts:
    """Score ``model`` on this rank's shard of ``dataset`` and return the totals of all ranks.

    Args:
        model: a 1000-class classifier (moved to ``device`` and put in eval mode here).
        dataset: yields (image, class index, position, error text) as EvalImageDataset does.
        batch_size: images per forward pass; on CUDA out-of-memory it is halved until it fits.
        workers: DataLoader workers; None: :func:`default_workers` for this node's processes.
        amp: ``none``, ``bf16`` or ``fp16`` autocast; logits are compared in float32.
        real_labels: the ReaL classes of every image of ``dataset`` (by position) to count ReaL top-1.
        skip_bad: skip unreadable images (listed in ``skipped``) instead of raising DatasetError.
        context: this process's rank; the shard is ``rank::world_size``, totals are all-reduced.
        progress, on_message: called on this rank after every batch and for notices (OOM retries).
    """
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    if workers is None:
        workers = default_workers(context.local_world_size)
    if batch_size < 1 or workers < 0:
        raise ConfigError(f"batch size must be at least 1 and workers at least 0, got {batch_size} and {workers}")
    if real_labels is not None and len(real_labels) != len(dataset):
        raise ConfigError(f"{len(real_labels)} ReaL label sets for {len(dataset)} images")
    notify = on_message or (lambda message: None)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device).eval()
    if channels_last:  # otherwise keep the model's own layout (RMT's convs are channels-last already)
        model = model.to(memory_format=memory_format)
    sampler = ShardSampler(len(dataset), context.rank, context.world_size)
    largest_shard = len(ShardSampler(len(dataset), 0, context.world_size))  # rank 0's
    # a batch beyond the largest shard is that shard (and the DataLoader's slicing takes no more
    # than sys.maxsize)
    batch_size = min(batch_size, max(1, largest_shard))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    autocast = (
        torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if AMP_DTYPES[amp] is not None else contextlib.nullcontext()
    )
    forward = _BatchHalvingForward(model, batch_size, device, notify)
    counts = [0, 0, 0, 0, 0]  # images, top-1, top-5, ReaL images, ReaL top-1
    skipped: list[str] = []
    skipped_positions: list[int] = []
    start = time.perf_counter()
    batches = iter(loader)
    # every rank takes the same number of steps (a shorter shard's last ones are empty), so that
    # after each step they can agree on whether one of them failed
    steps = -(-largest_shard // batch_size)
    with torch.inference_mode():
        for _ in range(steps):
            failure = None
            try:
                batch = next(batches, None)
                if batch is not None:
                    images, targets, positions, errors = batch
                    readable = torch.tensor([not e for e in errors], dtype=torch.bool)
                    if not readable.all():
                        bad = [e for e in errors if e]
                        if not skip_bad:
                            raise DatasetError(f"{bad[0]} (--skip-bad skips unreadable images)")
                        skipped += bad
                        skipped_positions += positions[~readable].tolist()
                        images, targets, positions = images[readable], targets[readable], positions[readable]
                    if len(images):
                        images = images.to(device, non_blocking=True, memory_format=memory_format)
                        with autocast:
                            logits = forward(images)
                        _count(logits.float().cpu(), targets, positions, real_labels, counts)
            except Exception as e:
                failure = e
            raise_if_any_rank_failed(failure, context, device)
            if progress is not None:
                progress(Progress(counts[0] + len(skipped), len(sampler), counts[1], time.perf_counter() - start))
    seconds = all_reduce_max(time.perf_counter() - start, device)
    totals = all_reduce_sum(counts, device)
    result = EvalCounts(*totals, skipped=gather_lists(skipped), skipped_positions=gather_lists(skipped_positions),
                        seconds=seconds)
    if not result.images:  # every rank sees the same totals: all of them stop here
        raise DatasetError(f"none of the {len(result.skipped)} images could be read: there is no accuracy to report"
                           if result.skipped else "no images to evaluate")
    return result


def _count(
    logits: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor,
    real_labels: Optional[Sequence[frozenset[int]]],
    counts: list[int],
) -> None:
    if logits.ndim != 2 or logits.shape[1] != NUM_CLASSES:
        raise EvalError(f"the model outputs shape {tuple(logits.shape)}; ImageNet-1k evaluation needs (batch, {NUM_CLASSES}) logits")
    top5 = logits.topk(5, dim=1).indices
    hits = top5 == targets.unsqueeze(1)
    counts[0] += len(targets)
    counts[1] += int(hits[:, 0].sum())
    counts[2] += int(hits.any(dim=1).sum())
    if real_labels is not None:
        for position, prediction in zip(positions.tolist(), top5[:, 0].tolist()):
            valid = real_labels[position]
            if valid:  # images with no ReaL label are left out of ReaL accuracy, as in the paper
                counts[3] += 1
                counts[4] += prediction in valid


class _BatchHalvingForward:
    """Forward passes in chunks of at most ``batch_size``; on CUDA out-of-memory, halve and retry."""

    def __init__(self, model: nn.Module, batch_size: int, device: torch.device, notify: Callable[[str], None]) -> None:
        self.model, self.batch_size, self.device, self.notify = model, batch_size, device, notify

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        start = 0
        while start < len(images):
            size = min(self.batch_size, len(images) - start)
            try:
                outputs.append(self.model(images[start : start + size]))
            except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
                if not is_out_of_memory(e):
                    raise
                out_of_memory = True
            else:
                out_of_memory = False
                start += size
            # outside the except block, so the failed pass's tensors are freed before retrying
            if out_of_memory:
                if size == 1:
                    raise EvalError("out of memory with a batch of one image: use a smaller model, --amp bf16 or another device")
                self.batch_size = size // 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.notify(f"out of memory at batch size {size}; retrying with batch size {self.batch_size}")
        return torch.cat(outputs)
