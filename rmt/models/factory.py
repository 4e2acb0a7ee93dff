"""``rmt.create_model``: a registered RMT variant, optionally with weights from a checkpoint."""

from __future__ import annotations

import difflib
import numbers
from typing import Any, Optional

import timm
from timm.models._features import FeatureGetterNet
from timm.models._builder import pretrained_cfg_for_features
from torch import nn

from rmt.errors import CheckpointError, ConfigError, UnknownModelError
from rmt.models.checkpoint import PathLike, load_checkpoint, published_prefers_ema
from rmt.models.config import VARIANTS
from rmt.models.rmt import check_global_pool, feature_kind


def list_models() -> list[str]:
    """The names of the RMT variants (all registered with timm on ``import rmt``)."""
    return list(VARIANTS)


def check_model_name(name: str) -> str:
    """Return ``name`` if it is an RMT variant, else raise UnknownModelError suggesting close names."""
    if not isinstance(name, str):
        raise UnknownModelError(f"a model name is a string such as 'rmt_s', got {name!r}")
    if name in VARIANTS:
        return name
    close = difflib.get_close_matches(name, list(VARIANTS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(VARIANTS)}"
    raise UnknownModelError(f"unknown RMT model '{name}'{hint}")


def create_model(
    name: str,
    *,
    checkpoint: Optional[PathLike] = None,
    pretrained: bool = False,
    ema: Optional[bool] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build an RMT variant.

    Args:
        name: ``rmt_t``, ``rmt_s``, ``rmt_b``, ``rmt_l``, ``rmt_s_tl``, ``rmt_b_tl`` or ``rmt_l_tl``.
        checkpoint: a checkpoint file in any layout the official code writes (or ours); every
            tensor must fit, else CheckpointError says which keys and shapes do not.
        pretrained: load the published weights from the zoo cache (see ``rmt download NAME``).
        ema: which weights of a training checkpoint: None = of a file holding both, those the
            variant's published figures belong to (the zoo entry's choice: plain for rmt_t, EMA
            for the others), else the only ones; True/False = EMA/plain, required.
        **kwargs: timm model arguments (``num_classes``, ``features_only``, ``out_indices``,
            ``attn_kernel``, ``drop_path_rate``, any :class:`RMTConfig` field). With weights, a
            ``num_classes`` other than the file's loads every weight but the classifier's,
            which keeps its initialisation (as timm's pretrained models do).
    """
    check_model_name(name)
    if kwargs.get("features_only") and kwargs.get("out_indices") is not None:
        _check_out_indices(kwargs["out_indices"], len(VARIANTS[name].depths))
    if pretrained and checkpoint is not None:
        raise CheckpointError("give either pretrained=True or checkpoint=PATH, not both")
    if pretrained:
        # the zoo cache's verified file; raises, saying how to get it (Baidu link, code, command), when missing
        from rmt.zoo import pretrained_checkpoint

        checkpoint = pretrained_checkpoint(name)
    if checkpoint is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    # load the whole network strictly, then (for features_only) wrap it as timm would
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    feature_cls = kwargs.pop("feature_cls", None)
    if features_only and feature_kind(feature_cls) != "getter":
        raise ConfigError(
            f"feature_cls={feature_cls!r}: with weights, RMT feature models are timm's 'getter' kind (stage outputs "
            "through forward_intermediates); leave feature_cls out"
        )
    # no head (global_pool=''): the whole network is loaded, then its head removed; a bad
    # combination is refused before the build and the load
    check_global_pool(kwargs.get("global_pool", "avg"), kwargs.get("num_classes", VARIANTS[name].num_classes))
    headless = kwargs.get("global_pool") == ""
    model = timm.create_model(name, pretrained=False, **{**kwargs, "global_pool": "avg"} if headless else kwargs)
    # another number of classes asked for than the file's (a file without classifier included), or
    # a feature model, whose classifier goes: every other tensor, and the classifiers as initialised
    load_checkpoint(model, checkpoint, ema=ema, model_name=name, prefer_ema=published_prefers_ema(name),
                    keep_model_classifier=features_only or kwargs.get("num_classes") is not None)
    if headless:
        model.reset_classifier(model.num_classes, "")
    if not features_only:
        return model
    pretrained_cfg = model.pretrained_cfg
    model = FeatureGetterNet(model, out_indices=out_indices if out_indices is not None else tuple(range(len(model.stages))))
    model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(pretrained_cfg)
    return model


def _check_out_indices(out_indices: Any, stages: int) -> None:
    """timm's feature indices: a count of last stages, or stage indices (negative from the end)."""
    def is_int(value: Any) -> bool:  # numpy's integers too, as timm takes them
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if is_int(out_indices):
        fits = 1 <= out_indices <= stages
    else:
        fits = isinstance(out_indices, (list, tuple)) and all(is_int(i) and -stages <= i < stages for i in out_indices)
    if not fits:
        raise ConfigError(
            f"out_indices={out_indices!r}: give stage indices 0 to {stages - 1} (or -{stages} to -1), "
            f"or a count of last stages 1 to {stages}"
        )
