"""``rmt eval`` as a function: a zoo model on an ImageNet validation folder, one or many ranks."""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import timm
import torch

import rmt
from rmt.data.imagenet import EvalImageDataset, ImageNetVal, scan_imagenet_val
from rmt.data.labels import PathLike, read_real_labels, real_label_sets
from rmt.data.transforms import build_eval_transform
from rmt.errors import ConfigError, EvalError
from rmt.io import check_not_an_input, same_file
from rmt.eval.distributed import context_from_env, process_group, resolve_device
from rmt.eval.loop import AMP_DTYPES, EvalCounts, Progress, default_workers, evaluate


RANDOM_WEIGHTS_SEED = 0


@dataclass
class EvalReport:
    """The result of one evaluation, as printed and as written to JSON (percentages are 0-100)."""

    model: str
    counts: EvalCounts
    layout: str
    layout_description: str
    data: str
    labels_file: Optional[str]
    weights: str  # "cache", "checkpoint" or "random"
    checkpoint: Optional[str]
    published_top1: Optional[float]
    batch_size: int
    amp: str
    channels_last: bool
    device: str
    world_size: int
    is_main: bool  # rank 0: the process that prints and writes
    real_labels: bool = False  # whether ReaL top-1 was asked for
    reparameterized: bool = False  # folded for inference (rmt.zoo.fold_for_inference) before the evaluation
    skipped_files: list[str] = field(default_factory=list)  # the unreadable images skipped, as counts.skipped lists them

    @property
    def top1_delta(self) -> Optional[float]:
        """top-1 minus the zoo's published top-1, in percentage points."""
        return None if self.published_top1 is None else self.counts.top1 - self.published_top1

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "model": self.model,
            "top1": c.top1,
            "top5": c.top5,
            "real_top1": c.real_top1 if self.real_labels else None,
            "real_images": c.real_images if self.real_labels else None,
            "images": c.images,
            "skipped": len(c.skipped),
            "skipped_files": self.skipped_files,
            "skipped_errors": c.skipped,
            "seconds": c.seconds,
            "images_per_second": c.images / c.seconds if c.seconds else None,
            "layout": self.layout,
            "layout_description": self.layout_description,
            "data": self.data,
            "labels_file": self.labels_file,
            "weights": self.weights,
            "checkpoint": self.checkpoint,
            "published_top1": self.published_top1,
            "top1_delta": self.top1_delta,
            "batch_size": self.batch_size,
            "amp": self.amp,
            "channels_last": self.channels_last,
            "reparameterized": self.reparameterized,
            "env": {
                "device": self.device,
                "world_size": self.world_size,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "rmt": rmt.__version__,
                "python": platform.python_version(),
            },
        }


def run_imagenet_eval(
    model: str,
    data: PathLike,
    *,
    labels: Optional[PathLike] = None,
    checkpoint: Optional[PathLike] = None,
    random_weights: bool = False,
    batch_size: int = 128,
    workers: Optional[int] = None,
    device: str = "auto",
    amp: str = "none",
    channels_last: bool = False,
    reparameterize: bool = False,
    limit: Optional[int] = None,
    real_labels: Union[bool, PathLike] = False,
    skip_bad: bool = False,
    report_path: Optional[PathLike] = None,
    progress: Optional[Callable[[Progress], None]] = None,
    on_message: Optional[Callable[[str], None]] = None,
) -> EvalReport:
    """Evaluate a zoo (or timm) model on an ImageNet validation folder.

    Weights come from the zoo cache, from ``checkpoint``, or, only with ``random_weights=True``, from
    nowhere. The preprocessing is the zoo entry's. Under torchrun each rank scores its own shard and
    every rank returns the same totals; ``progress`` and ``on_message`` are called on rank 0 only.
    ``real_labels``: True for timm's ImageNet-ReaL labels, or the path of a ReaL JSON file.
    ``report_path``: where the caller will write the report; refused before the model is built
    if it is one of the files the evaluation reads (checkpoint, labels, ReaL labels, an image).
    ``reparameterize``: fold the model for inference first (:func:`rmt.zoo.fold_for_inference`;
    for RMT the same logits within float32 rounding, and faster, most on the CPU).
    """
    from rmt.zoo import create_model, fold_for_inference, get_entry

    entry = get_entry(model)
    if random_weights and checkpoint is not None:
        raise ConfigError("give either a checkpoint or --random-weights, not both")
    if amp not in AMP_DTYPES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    context = context_from_env()
    notify = on_message if (on_message is not None and context.is_main) else (lambda message: None)
    target_device = resolve_device(device, context)

    # absolute: the report's paths (skipped files, their errors, the layout) must outlive the working directory
    val = scan_imagenet_val(Path(data).resolve(), labels).head(limit)
    if report_path is not None:
        _check_report_path(report_path, val, checkpoint, real_labels)
    real_sets = None
    if real_labels is not None and real_labels is not False:  # (None: not asked for either)
        real_sets = real_label_sets(val.stems, read_real_labels(None if real_labels is True else real_labels))
    preprocessing = entry.preprocessing
    dataset = EvalImageDataset(val.paths, val.targets, build_eval_transform(preprocessing), tuple(preprocessing["input_size"]))

    if checkpoint is not None:
        network, weights = create_model(model, checkpoint=checkpoint), "checkpoint"
    elif random_weights:
        # the same seed on every rank: one model, and the same numbers on every run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            network, weights = create_model(model), "random"
        notify("random weights: this accuracy says nothing about the published model")
    else:
        network, weights = create_model(model, pretrained=True), "cache"
    folded = reparameterize and fold_for_inference(network, model)
    if reparameterize and not folded:
        notify(f"{model} has nothing to fold for inference: evaluated as built")
    notify(f"{len(val):,} images, layout: {val.description}")

    if workers is None:
        workers = default_workers(context.local_world_size)
    with process_group(context, target_device):
        counts = evaluate(
            network,
            dataset,
            batch_size=batch_size,
            workers=workers,
            device=target_device,
            amp=amp,
            channels_last=channels_last,
            real_labels=real_sets,
            skip_bad=skip_bad,
            context=context,
            progress=progress if context.is_main else None,
            on_message=notify,
        )
    return EvalReport(
        model=model,
        counts=counts,
        layout=val.layout,
        layout_description=val.description,
        data=str(Path(data).resolve()),
        labels_file=str(val.labels_file.resolve()) if val.labels_file else None,
        weights=weights,
        checkpoint=str(Path(checkpoint).resolve()) if checkpoint is not None else None,
        published_top1=entry.published_top1,
        batch_size=batch_size,
        amp=amp,
        channels_last=channels_last,
        device=_device_name(target_device),
        world_size=context.world_size,
        is_main=context.is_main,
        real_labels=real_sets is not None,
        reparameterized=folded,
        skipped_files=[str(val.paths[i]) for i in counts.skipped_positions],
    )


def _check_report_path(path: PathLike, val: ImageNetVal, checkpoint: Optional[PathLike],
                       real_labels: Union[bool, PathLike, None]) -> None:
    real_file = None if isinstance(real_labels, bool) else real_labels
    check_not_an_input(path, "the report path", {"checkpoint": checkpoint, "labels": val.labels_file, "ReaL labels": real_file})
    name = os.path.basename(path)  # only an image of the report's name is looked at: not every one of 50,000
    if any(os.path.basename(image) == name and same_file(image, path) for image in val.paths):
        raise EvalError(f"the report path {path} is one of the validation images: write it elsewhere")


def check_top1_gate(expected: float, tolerance: float) -> None:
    """Raise a one-line ConfigError unless ``expected`` is a top-1 (0 to 100) and ``tolerance`` a number >= 0:
    before an evaluation, not after it."""
    if not 0 <= expected <= 100:  # NaN fails too
        raise ConfigError(f"the expected top-1 must be a percentage from 0 to 100, got {expected}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"tolerance must be a number at least 0, got {tolerance}")


def top1_gate(top1: float, expected: float, tolerance: float) -> Optional[str]:
    """None when ``top1`` is within ``tolerance`` points of ``expected``, else the one-line reason it is not."""
    check_top1_gate(expected, tolerance)
    miss = top1 - expected
    if abs(miss) <= tolerance + 1e-9:  # 82.4 - 82.3 is 0.10000000000000853 in floating point
        return None
    return f"top-1 {top1:.3f} misses the expected {expected:.3f} by {miss:+.3f} points (tolerance {tolerance:g})"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"
