"""Small layers shared by RMT's blocks and its attention, and the folds of :func:`reparameterize`."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, TypeVar

import torch
import torch.nn.functional as F
from timm.layers._fx import register_notrace_module
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from rmt.models import depthwise_conv
from rmt.models.kernel_calls import nothing_watches

T = TypeVar("T")


def _folding(fn: Callable[..., T]) -> Callable[..., T]:
    """Run a fold without autograd and outside inference mode, so that a model folded under
    ``torch.inference_mode()`` keeps normal, trainable parameters."""

    @functools.wraps(fn)
    def run_outside_inference_mode(*args: Any, **kwargs: Any) -> T:
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return run_outside_inference_mode


def exporting() -> bool:
    """Whether ``torch.export`` is tracing the code.

    Reads the flag that ``torch.compiler.is_exporting()`` returns, as dynamo itself does since
    torch 2.14: before, dynamo replaced the call with ``True`` under ``torch.compile`` too
    (pytorch/pytorch#176347), and compiled CPU inference lost its chunking and fused operator.
    Strict and non-strict export both set the flag."""
    return torch.compiler._is_exporting_flag


def registered_weights(module: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """``(module.weight, module.bias)``, read from the module's parameters where they are
    registered there: ``nn.Module.__getattr__``, which ``module.weight`` goes through, costs
    about half a microsecond of CPU time a lookup, on every layer's every call, and eager CUDA
    inference at batch 64 is bound by CPU time. A weight that is not a registered parameter (a
    parametrization's property, an attribute that a hook sets) is read as ``module.weight``."""
    params = module._parameters
    weight = params["weight"] if "weight" in params else module.weight
    bias = params["bias"] if "bias" in params else module.bias
    return weight, bias


class DepthwiseConvNHWC(nn.Conv2d):
    """Depthwise conv on (B, H, W, C) tokens (a channels-last view, so no copy either way)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        # nn.Conv2d.forward's body with the weights of _forward_weights, which the caching class's
        # _conv_forward would otherwise look up again
        weight, bias = self._forward_weights()
        if depthwise_conv.ENABLED:
            dtype = depthwise_conv.kernel_dtype(self, x, weight, bias)
            if dtype is not None:
                return depthwise_conv.run_unchecked(x, weight, bias, dtype)
        return nn.Conv2d._conv_forward(self, x.permute(0, 3, 1, 2), weight, bias).permute(0, 2, 3, 1)

    def _forward_weights(self) -> tuple[Tensor, Optional[Tensor]]:
        """The weight and bias a forward pass computes with (the caching class's autocast copies)."""
        return registered_weights(self)


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


def _stamp(t: Optional[Tensor]) -> Optional[tuple]:
    """What a cached copy of ``t`` was made from: the tensor itself, its in-place version and its
    data (address, dtype, shape, strides). An optimizer step or ``load_state_dict`` moves the
    version; a new parameter, or ``.data = ...``, changes the object or the data."""
    if t is None:
        return None
    return (t, t._version, t.data_ptr(), t.dtype, t.shape, t.stride())


def _unchanged(t: Optional[Tensor], stamp: Optional[tuple]) -> bool:
    """Whether ``t`` is the tensor ``stamp`` was taken of, with the same version and data."""
    if t is None or stamp is None:
        return t is None and stamp is None
    # the object, then its data: the same object with the same data passed the guards when its
    # copy was made (torch.utils.swap_tensors keeps the object but brings other data, maybe an
    # inference tensor, which has no version to ask for)
    return (
        t is stamp[0] and t.data_ptr() == stamp[2] and t.dtype == stamp[3] and t.shape == stamp[4]
        and t.stride() == stamp[5] and t._version == stamp[1]
    )


class _AutocastCopies(NamedTuple):
    """One layer's cached autocast-dtype parameters and what they were made from."""

    device: str  # the parameters' device type
    index: Optional[int]  # and CUDA device index
    dtype: torch.dtype  # autocast's dtype
    stream: Optional[int]  # the raw CUDA stream the copies were made on
    # _stamp(weight), _stamp(bias): they hold the sources' tensors, and the storages through
    # their detached views, so that no new tensor takes their ids or addresses
    stamps: tuple
    storages: tuple
    weight: Tensor
    bias: Optional[Tensor]


class AutocastWeightCache:
    """For a layer with ``weight`` and ``bias``, folded for inference: under autocast without
    autograd, the autocast-dtype copies of both are kept from one forward pass to the next.

    Autocast casts every float32 weight and bias again on each forward pass, because its own
    cache lasts only one ``autocast`` region. For folded rmt_s in bf16 that is 424 of the 1,016
    operators in a forward pass (``scripts/op_counts.py``). On CUDA each is a kernel launch, and
    eager inference at batch 64 is bound by launches. The copies are the casts autocast makes, so
    outputs are bitwise the same. A copy is made again when its parameter changes:
    - an in-place update through autograd's view of it (an optimizer step, ``load_state_dict``,
      ``torch.no_grad()`` updates);
    - a new parameter, or ``.data = ...``;
    - ``.to()``, ``.train()`` or ``.eval()``, and any pass with autograd recording, which drop
      the copies (fused optimizers update parameters without a version bump, after such a pass).
    On CUDA each stream gets its own copy, made on that stream.

    An in-place change made through ``.data`` goes unseen, because autograd counts no version for
    it. That is why the cache is opt-in: :func:`keep_autocast_weights` turns a layer into its
    caching class when the model is folded. The cache is not used:
    - with autograd recording;
    - under ``torch.compile`` or ``torch.jit.trace``;
    - for inference tensors (parameters made under ``torch.inference_mode()``), which have no
      version, and for ``torch.func`` transforms' wrapped tensors (``vmap`` over parameters);
    - with autocast's cache turned off (``torch.autocast(..., cache_enabled=False)``, the switch to
      compare without it);
    - on devices other than CPU and CUDA, whose autocast op lists were not checked.
    A CUDA graph captured around the eager model reads the copies as they were at capture.
    """

    _autocast_copies: Optional[_AutocastCopies] = None

    def autocast_parameters(self) -> tuple[Tensor, Optional[Tensor]]:
        """``(weight, bias)`` as this forward pass should use them: cached autocast-dtype copies
        in autocast inference, the parameters themselves otherwise."""
        return self._for_this_pass(*registered_weights(self))

    def _for_this_pass(self, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """:meth:`autocast_parameters` given the parameters already looked up."""
        if torch.compiler.is_compiling():  # a compiled graph makes its own casts, and never reads the cache
            return weight, bias
        if torch.is_grad_enabled():
            # a training pass: fused optimizers (fused=True) update parameters without a version
            # bump, and every step follows such a pass, so the copies go now
            self._autocast_copies = None
            return weight, bias
        # every layer asks on every pass, and eager CUDA inference at batch 64 is bound by CPU
        # time: the checks of a hit are the few that can change between passes
        copies = self._autocast_copies
        if (
            copies is not None and torch.is_autocast_enabled(copies.device) and torch.is_autocast_cache_enabled()
            and torch.get_autocast_dtype(copies.device) == copies.dtype and not torch.jit.is_tracing()
            and _unchanged(weight, copies.stamps[0]) and _unchanged(bias, copies.stamps[1])
            # a copy made on one CUDA stream is not ready on another: one per stream (the raw
            # stream handle, as inductor's generated code reads it: torch.cuda.current_stream()
            # costs more CPU time)
            and (copies.stream is None or torch._C._cuda_getCurrentRawStream(copies.index) == copies.stream)
        ):
            return copies.weight, copies.bias
        return self._cast_parameters(weight, bias)

    def _cast_parameters(self, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """A miss: the full guards, and new copies where they apply."""
        device = weight.device
        if (
            torch.jit.is_tracing() or device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device.type)
            or not torch.is_autocast_cache_enabled()
            or any(t is not None and (t.is_inference() or torch._C._functorch.is_functorch_wrapped_tensor(t))
                   for t in (weight, bias))
        ):
            return weight, bias
        dtype = torch.get_autocast_dtype(device.type)

        def cast(t: Optional[Tensor]) -> Optional[Tensor]:  # which tensors autocast casts: floating point but not float64
            return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

        copies = _AutocastCopies(
            device.type, device.index, dtype,
            torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else None,
            (_stamp(weight), _stamp(bias)),
            (weight.detach(), None if bias is None else bias.detach()),
            cast(weight), cast(bias),
        )
        self._autocast_copies = copies
        return copies.weight, copies.bias

    def clear_autocast_copies(self) -> None:
        """Drop the cached copies (made again on the next autocast pass), e.g. to measure the memory they take."""
        self._autocast_copies = None

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): the old copies are freed now
        self.clear_autocast_copies()
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):  # .train() / .eval(): a switch of mode starts afresh
        self.clear_autocast_copies()
        return super().train(mode)

    def __getstate__(self) -> dict:  # pickling and deepcopy leave the copies behind
        state = super().__getstate__()
        state.pop("_autocast_copies", None)
        return state


def eager_float32_cpu_inference(x: Tensor, *parameters: Optional[Tensor]) -> bool:
    """Whether ``x`` is a float32 CPU tensor in eager code (not compiled, not jit-traced) with no
    autograd recording for it or ``parameters``: where the eager CPU kernels below are chosen by
    measurement, and compiled graphs and backward passes are left to torch's defaults."""
    return (
        # x.is_cpu first: the cheapest check to fail for CUDA, whose eager inference is bound by CPU time
        x.is_cpu and x.dtype == torch.float32 and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *parameters)))
    )


# oneDNN's linear, which inductor's frozen CPU graphs call too
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _runs_onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether :func:`linear` calls oneDNN's linear for these tensors (the cases its docstring lists)."""
    return (
        # a plain tensor first (an FX proxy or a tensor subclass fails it, before any check that
        # would need a bool of it); then float32 on the CPU, the cheapest checks to fail for CUDA,
        # whose eager inference is bound by CPU time, and for autocast's bf16; then not compiling,
        # as dynamo cannot trace the checks after it
        _ONEDNN_LINEAR and type(x) is Tensor and eager_float32_cpu_inference(x, weight, bias)
        and weight.dtype == torch.float32
        # subclassed parameters, torch-function and dispatch modes (FlopCounterMode gets the aten
        # op it knows), forward-mode derivatives (oneDNN's linear has none) and torch.func
        # transforms (no batching rule: vmap would loop over the samples) get F.linear (its plain-
        # tensor and tracing checks repeat two above: about 0.1 µs, on the CPU path only)
        and nothing_watches(x, weight, bias)
        # a weight elsewhere (meta, say) gives F.linear's error rather than uninitialised memory
        and weight.is_cpu and (bias is None or bias.is_cpu)
        and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
        # it reads a strided bias as if it were dense (torch 2.14): the parameters as folding leaves them
        and weight.is_contiguous() and (bias is None or bias.is_contiguous())
    )


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear``; in float32 CPU inference (no autograd, forward-mode or backward, no autocast,
    eager, outside ``torch.func`` transforms, oneDNN not switched off by
    ``torch.backends.mkldnn.flags``, plain CPU tensors, no dispatch mode active) through
    oneDNN's linear, which takes the weight as it is. On this project's AMD EPYC machine, at RMT's
    shapes, it ran about 2.2 times as fast as ``F.linear``, whose float32 GEMM is MKL's there
    (docs/performance.md); the numbers differ by float32 rounding."""
    if _runs_onednn_linear(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# the registries of nn.Module's global hooks, which its __call__ reads (mutated in place, never rebound)
_GLOBAL_HOOKS = (
    _nn_module._global_forward_pre_hooks,
    _nn_module._global_forward_hooks,
    _nn_module._global_backward_pre_hooks,
    _nn_module._global_backward_hooks,
)


_LINEAR_FORWARD, _F_LINEAR = nn.Linear.forward, F.linear


def _calls_only_forward(module: nn.Module) -> bool:
    """Whether ``module(x)`` would run ``nn.Linear.forward`` as torch defines it and nothing else:
    no hooks of its own or global ones, no ``forward`` replaced on the instance or the class, no
    ``F.linear`` patched (which the class's forward calls), not compiled on its own."""
    return not (
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks
        or any(_GLOBAL_HOOKS) or "forward" in module.__dict__ or module._compiled_call_impl is not None
        or nn.Linear.forward is not _LINEAR_FORWARD or F.linear is not _F_LINEAR
    )


def call_linear(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for a model's linear layer, with an unfolded model's ``nn.Linear`` taking
    :func:`linear`'s oneDNN path in float32 CPU inference, as a folded model's
    :class:`CachedLinear` does. The layers stay ``nn.Linear``, which tools match by exact type
    (dynamic quantization's module swap, for one): any other type, a layer with hooks, a
    parametrized weight or any case :func:`linear` leaves to ``F.linear`` is called as
    ``module(x)``, unchanged."""
    # the checks before _calls_only_forward leave a CUDA or bf16 input to module(x) in a fraction of
    # the time all of them take (_runs_onednn_linear repeats them, for linear's other callers)
    if (
        type(module) is nn.Linear and type(x) is Tensor and eager_float32_cpu_inference(x)
        and _calls_only_forward(module)
    ):
        weight, bias = registered_weights(module)
        if _runs_onednn_linear(x, weight, bias):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return module(x)


@register_notrace_module  # FX feature extraction: a leaf (its dispatch reads the input's device and dtype)
class CachedLinear(AutocastWeightCache, nn.Linear):
    """``nn.Linear`` keeping its autocast-dtype weights across inference passes
    (:class:`AutocastWeightCache`), and in float32 CPU inference calling oneDNN's linear
    (:func:`linear`)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, *self.autocast_parameters())


class _CachedConv(AutocastWeightCache):
    def _forward_weights(self) -> tuple[Tensor, Optional[Tensor]]:  # DepthwiseConvNHWC.forward's
        return self.autocast_parameters()

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        # nn.Conv2d.forward passes the parameters themselves; other callers (LoRA's merged weights) their own
        registered_weight, registered_bias = registered_weights(self)
        if weight is registered_weight and bias is registered_bias:
            weight, bias = self._for_this_pass(weight, bias)
        return super()._conv_forward(x, weight, bias)


@register_notrace_module  # FX feature extraction: a leaf (its dispatch reads the input's device and dtype)
class CachedConv2d(_CachedConv, nn.Conv2d):
    """``nn.Conv2d`` keeping its autocast-dtype weights across inference passes (:class:`AutocastWeightCache`)."""


@register_notrace_module  # FX feature extraction: a leaf (its dispatch reads the input's device and dtype)
class CachedDepthwiseConvNHWC(_CachedConv, DepthwiseConvNHWC):
    """:class:`DepthwiseConvNHWC` keeping its autocast-dtype weights across inference passes."""


@register_notrace_module  # FX feature extraction: a leaf (its dispatch reads the input's device and dtype)
class CachedResidualDepthwiseConvNHWC(_CachedConv, ResidualDepthwiseConvNHWC):
    """:class:`ResidualDepthwiseConvNHWC` keeping its autocast-dtype weights across inference passes."""


_CACHING_CLASSES: dict[type, type] = {
    nn.Linear: CachedLinear,
    nn.Conv2d: CachedConv2d,
    DepthwiseConvNHWC: CachedDepthwiseConvNHWC,
    ResidualDepthwiseConvNHWC: CachedResidualDepthwiseConvNHWC,
}


def keep_autocast_weights(root: nn.Module) -> None:
    """Give every linear and conv in ``root`` the weight cache of :class:`AutocastWeightCache`.

    Part of folding for inference. An unfolded model keeps plain ``nn.Linear`` and ``nn.Conv2d``
    layers, which tools that match exact types expect: dynamic quantization, FX leaf modules.
    The change is of class only: parameters and state dict stay as they are.
    """
    for module in root.modules():
        caching = _CACHING_CLASSES.get(type(module))
        if caching is not None:
            module.__class__ = caching


@register_notrace_module  # FX feature extraction: a leaf (its dispatch reads the input's device and dtype)
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
        if torch.compiler.is_compiling():
            # (a compiled graph runs on a device with autocast, and torch 2.11's dynamo cannot trace
            # the availability check below: one graph break per block, and recompiles past dynamo's limit)
            device = x.device.type
            if torch.is_autocast_enabled(device):
                with torch.autocast(device, enabled=False):
                    return self._normalise(x)
            return self._normalise(x)
        # (asking whether autocast is on for a device type without it, "meta" say, is an error)
        device = "cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            # autocast switched off and on again around the one operator: what ``torch.autocast(device,
            # enabled=False)`` does for it, at a tenth of the CPU time (its enter and exit took 2.4 µs
            # on a 2-core AMD EPYC, 58 times a pass in rmt_s; scripts/eager_overhead.py)
            torch.set_autocast_enabled(device, False)
            try:
                return self._normalise(x)
            finally:
                torch.set_autocast_enabled(device, True)
        return self._normalise(x)

    def _normalise(self, x: Tensor) -> Tensor:
        weight = bias = None
        if eager_float32_cpu_inference(x):
            # torch's float32 CPU kernel normalises without scale and shift in a scalar loop, and with
            # them in vector code: a scale of ones and a shift of zeros halve its time (torch 2.14,
            # RMT's shapes), with the same numbers (docs/performance.md); making the two small tensors
            # costs a few microseconds. Not in bf16 or fp16, where it was no faster, nor with autograd
            # recording (its backward kernels were not measured).
            weight, bias = x.new_ones(self.normalized_shape), x.new_zeros(self.normalized_shape)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)

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
