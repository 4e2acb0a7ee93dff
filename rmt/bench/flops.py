"""Counting multiply-adds the way the papers (and fvcore) do, without fvcore.

One multiply-add counts as one FLOP ("GFLOPs" in the RMT and Swin papers are GMACs). Counted:
convolutions and linear layers (weights only, bias excluded), attention matmuls, and the
normalisations as fvcore counts them (layer norm 5 per element, eval-mode batch norm 2 per
element). Softmax, activations and elementwise ops are excluded.

torch's ``FlopCounterMode`` does the dispatch-level bookkeeping. Two gaps are closed here: the CPU
fused attention op (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in torch 2.13
/2.14 and would count 0, and RMT's FlexAttention path has no reliable count, so RMT models are
counted on their reference attention path (plain matmuls, identical numbers).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

# FlopCounterMode reports 2 FLOPs per multiply-add for matmuls and convs; the norm formulas below
# return twice fvcore's count so that halving everything gives fvcore's convention throughout.


def _sdpa_cpu(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _layer_norm(input_shape, normalized_shape, weight_shape=None, *args: Any, **kwargs: Any) -> int:
    return 2 * math.prod(input_shape) * (5 if weight_shape is not None else 4)


def _batch_norm_eval(input_shape, weight_shape=None, *args: Any, **kwargs: Any) -> int:
    return 2 * math.prod(input_shape) * (2 if weight_shape is not None else 1)


_EXTRA_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten.native_layer_norm: _layer_norm,
    aten._native_batch_norm_legit_no_training: _batch_norm_eval,
    aten.native_batch_norm: _batch_norm_eval,
    aten._native_batch_norm_legit: _batch_norm_eval,
}

# aten op -> the category fvcore reports it under
_CATEGORIES = {
    "convolution": "conv",
    "_convolution": "conv",
    "addmm": "linear",
    "mm": "linear",
    "bmm": "matmul",
    "baddbmm": "matmul",
    "_scaled_dot_product_flash_attention_for_cpu": "matmul",
    "_scaled_dot_product_efficient_attention": "matmul",
    "_scaled_dot_product_flash_attention": "matmul",
    "_scaled_dot_product_cudnn_attention": "matmul",
    "native_layer_norm": "layer_norm",
    "native_batch_norm": "batch_norm",
    "_native_batch_norm_legit_no_training": "batch_norm",
    "_native_batch_norm_legit": "batch_norm",
}


@dataclass
class FlopReport:
    """Multiply-adds of one forward pass of one image."""

    model: str
    img_size: tuple[int, int]
    macs: int
    params: int
    by_operator: dict[str, int] = field(default_factory=dict)
    by_module: list[tuple[str, int]] = field(default_factory=list)  # (module path, MACs), depth <= 2

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "img_size": list(self.img_size),
            "gmacs": round(self.gmacs, 6),
            "macs": self.macs,
            "params": self.params,
            "by_operator": self.by_operator,
            "by_module": [{"module": name, "macs": macs} for name, macs in self.by_module],
        }


@contextmanager
def _reference_attention(model: nn.Module) -> Iterator[None]:
    """RMT models count on their plain attention path (same numbers, every matmul visible)."""
    switch = getattr(model, "set_attn_kernel", None)
    before = getattr(model, "attn_kernel", None)
    if switch is None or before is None:
        yield
        return
    switch("reference")
    try:
        yield
    finally:
        switch(before)


def _op_name(op: Any) -> str:
    return str(op).split(".")[1] if str(op).startswith("aten.") else str(op)


def count_flops(
    model: nn.Module,
    img_size: Union[int, Sequence[int]] = 224,
    name: str = "",
    in_chans: int = 3,
) -> FlopReport:
    """Count the multiply-adds of ``model`` on one ``img_size`` image (eval mode, no grad)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, in_chans, h, w, device=device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=3, custom_mapping=_EXTRA_FORMULAS)
    try:
        with _reference_attention(model), torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    model_key = type(model).__name__  # FlopCounterMode names the root module by its class
    by_operator: dict[str, int] = {}
    for op, flops in counts.get("Global", {}).items():
        category = _CATEGORIES.get(_op_name(op), _op_name(op))
        by_operator[category] = by_operator.get(category, 0) + flops // 2
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    by_module = []
    for module, ops in counts.items():
        if module in ("Global", model_key) or not module.startswith(model_key + "."):
            continue
        path = module[len(model_key) + 1 :]
        if path.count(".") <= 1:
            by_module.append((path, sum(ops.values()) // 2))
    return FlopReport(
        model=name or type(model).__name__,
        img_size=(h, w),
        macs=sum(by_operator.values()),
        params=sum(p.numel() for p in model.parameters()),
        by_operator=dict(sorted(by_operator.items(), key=lambda kv: -kv[1])),
        by_module=sorted(by_module, key=lambda item: order.get(item[0], len(order))),
    )
