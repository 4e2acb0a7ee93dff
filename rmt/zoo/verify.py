"""Is this file really a checkpoint of that model? Keys, shapes and parameter count, read safely.

RMT files are checked against the official state dict of the variant (or our own layout), built
on the meta device, so no network is built and no weight is copied. Files of timm models are
checked against the timm model's state dict (also on the meta device); a file in another layout
(e.g. an original Swin release) is accepted when timm's own checkpoint filter converts it into
one that loads strictly.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from rmt.errors import CheckpointError
from rmt.models.checkpoint import check_fits, check_variant_state_dict, is_safetensors, read_checkpoint, select_state_dict
from rmt.zoo.registry import ZooEntry


@dataclass(frozen=True)
class CheckedFile:
    """What the check found: the parameter count and which state dict in the file was used."""

    params: int
    state_dict: str  # model_ema, model, state_dict_ema, state_dict, or "" for a bare state dict
    layout: str  # official, rmt, timm, or timm-converted


def prefers_ema(entry: ZooEntry) -> bool:
    """``prefer_ema`` for :func:`select_state_dict`: whether, of a file holding both, the entry's
    published model is the EMA one (``model_ema`` entries) or the plain one (``model``)."""
    return entry.weights.get("state_dict") != "model"


def check_weights_file(entry: ZooEntry, path: Path) -> CheckedFile:
    """Raise a one-line CheckpointError unless ``path`` holds ``entry``'s architecture exactly."""
    if entry.is_rmt:
        return _check_rmt(entry, path)
    return _check_timm(entry, path)


def _check_rmt(entry: ZooEntry, path: Path) -> CheckedFile:
    state, where = select_state_dict(read_checkpoint(path), prefer_ema=prefers_ema(entry))
    layout, params = check_variant_state_dict(state, entry.name)
    return CheckedFile(params, where, layout)


@functools.lru_cache(maxsize=8)
def _timm_model_on_meta(timm_name: str) -> tuple[dict[str, tuple], int]:
    import timm

    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, sum(p.numel() for p in model.parameters())


def _check_timm(entry: ZooEntry, path: Path) -> CheckedFile:
    expected, params = _timm_model_on_meta(entry.timm_name)
    if is_safetensors(path):
        shapes, where = safetensors_shapes(path), ""
        state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    else:
        state, where = select_state_dict(read_checkpoint(path), None)
    try:
        check_fits(state, expected, entry.timm_name)
        return CheckedFile(params, where, "timm")
    except CheckpointError as direct:
        # another layout of the same weights: let timm's own filter (what timm applies to its
        # pretrained files) convert it; it fits if the result loads strictly
        if not _loads_through_timm_filter(entry, path, state):
            raise direct from None
        return CheckedFile(params, where, "timm-converted")


def _loads_through_timm_filter(entry: ZooEntry, path: Path, state: Mapping[str, Tensor]) -> bool:
    import timm

    if any(t.is_meta for t in state.values()):
        state = load_state_dict(entry, path)
    try:
        timm.create_model(entry.timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(state)})
    except Exception:
        # any failure inside timm's conversion (each model has its own filter, which may fail in
        # any way on another model's keys) or strict load means: not this architecture
        return False
    return True


def load_state_dict(entry: ZooEntry, path: Path) -> dict[str, Tensor]:
    """The state dict of a weights file of a timm model (safetensors or torch.save), read without running code."""
    state, _ = select_state_dict(read_checkpoint(path), prefer_ema=prefers_ema(entry))
    return state


def safetensors_shapes(path: Path) -> dict[str, tuple]:
    """Keys and shapes of a safetensors file, from its header alone (checked against the file size)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt): {e}") from None
