"""``rmt.zoo.create_model``: any zoo or timm model, with weights from the cache or timm's hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from rmt.errors import CheckpointError, DownloadError, RMTError, WeightsNotCachedError, ZooError, first_line
from rmt.zoo.fetch import how_to_get, weights_path
from rmt.zoo.registry import ZooEntry, get_entry
from rmt.zoo.transfer import TransferOptions, offline, unreachable
from rmt.zoo.verify import check_weights_file, load_state_dict


def create_model(
    name: str, *, pretrained: bool = False, checkpoint: Optional[os.PathLike] = None, **kwargs: Any
) -> nn.Module:
    """Build a zoo model (``rmt_s``, ``swin_t``, ...) or any timm model by its name.

    RMT variants go through :func:`rmt.create_model` (``pretrained=True`` takes the cached
    official file; a missing file raises an error saying how to get it). Other models go through
    ``timm.create_model`` with the zoo's pinned pretrained tag; ``pretrained=True`` takes the file
    in rmt's cache when it is there (verified), else timm's own Hugging Face hub download,
    unless ``RMT_OFFLINE`` is set. ``checkpoint=PATH`` loads a file after checking it fits.
    """
    entry = get_entry(name)
    if entry.is_rmt:
        import rmt

        return rmt.create_model(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    import timm

    if pretrained and checkpoint is not None:
        raise CheckpointError("give either pretrained=True or checkpoint=PATH, not both")
    if pretrained:
        if not entry.weights:
            raise ZooError(f"timm has no pretrained weights for {name}")
        path = weights_path(name)  # its hash matches the file that was checked when it was stored
        if path is None:
            return _from_timm_hub(entry, kwargs)
    elif checkpoint is not None:
        path = Path(checkpoint)
        check_weights_file(entry, path)
    else:
        return timm.create_model(entry.timm_name, pretrained=False, **kwargs)
    # timm's loader applies the model's checkpoint filter and adapts the classifier / in_chans
    state_dict = load_state_dict(entry, path)
    return timm.create_model(entry.timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict}, **kwargs)


_FOLD_METHODS = ("fuse", "reparameterize", "switch_to_deploy")  # what timm's reparameterize_model calls


def has_folds(model: nn.Module) -> bool:
    """Whether :func:`fold_for_inference` would fold anything in ``model``."""
    return any(hasattr(m, method) for m in model.modules() if m is not model for method in _FOLD_METHODS)


def fold_for_inference(model: nn.Module, name: str = "the model") -> bool:
    """Fold ``model`` (called ``name`` in errors) for inference in place, as
    ``timm.utils.reparameterize_model`` does: RMT's norms, batch norms, conv biases, layer scales
    and depthwise-conv residuals (the same outputs within float32 rounding, docs/models.md), the
    RepVGG-style branches of timm models. Returns whether it had anything to fold; a timm
    model's own fold that fails raises RMTError."""
    from timm.utils import reparameterize_model

    foldable = has_folds(model)
    try:
        with torch.inference_mode(False):  # folded parameters stay normal tensors
            reparameterize_model(model, inplace=True)
    except RMTError:
        raise
    except Exception as e:  # a timm model's own fold
        raise RMTError(f"cannot fold {name} for inference: {first_line(e)}") from None
    return foldable


def _from_timm_hub(entry: ZooEntry, kwargs: dict) -> nn.Module:
    import timm
    from huggingface_hub.errors import HfHubHTTPError

    how = how_to_get(entry)
    if offline():
        raise WeightsNotCachedError(f"RMT_OFFLINE is set and {entry.name}'s weights are not in rmt's cache: {how['message']}", how)
    # huggingface_hub retries a host it cannot reach for about a minute: ask first
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    problem = unreachable(endpoint, TransferOptions.from_env().timeout_s)
    if problem:
        hub_file = _hub_cache_file(entry, kwargs.get("cache_dir"))  # a copy in Hugging Face's own cache still serves offline
        if hub_file is None:
            raise DownloadError(f"timm could not fetch the weights of {entry.name} ({problem}); {how['message']}")
        return timm.create_model(
            entry.timm_name, pretrained=True, pretrained_cfg_overlay={"state_dict": load_state_dict(entry, hub_file)}, **kwargs
        )
    try:
        return timm.create_model(entry.timm_name, pretrained=True, **kwargs)
    except (OSError, HfHubHTTPError) as e:
        raise DownloadError(f"timm could not fetch the weights of {entry.name} ({first_line(e)}); {how['message']}") from None


def _hub_cache_file(entry: ZooEntry, cache_dir: Optional[os.PathLike] = None) -> Optional[Path]:
    """The entry's file in Hugging Face's hub cache (or timm's ``cache_dir``), where timm keeps what it downloaded, if there."""
    from huggingface_hub import try_to_load_from_cache

    weights = entry.weights
    if weights.get("source") != "hf-hub":
        return None
    found = try_to_load_from_cache(weights["hf_hub_id"], weights["filename"], cache_dir=cache_dir)
    return Path(found) if isinstance(found, str) else None
