"""Small layers shared by RMT's blocks and its attention, and the folds of :func:`reparameterize`."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

T = TypeVar("T")


def _folding(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a fold without autograd and outside inference mode, so that a model folded under
    ``torch.inference_mode()`` keeps normal, trainable parameters."""

    @functools.wraps(fn)
    def run_outside_inference_mode(*args: Any, **kwargs: Any) -> T:
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return run_outside_inference_mode


def profiler_label(name: str) -> contextlib.AbstractContextManager:
    """``record_function(name)`` while a profiler records (so profiles, and ``rmt bench``'s
    attention_ops, name the code it wraps), a no-op otherwise: the label costs CPU time on
    every call."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


class DepthwiseConvNHWC(nn.Conv2d):
    """Depthwise conv on (B, H, W, C) tokens (a channels-last view, so no copy either way)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ResidualDepthwiseConvNHWC(DepthwiseConvNHWC):
    """``x + depthwise_conv(x)`` on (B, H, W, C) tokens; the parameters are the conv's alone.

    ``reparameterize()`` folds the identity into the kernel, RepVGG-style: adding the input is a
    1 at the centre tap of each channel's kernel (padding never reaches the centre), so one conv
    computes the sum and the elementwise add over the whole activation is gone.
    """

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__(dim, kernel_size)
        self.identity_folded = False

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if self.identity_folded:
            return out
        # in place on the fresh output (autograd-safe: the conv's backward needs its input, not its output)
        return out.add_(x)

    @_folding
    def reparameterize(self) -> None:
        if not self.identity_folded:
            centre = self.kernel_size[0] // 2
            weight = self.weight.clone()  # keeps the channels-last layout
            weight[:, 0, centre, centre] += 1
            replace_parameter(self, "weight", weight)
            self.identity_folded = True

    def extra_repr(self) -> str:
        return super().extra_repr() + (", identity_folded=True" if self.identity_folded else "")


class AffineFreeLayerNorm(nn.Module):
    """Layer norm over the last dim without scale or shift, in its input's dtype even under autocast.

    What reparameterization leaves once a norm's affine is folded into the linears it feeds.
    CUDA autocast runs layer norm in float32: a bf16 input is copied to float32, normalised
    into a float32 tensor of twice the bytes, and every linear reading it casts it back to
    bf16. With no float32 weights left, the norm can run on the bf16 tensor itself; the kernel
    accumulates in float32 either way (timm's fast_norm and apex's fused layer norm do the same).
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.normalized_shape, self.eps = (dim,), eps

    def forward(self, x: Tensor) -> Tensor:
        # (asking whether autocast is on for a device type without it, "meta" say, is an error)
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return F.layer_norm(x, self.normalized_shape, eps=self.eps)
        return F.layer_norm(x, self.normalized_shape, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


# --- folds: each rewrites a module so that it computes the same function without a neighbour ---
# The layer-norm, bias and scale folds compute in float64 and round once per fold; batch norms
# fold through torch's fuse helpers in the weights' dtype.


@_folding
def fold_layer_norm_affine(norm: nn.LayerNorm, *linears: nn.Linear) -> AffineFreeLayerNorm:
    """Fold ``norm``'s scale and shift into the linears reading its output; returns the plain norm.

    ``linear(norm(x)) == linear'(plain_norm(x))`` with ``W' = W diag(scale)``, ``b' = b + W shift``.
    """
    for linear in linears:
        weight = linear.weight.double()
        if norm.bias is not None:
            add_to_bias(linear, weight @ norm.bias.double())
        if norm.weight is not None:
            replace_parameter(linear, "weight", weight * norm.weight.double())
    return AffineFreeLayerNorm(norm.normalized_shape[-1], norm.eps).train(norm.training)


@_folding
def fold_bias_into_linear(source: nn.Module, linear: nn.Linear) -> None:
    """Move ``source``'s bias into the linear that its output (plus bias-free terms) feeds:
    ``linear(y + b) == linear'(y)`` with ``b' = b_linear + W b``; ``source`` is left without bias."""
    if source.bias is None:
        return
    add_to_bias(linear, linear.weight.double() @ source.bias.double())
    source.bias = None


@_folding
def fold_output_scale(linear: nn.Linear, scale: Tensor) -> None:
    """``scale * linear(x) == linear'(x)``: the per-channel scale (a layer scale) enters W and b."""
    scale = scale.double()
    replace_parameter(linear, "weight", linear.weight.double() * scale[:, None])
    if linear.bias is not None:
        replace_parameter(linear, "bias", linear.bias.double() * scale)


@_folding
def fold_batch_norm(layer: nn.Module, norm: nn.BatchNorm2d) -> nn.Identity:
    """Fold an eval-mode batch norm (its running statistics) into the conv or linear before it;
    returns what takes the norm's place."""
    args = (norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
    if isinstance(layer, nn.Conv2d):
        weight, bias = fuse_conv_bn_weights(layer.weight, layer.bias, *args)
        # the folded weight keeps the conv's memory format (channels-last in RMT)
        layer.weight, layer.bias = weight, bias
    else:
        layer.weight, layer.bias = fuse_linear_bn_weights(layer.weight, layer.bias, *args)
    return identity_like(norm)


def identity_like(module: nn.Module) -> nn.Identity:
    """An identity in ``module``'s train/eval mode, to take the place of a folded module (CPU
    chunking checks every submodule's mode, and other submodules keep theirs)."""
    return nn.Identity().train(module.training)


def add_to_bias(module: nn.Module, delta: Tensor) -> None:
    """``module.bias += delta``, creating the bias if the module has none."""
    bias: Optional[Tensor] = module.bias
    replace_parameter(module, "bias", delta if bias is None else bias.double() + delta, like=module.weight)


def replace_parameter(module: nn.Module, name: str, value: Tensor, like: Optional[Tensor] = None) -> None:
    """Set a new parameter with the old one's dtype and ``requires_grad`` (or ``like``'s).

    New tensors rather than in-place updates: a model copied under ``torch.inference_mode()``
    holds inference tensors, which cannot be updated in place outside it.
    """
    like = getattr(module, name) if like is None else like
    setattr(module, name, nn.Parameter(value.to(like.dtype), requires_grad=like.requires_grad))
