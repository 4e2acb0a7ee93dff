"""Small layers shared by RMT's blocks and its attention, and the folds of :func:`reparameterize`."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights


class DepthwiseConvNHWC(nn.Conv2d):
    """Depthwise conv on (B, H, W, C) tokens (a channels-last view, so no copy either way)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")


class AffineFreeLayerNorm(nn.Module):
    """Layer norm over the last dim without scale or shift, in its input's dtype even under autocast.

    What reparameterization leaves once a norm's affine is folded into the linears it feeds.
    CUDA autocast runs layer norm in float32: a bf16 input is copied to float32, normalised
    into a float32 tensor of twice the bytes, and every linear reading it casts it back to
    bf16. With no float32 weights left, the norm can run on the bf16 tensor itself; the kernel
    accumulates in float32 either way (timm's fast_norm and apex's fused layer norm do the same).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.normalized_shape, self.eps = (dim,), eps

    def forward(self, x: Tensor) -> Tensor:
        # (asking about autocast on a device type without it, "meta" say, is an error)
        if x.device.type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, eps=self.eps)
        return F.layer_norm(x, self.normalized_shape, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


# --- folds: each rewrites a module so that it computes the same function without a neighbour ---
# (the sums are formed in float64 so that a fold adds no error beyond the final rounding)


@torch.no_grad()
def fold_layer_norm_affine(norm: nn.LayerNorm, *linears: nn.Linear) -> AffineFreeLayerNorm:
    """Fold ``norm``'s scale and shift into the linears reading its output; returns the plain norm.

    ``linear(norm(x)) == linear'(plain_norm(x))`` with ``W' = W diag(scale)``, ``b' = b + W shift``.
    """
    for linear in linears:
        weight = linear.weight.double()
        if norm.bias is not None:
            add_to_bias(linear, weight @ norm.bias.double())
        if norm.weight is not None:
            linear.weight.copy_(weight * norm.weight.double())
    return AffineFreeLayerNorm(norm.normalized_shape[-1], norm.eps)


@torch.no_grad()
def fold_bias_into_linear(source: nn.Module, linear: nn.Linear) -> None:
    """Move ``source``'s bias into the linear that its output (plus bias-free terms) feeds:
    ``linear(y + b) == linear'(y)`` with ``b' = b_linear + W b``; ``source`` is left without bias."""
    if source.bias is None:
        return
    add_to_bias(linear, linear.weight.double() @ source.bias.double())
    source.bias = None


@torch.no_grad()
def fold_output_scale(linear: nn.Linear, scale: Tensor) -> None:
    """``scale * linear(x) == linear'(x)``: the per-channel scale (a layer scale) enters W and b."""
    scale = scale.double()
    linear.weight.copy_(linear.weight.double() * scale[:, None])
    if linear.bias is not None:
        linear.bias.copy_(linear.bias.double() * scale)


@torch.no_grad()
def fold_batch_norm(layer: nn.Module, norm: nn.BatchNorm2d) -> None:
    """Fold an eval-mode batch norm (its running statistics) into the conv or linear before it."""
    args = (norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
    if isinstance(layer, nn.Conv2d):
        weight, bias = fuse_conv_bn_weights(layer.weight, layer.bias, *args)
        # the folded weight keeps the conv's memory format (channels-last in RMT)
        layer.weight, layer.bias = weight, bias
    else:
        layer.weight, layer.bias = fuse_linear_bn_weights(layer.weight, layer.bias, *args)


def add_to_bias(module: nn.Module, delta: Tensor) -> None:
    """``module.bias += delta``, creating the bias if the module has none."""
    bias: Optional[Tensor] = module.bias
    if bias is None:
        module.bias = nn.Parameter(delta.to(module.weight.dtype), requires_grad=module.weight.requires_grad)
    else:
        bias.copy_(bias.double() + delta)
