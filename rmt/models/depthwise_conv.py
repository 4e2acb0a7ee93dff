"""RMT's depthwise convs on (B, H, W, C) tokens in one Triton kernel each, for CUDA inference.

Every RMT block runs three depthwise convs: the CPE's 3 x 3 on the residual stream, the LCE's
5 x 5 on v and the FFN's 3 x 3 on its hidden activation (87 in rmt_s). On CUDA each is a cuDNN
call, and a conv's bias was added by a second, broadcast kernel (an H200 profile of eager rmt_s):
folding moves the LCE and FFN biases into the linears after them, but the CPE's feeds the
residual stream and stays. On an H200, compiled rmt_s's 87 depthwise convs took 1.80 ms of GPU
time a batch of 64 (docs/performance.md, run 2 of the attention study), about three times what
their bytes take to read and write at the card's bandwidth; eager, each cuDNN call also costs
CPU time, where eager inference at batch 64 is bound by CPU time per operator.

Here one program computes a (tokens, channels) tile: it reads each token's k x k window through
the input's strides (channels contiguous), multiplies it by the channel's weights and adds the
bias in float32, and writes a fresh (B, H, W, C) tensor. Inputs, weights and bias are rounded to
the compute dtype (autocast's, or the input's) as they are loaded, as autocast's casts would
round them, so no cast runs as a kernel of its own; the sums are float32 as cuDNN's are, and the
bias is added before the one rounding, where torch rounds the conv's output and then adds it.

A candidate, not yet measured on a GPU: :data:`ENABLED` is off, and
``scripts/gpu_attention_variants.py``'s ``+triton_dwconv`` models switch it on. Forward only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from rmt.models.kernel_calls import nothing_watches, on_the_tensors_gpu, profiler_label

try:
    import triton
    import triton.language as tl
    # TRITON_INTERPRET=1 when the kernel is defined makes it a CPU interpreter (how the tests run it)
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # CPU-only torch wheels do not ship Triton
    triton = None

# Whether RMT's depthwise convs run the kernel where they can (:func:`kernel_dtype`). Off until measured on a
# GPU. Set it before compiling a model: a compiled graph guards on it, and a switch afterwards
# recompiles; an exported graph keeps what it traced.
ENABLED = False

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_KERNEL_DTYPES = frozenset(_DTYPES.values())
MAX_CHANNEL_BLOCK = 128
WARPS = 8

if triton is not None:

    @triton.jit
    def _rounded(x, dtype):
        """x rounded to ``dtype`` as autocast's cast would round it (to nearest even, on a GPU;
        Triton's interpreter truncates float32 to bfloat16), in float32 for the sums."""
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _depthwise_conv_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr,
        tokens, height, width, channels,
        stride_xb, stride_xh, stride_xw,
        stride_wc, stride_wh, stride_ww, stride_bias,
        KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One (BLOCK_P tokens, BLOCK_C channels) tile of the output. Tokens are counted over the
        whole batch, so the small grids of the late stages (7 x 7 at 224 px) fill whole tiles."""
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        image, position = p // (height * width), p % (height * width)
        row, col = position // width, position % width
        in_channels = c < channels
        dtype = out_ptr.dtype.element_ty
        # each tap reads the tile's own addresses shifted by one offset
        centre = x_ptr + (image * stride_xb + row * stride_xh + col * stride_xw)[:, None] + c[None, :]
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(KERNEL):
            r = row + (i - KERNEL // 2)
            row_inside = (p < tokens) & (r >= 0) & (r < height)
            for j in tl.static_range(KERNEL):
                s = col + (j - KERNEL // 2)
                inside = row_inside & (s >= 0) & (s < width)  # zero padding
                x = tl.load(centre + ((i - KERNEL // 2) * stride_xh + (j - KERNEL // 2) * stride_xw),
                            mask=inside[:, None] & in_channels[None, :], other=0.0)
                w = tl.load(w_ptr + c * stride_wc + i * stride_wh + j * stride_ww, mask=in_channels, other=0.0)
                acc += _rounded(x, dtype) * _rounded(w, dtype)[None, :]
        if HAS_BIAS:
            acc += _rounded(tl.load(b_ptr + c * stride_bias, mask=in_channels, other=0.0), dtype)[None, :]
        tl.store(out_ptr + p[:, None] * channels + c[None, :], acc.to(dtype),
                 mask=(p < tokens)[:, None] & in_channels[None, :])


# TRITON_INTERPRET=1 when the kernel was defined: it runs on CPU tensors in Triton's interpreter
_INTERPRETED = triton is not None and isinstance(_depthwise_conv_kernel, InterpretedFunction)


def supports(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> bool:
    """Whether the kernel takes these tensors: (B, H, W, C) ``x`` of a dtype it takes, channels
    contiguous, on a GPU (or on the CPU in Triton's interpreter), within reach of 32-bit offsets;
    a (C, 1, k, k) depthwise ``weight`` of an odd size k and a bias of C values, on x's device."""
    k = weight.shape[-1]
    return (
        triton is not None and (x.is_cuda or (_INTERPRETED and x.is_cpu))
        and x.dim() == 4
        and x.dtype in _KERNEL_DTYPES
        and x.stride(-1) == 1
        and weight.shape == (x.shape[-1], 1, k, k)
        and k % 2 == 1
        and weight.device == x.device
        and (bias is None or (bias.shape == (x.shape[-1],) and bias.device == x.device))
        and _offsets_fit(x)
    )


def _offsets_fit(x: Tensor) -> bool:
    """Whether the kernel's 32-bit offsets reach the output's last element and the farthest
    element of (B, H, W, C) ``x`` (a view of a larger tensor can reach farther than its own size)."""
    (b, h, w, c), (sb, sh, sw, sc) = x.shape, x.stride()
    return b * h * w * c < 2**31 and (b - 1) * sb + (h - 1) * sh + (w - 1) * sw + (c - 1) * sc < 2**31


def _compute_dtype(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[torch.dtype]:
    """The dtype ``F.conv2d`` would compute and return in: autocast's on x's device under
    autocast (which casts float32, float16 and bfloat16 tensors to it), else x's, if the weight
    and bias have it too; None where ``F.conv2d`` would raise a dtype error."""
    device = x.device.type  # cuda, or cpu in Triton's interpreter: both have autocast
    if torch.is_autocast_enabled(device):
        fits = weight.dtype in _KERNEL_DTYPES and (bias is None or bias.dtype in _KERNEL_DTYPES)
        return torch.get_autocast_dtype(device) if fits else None
    fits = weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
    return x.dtype if fits else None


def kernel_dtype(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[torch.dtype]:
    """The dtype in which ``conv``, a depthwise conv on (B, H, W, C) tokens computing with
    ``weight`` and ``bias`` (its own, or its weight cache's copies), would run the kernel on ``x``
    (:func:`_compute_dtype`, which :func:`run_unchecked` takes), or None where it must call
    ``F.conv2d`` to give its numbers: unless stride 1 with 'same' zero padding; with a gradient
    recorded (the kernel has no backward pass); eagerly, with anything that would need to see
    ``F.conv2d`` (:func:`~rmt.models.kernel_calls.nothing_watches`: tensor subclasses, dispatch
    modes such as ``FlopCounterMode``, forward-mode derivatives, ``torch.func`` transforms,
    ``torch.jit.trace``); with tensors the kernel does not take (:func:`supports`) or dtypes
    ``F.conv2d`` would refuse. RMT's convs run it when :data:`ENABLED` too."""
    k = weight.shape[-1]
    runs = (
        # first: an FX proxy or a jit-traced size cannot be tested for truth (a compiled graph
        # calls the custom operator, which everything tracing it sees)
        (torch.compiler.is_compiling() or nothing_watches(x, weight, bias))
        and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding == (k // 2, k // 2)
        and conv.padding_mode == "zeros" and conv.groups == x.shape[-1]
        and not (torch.is_grad_enabled()
                 and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))
        and supports(x, weight, bias)
    )
    return _compute_dtype(x, weight, bias) if runs else None


def depthwise_conv_nhwc(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``conv2d`` of (B, H, W, C) ``x`` read as channels last, with (C, 1, k, k) ``weight``
    (depthwise, k odd, stride 1, padding k // 2) and ``bias``, as a fresh (B, H, W, C) tensor.
    Forward only: no gradient flows through it.

    Under autocast the output is in autocast's dtype, as ``F.conv2d``'s would be; x, weight and
    bias are rounded to it as they are loaded. Otherwise weight and bias must have x's dtype, as
    ``F.conv2d`` requires. A compiled graph calls the kernel as the custom operator
    ``rmt::depthwise_conv_nhwc``, on inputs cast where inductor can fuse the casts.
    """
    if triton is None:
        raise RuntimeError("depthwise_conv_nhwc needs Triton, which this torch install lacks")
    if not supports(x, weight, bias):
        raise ValueError(f"depthwise_conv_nhwc takes a (B, H, W, C) {', '.join(_DTYPES)} tensor with channels "
                         f"contiguous on a GPU, reaching less than 2**31 elements, a (C, 1, k, k) weight, k odd, and "
                         f"a bias of C values on its device; got {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} "
                         f"strides {x.stride()} on {x.device}, weight {tuple(weight.shape)} on {weight.device}"
                         f"{'' if bias is None else f', bias {tuple(bias.shape)} on {bias.device}'}")
    dtype = _compute_dtype(x, weight, bias)
    if dtype is None:
        raise TypeError(f"depthwise_conv_nhwc: input {x.dtype}, weight {weight.dtype}"
                        f"{'' if bias is None else f', bias {bias.dtype}'}: one dtype, or autocast")
    return run_unchecked(x, weight, bias, dtype)


def run_unchecked(x: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """:func:`depthwise_conv_nhwc` in ``dtype`` without its checks of the inputs, for a caller
    that has them from :func:`kernel_dtype` (RMT's convs: eager inference at batch 64 is bound
    by CPU time)."""
    if torch.compiler.is_compiling():
        return _depthwise_conv_op(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    with profiler_label("rmt::depthwise_conv_nhwc"):
        return _launch(x, weight, bias, dtype)


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    b, h, w, c = x.shape
    stride_b, stride_h, stride_w, _ = x.stride()
    stride_wc, _, stride_wh, stride_ww = weight.stride()
    k = weight.shape[-1]
    out = torch.empty((b, h, w, c), dtype=dtype, device=x.device)
    block_p, block_c = _tile(k, c)
    tokens = b * h * w
    with on_the_tensors_gpu(x):
        # (ceiling divisions in Python: triton.cdiv is a jit function, slow to call from Python)
        _depthwise_conv_kernel[(-(-tokens // block_p), -(-c // block_c))](
            x, weight, x if bias is None else bias, out,
            tokens, h, w, c,
            stride_b, stride_h, stride_w, stride_wc, stride_wh, stride_ww, 0 if bias is None else bias.stride(0),
            KERNEL=k, HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=WARPS,
        )
    return out


def _tile(kernel_size: int, channels: int) -> tuple[int, int]:
    """(tokens, channels) a program. Each of the :data:`WARPS` warps' threads sums 4 outputs of a
    3 x 3 conv, 2 of a 5 x 5 and 1 of larger ones: every tap's load of the tile is in flight at
    once, so registers grow with taps times outputs, and these take 72, 80 and 78 a thread for
    sm_90a without spilling, where 4 outputs of a 5 x 5 took 140 (Triton 3.8;
    scripts/triton_kernel_registers.py). Not yet timed on a GPU."""
    outputs_per_thread = 4 if kernel_size <= 3 else 2 if kernel_size <= 5 else 1
    block_c = _channel_block(channels)
    return WARPS * 32 * outputs_per_thread // block_c, block_c


def _channel_block(channels: int) -> int:
    """Channels a program: the largest power of two dividing ``channels``, up to
    :data:`MAX_CHANNEL_BLOCK`, so that no lane is masked off (RMT's widths: 64 to 512, their FFNs
    3x or 4x that); at least 16, or the next power of two for widths without such a factor."""
    lowest_bit = channels & -channels
    if lowest_bit >= 16:
        return min(lowest_bit, MAX_CHANNEL_BLOCK)
    return min(1 << (channels - 1).bit_length(), MAX_CHANNEL_BLOCK)


@torch.library.custom_op("rmt::depthwise_conv_nhwc", mutates_args=())
def _depthwise_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return _launch(x, weight, bias, x.dtype)


@_depthwise_conv_op.register_fake
def _(x, weight, bias):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


__all__ = ["ENABLED", "depthwise_conv_nhwc", "kernel_dtype", "run_unchecked", "supports"]
