"""Manhattan self-attention (MaSA), the attention of RMT.

Scores get a per-head spatial decay added before the softmax: ``log(gamma_head) * distance``
with gamma_head = 1 - 2 ** (-decay_init - decay_heads_range * head / num_heads). Decomposed
stages attend along each image row with the 1-D distance between columns, then along each
column with the 1-D distance between rows; the other stages attend over the whole map with the
Manhattan distance. Queries and keys are first rotated by the official "theta shift", a rotary
code on interleaved channel pairs whose angle index is the flattened position ``h * W + w``.

The attention kernels compute the same numbers (see docs/models.md and docs/performance.md):

* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` with the decay as a 4-D
  additive float mask of shape (1, heads, L, L), dispatched as torch chooses; on the CPU a 4-D
  mask takes the fused flash kernel (a 3-D one would fall back to the math path).
* ``"reference"``: matmul, add decay, softmax, matmul, written plainly as the paper states it.
* ``"flex"``: FlexAttention with a ``score_mod`` computing the decay from the token indices, so
  no mask is materialised (meant for ``torch.compile``).
* ``"triton"``: our Triton kernels (:mod:`rmt.models.fused_attention`) for sequences of at most
  64 tokens, every pass of RMT at 224 px, and both passes of a decomposed stage of at most 16 x
  16 tokens (stage 3 at 224 px) in one program an image and head: the rotary fused into their
  loads, the decay computed from the token indices, q, k and v read in place through their
  strides. Forward only: with autograd recording, and for longer sequences, it falls back to
  ``auto``'s choice.
* ``"auto"`` (default): the kernel measured fastest for RMT's short sequences. On the CPU
  (2-thread AVX-512 measurements in docs/performance.md), in float32 and, up to 64 tokens,
  bfloat16, while a pass's scores would take at most ``CPU_DEFERRED_MAX_SCORE_BYTES`` in
  float32 (every decomposed pass at 224 px, whose eval-mode inference runs in chunks of images,
  and the 49-token stage 4): the matmul math with k stored transposed (the fastest batched-GEMM operand
  layout) and the softmax normalised at the end, ``exp(scores) @ v / row_sums``, which skips
  torch.softmax's passes over the scores (few of a 16-lane vector's lanes are used on 14- to
  56-token rows) and falls back to the max-subtracted softmax if anything leaves exp's range;
  larger passes (rmt_t's 196-token stage 3 in chunks of 8 images), SDPA's fused flash kernel,
  which never holds all the scores. In float16 (CPU autocast), the plain matmul math up to 64
  tokens, SDPA beyond. On CUDA (sm80+), eager inference (no autograd) runs the Triton kernels
  where they apply (the least GPU time per attention call at every stage), and otherwise SDPA
  with the memory-efficient backend first (as dispatched, about 1.4x slower at stage 1). Under
  ``torch.compile`` it is the reference math on CUDA, which inductor fuses with the surrounding
  ops: in compile's default mode at batch 64, where the CPU's launches bound RMT, the Triton
  kernels as custom operators ran slower (``triton`` asks for them; they win under CUDA graphs
  and at batch 256, docs/performance.md). Compiled CPU inference calls
  the eager CPU path above, rotary included, as one operator per attention call
  (``rmt::cpu_manhattan_attention``), which inductor cannot generate: the deferred
  normalisation's range check reads values. Compiled CPU training (the operator has no
  backward), ``torch.export`` and ``torch.jit.trace`` take the reference math in place of the
  deferred normalisation. docs/performance.md has the measurements.

Every kernel receives k already scaled by ``head_dim ** -0.5``: the official code scales k before
its theta shift, and we fold the scale into the rotary tables of k, so it costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import has_static_value as _fixed_size  # dynamo evaluates it while tracing

from rmt.models import fused_attention
from rmt.models.kernel_calls import profiler_label
from rmt.models.layers import DepthwiseConvNHWC, call_linear, exporting

ATTENTION_KERNELS = ("auto", "sdpa", "reference", "flex", "triton")


def resolve_attention_kernel(name: str) -> str:
    """Validate a kernel name."""
    if name not in ATTENTION_KERNELS:
        from rmt.errors import ConfigError

        raise ConfigError(f"unknown attention kernel {name!r}: choose one of {', '.join(ATTENTION_KERNELS)}")
    return name


@dataclass(frozen=True)
class DecayBias:
    """The additive decay of one attention pass, ``decay[head] * distance(query, key)``.

    ``mask`` is the materialised (1, heads, L, L) tensor (None for the flex kernel, which
    computes it from indices); ``grid_width`` is 0 for a 1-D distance ``|i - j|`` and the map
    width for the 2-D Manhattan distance over flattened positions.
    """

    mask: Optional[Tensor]
    decay: Tensor  # (heads,) float32
    grid_width: int


@dataclass(frozen=True)
class PositionTables:
    """Everything the attention of one stage needs for one (height, width, device, dtype)."""

    # rotary tables for (B, H, W, 2, heads, head_dim) stacked q and k; the k half carries the
    # attention scale head_dim ** -0.5
    cos: Tensor  # (H, W, 2, 1, head_dim)
    sin: Tensor  # (H, W, 2, 1, head_dim), the sign of the pair rotation folded in
    rotation: Optional[Tensor]  # (H, W, 2, 1, head_dim / 2) complex e^(i angle), float32 tables only
    rows: Optional[DecayBias]  # decomposed stages: attention along each row (sequence = width)
    columns: Optional[DecayBias]  # decomposed stages: attention along each column (sequence = height)
    full: Optional[DecayBias]  # other stages: attention over all H * W tokens


class ManhattanPosition(nn.Module):
    """Rotary tables and decay masks of one stage, built once per input size and reused (a compiled
    graph of fixed sizes holds the cached tables as constants: :func:`_tables_built_while_tracing`).

    The buffers are the official ``Relpos.angle`` and ``Relpos.decay``; they are derived from
    the configuration, so they are not saved in our state dict (checkpoints that carry them
    are checked against them at load time).
    """

    _MAX_CACHED_SIZES = 8

    def __init__(self, dim: int, num_heads: int, decay_init: float, decay_heads_range: float, decomposed: bool):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.decay_init, self.decay_heads_range = decay_init, decay_heads_range
        self.decomposed = decomposed
        for name, value in self.official_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self._cache: dict[tuple, PositionTables] = {}
        self._register()

    def __setstate__(self, state: dict) -> None:  # copy.deepcopy, pickle: a copy gets a key of its own
        super().__setstate__(state)
        self._register()

    def _register(self) -> None:
        self._key = next(_position_keys)
        _positions[self._key] = self

    def official_buffers(self) -> dict[str, Tensor]:
        """``angle`` and ``decay`` as the official ``Relpos`` module computes them (fp32, CPU)."""
        with torch.device("cpu"):
            angle = 1.0 / (10000 ** torch.linspace(0, 1, self.dim // self.num_heads // 2))
            heads = torch.arange(self.num_heads, dtype=torch.float)
            decay = torch.log(1 - 2 ** (-self.decay_init - self.decay_heads_range * heads / self.num_heads))
        return {"angle": angle.unsqueeze(-1).repeat(1, 2).flatten(), "decay": decay}

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): tables follow the buffers
        self.clear_tables()
        return super()._apply(fn, recurse)

    def init_non_persistent_buffers(self) -> None:
        """Compute ``angle`` and ``decay`` again where they are (timm's hook after ``to_empty``: a model
        built on the meta device has none, and ``load_state_dict`` does not restore unsaved buffers)."""
        for name, value in self.official_buffers().items():
            getattr(self, name).copy_(value)
        self.clear_tables()

    def clear_tables(self) -> None:
        """Drop the cached tables (rebuilt on the next call), e.g. to measure the memory they take."""
        self._cache = {}

    def tables(self, height: int, width: int, dtype: torch.dtype, with_masks: bool) -> PositionTables:
        if not torch.compiler.is_compiling():  # eager: one check a call, on every block's hot path
            return self._cached_tables(height, width, dtype, with_masks)
        if torch.compiler.is_dynamo_compiling() and _fixed_size(height) and _fixed_size(width):
            return _tables_built_while_tracing(self._key, height, width, dtype, with_masks)
        return self._build(height, width, dtype, with_masks)  # symbolic sizes, torch.export: computed in every pass

    def _cached_tables(self, height: int, width: int, dtype: torch.dtype, with_masks: bool) -> PositionTables:
        key = (height, width, dtype, with_masks)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # normal tensors even when first called under inference_mode, so that the cached tables
        # also serve a later training step
        with torch.inference_mode(False), torch.no_grad():
            tables = self._build(height, width, dtype, with_masks)
        if len(self._cache) >= self._MAX_CACHED_SIZES:
            self._cache.clear()
        self._cache[key] = tables
        return tables

    def _build(self, height: int, width: int, dtype: torch.dtype, with_masks: bool) -> PositionTables:
        # float32: the official code computes all tables in float32. A copy, because a compiled
        # graph's tables are its constants: with inductor's freezing, dynamo raised on a constant
        # that was also a module's buffer
        decay = self.decay.clone()
        index = torch.arange(height * width, device=decay.device, dtype=decay.dtype)
        phase = index[:, None] * self.angle[None, :]
        # q unscaled, k scaled: (2, 1) broadcasts over the stacked q/k and the heads
        scale = torch.tensor([1.0, (self.dim // self.num_heads) ** -0.5], device=decay.device).reshape(2, 1, 1)
        cos, sin = torch.cos(phase)[:, None, None] * scale, torch.sin(phase)[:, None, None] * scale
        # rotate_every_two(x) * sin == swap_pairs(x) * sin_signed, with the pair's minus sign folded in
        sin = (sin.unflatten(-1, (-1, 2)) * torch.tensor([-1.0, 1.0], device=decay.device)).flatten(-2)
        cos = cos.reshape(height, width, 2, 1, -1)
        sin = sin.reshape(height, width, 2, 1, -1)
        rotation = complex_rotation(cos, sin) if dtype == torch.float32 else None
        cos, sin = cos.to(dtype), sin.to(dtype)

        def bias(distance: Optional[Tensor], grid_width: int) -> DecayBias:
            mask = None
            if with_masks and distance is not None:
                mask = (distance * decay[:, None, None]).unsqueeze(0).to(dtype)
            return DecayBias(mask, decay, grid_width)

        def distance_1d(n: int) -> Tensor:
            i = torch.arange(n, device=decay.device, dtype=decay.dtype)
            return (i[:, None] - i[None, :]).abs()

        if self.decomposed:
            rows, columns = bias(distance_1d(width), 0), bias(distance_1d(height), 0)
            return PositionTables(cos, sin, rotation, rows=rows, columns=columns, full=None)
        grid = torch.stack(
            torch.meshgrid(
                torch.arange(height, device=decay.device, dtype=decay.dtype),
                torch.arange(width, device=decay.device, dtype=decay.dtype),
                indexing="ij",
            ),
            dim=-1,
        ).reshape(height * width, 2)
        manhattan = (grid[:, None, :] - grid[None, :, :]).abs().sum(-1)
        return PositionTables(cos, sin, rotation, rows=None, columns=None, full=bias(manhattan, width))


# Each ManhattanPosition by an int key, which dynamo can pass to _tables_built_while_tracing as a
# constant: dynamo of torch 2.11 raised "UnspecializedNNModuleVariable(ManhattanPosition) is not a
# constant" when given the module itself (2.14 accepts it)
_positions: weakref.WeakValueDictionary[int, ManhattanPosition] = weakref.WeakValueDictionary()
_position_keys = itertools.count()


@torch.compiler.assume_constant_result
def _tables_built_while_tracing(
    position_key: int, height: int, width: int, dtype: torch.dtype, with_masks: bool
) -> PositionTables:
    """A stage's tables for a compiled graph of fixed sizes: dynamo runs this function while it
    traces the graph, and keeps the tensors it returns as the graph's constants. The tables are
    the eager cache's, so the stage's blocks share one set of constants with each other and with
    eager passes; dynamo keeps a reference to them for as long as the process runs. Traced
    instead, the tables were computed again in every pass, and inductor fused their cos and sin
    into each rotary kernel (docs/performance.md). They are built from the buffers as they are
    at tracing time (derived from the configuration, never trained)."""
    return _positions[position_key]._cached_tables(height, width, dtype, with_masks)


def complex_rotation(cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary tables as one complex number per interleaved pair, ``cos + i sin`` of its angle,
    from the real tables (``sin`` with the pair's sign folded in: the pair's second entry is +sin):
    each pair is rotated by the same angle, so one complex multiplication rotates it."""
    return torch.complex(cos[..., 0::2], sin[..., 1::2])


def rotate_queries_and_keys(qk: Tensor, tables: PositionTables, inplace: bool = False) -> Tensor:
    """The official theta shift, ``x * cos + rotate_every_two(x) * sin``, of q and k stacked as
    (B, H, W, 2, heads, head_dim); k also gets the attention scale ``head_dim ** -0.5``.

    In float32 eager mode the interleaved pairs are viewed as complex numbers and rotated by one
    complex multiplication (several times faster on the CPU than the swap, two products and a
    sum), in place if ``inplace`` (for a fresh projection output); other dtypes and compiled
    graphs, which fuse the real form, use cos and sin and always return a new tensor.
    """
    if tables.rotation is not None and qk.dtype == torch.float32 and not torch.compiler.is_compiling():
        pairs = torch.view_as_complex(qk.unflatten(-1, (-1, 2)))
        if inplace:
            pairs.mul_(tables.rotation)
            return qk
        return torch.view_as_real(pairs * tables.rotation).flatten(-2)
    swapped = qk.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return qk * tables.cos + swapped * tables.sin


# --- kernels: (q, k, v, bias) -> out, all (batch, heads, L, head_dim); k is pre-scaled ---


def _attend_reference(q: Tensor, k: Tensor, v: Tensor, bias: DecayBias) -> Tensor:
    scores = q @ k.transpose(-2, -1)
    # in place on the fresh product: one full-size allocation fewer (the matmul's backward does not need it)
    return torch.softmax(scores.add_(bias.mask), dim=-1) @ v


def _attend_deferred_normalisation(q: Tensor, k: Tensor, v: Tensor, bias: DecayBias) -> Tensor:
    """The softmax attention normalised at the end: ``(exp(scores) @ v) / row_sums``.

    The same function as :func:`_attend_reference` up to rounding, with two passes over the
    (L, L) scores fewer on the CPU: no running maximum (subtracting it only keeps exp in range)
    and the division applied to the (L, head_dim) output instead of the weights. torch's softmax
    also uses few of a 16-lane vector's lanes on RMT's 14- to 56-token rows; exp and the sums
    use them all. Where exp's range is left, the call is redone with the max-subtracted softmax:
    a row sum that overflows, one so small that weights lost to subnormals (or flushed to zero)
    could matter, or an inf or NaN in the output.
    """
    if q.numel() == 0:  # nothing to check the range of
        return _attend_reference(q, k, v, bias)
    with profiler_label("rmt::deferred_normalisation_attention"):
        weights = (q @ k.transpose(-2, -1)).add_(bias.mask).exp_()
        sums = weights.sum(-1, keepdim=True)
        out = weights @ v
        out = out / sums if out.requires_grad else out.div_(sums)
    # Each weight below the smallest normal number (tiny) is off by at most tiny, zero if
    # subnormals are flushed: at most L * tiny per row, negligible (eps) against a row sum of at
    # least L * tiny / eps. A finite largest sum keeps every weight finite; the output's own
    # overflow (or an inf or NaN in v) shows in its sum, one cheap reduction.
    finfo = torch.finfo(sums.dtype)
    smallest, largest = (bound.item() for bound in torch.aminmax(sums))
    in_range = smallest >= weights.shape[-1] * finfo.tiny / finfo.eps and largest <= finfo.max
    return out if in_range and math.isfinite(out.sum().item()) else _attend_reference(q, k, v, bias)


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, bias: DecayBias) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.mask, scale=1.0)


@functools.lru_cache(maxsize=1)
def _efficient_first() -> Callable[[], contextlib.AbstractContextManager]:
    """A context giving SDPA's memory-efficient backend priority over cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    return functools.partial(sdpa_kernel, order, set_priority=True)


def _attend_sdpa_efficient_first(q: Tensor, k: Tensor, v: Tensor, bias: DecayBias) -> Tensor:
    with _efficient_first()():
        return _attend_sdpa(q, k, v, bias)


def _decay_score_mod(bias: DecayBias) -> Callable:
    decay, grid_width = bias.decay, bias.grid_width

    if grid_width:

        def score_mod(score, b, h, q_idx, kv_idx):
            dh = (q_idx // grid_width - kv_idx // grid_width).abs()
            dw = (q_idx % grid_width - kv_idx % grid_width).abs()
            return score + (decay[h] * (dh + dw)).to(score.dtype)

    else:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + (decay[h] * (q_idx - kv_idx).abs()).to(score.dtype)

    return score_mod


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _attend_flex(q: Tensor, k: Tensor, v: Tensor, bias: DecayBias) -> Tensor:
    # FlexAttention is only fused when compiled: inside a compiled model call it directly,
    # from eager code through a compiled wrapper
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention
    else:
        flex_attention = _compiled_flex_attention()
    return flex_attention(q, k, v, score_mod=_decay_score_mod(bias), scale=1.0)


@dataclass(frozen=True)
class _Kernel:
    """An attention function, and whether it wants k stored transposed, (..., head_dim, L) in
    memory (so that q @ k^T is a plain, fast GEMM on the CPU)."""

    attend: Callable[[Tensor, Tensor, Tensor, DecayBias], Tensor]
    k_transposed: bool = False


_KERNELS: dict[str, _Kernel] = {
    "reference": _Kernel(_attend_reference),
    "sdpa": _Kernel(_attend_sdpa),
    "flex": _Kernel(_attend_flex),
    "cuda_sdpa_efficient_first": _Kernel(_attend_sdpa_efficient_first),
    "cpu_deferred_normalisation": _Kernel(_attend_deferred_normalisation, k_transposed=True),
    "cpu_matmul": _Kernel(_attend_reference, k_transposed=True),
}

# The CPU choices of ``auto`` (docs/performance.md). float32, float64 and bfloat16: the deferred
# normalisation while a pass's scores stay this small (they are written and read several
# times), SDPA's fused flash kernel, which never holds them all, beyond; measured, rmt_l's 4.9 MB
# stage-1 passes run faster deferred, rmt_t's 9.8 MB stage-3 passes (8 images of 196 tokens)
# faster on SDPA, in bfloat16 too, where they take half the bytes: bfloat16 scores count 4
# bytes each here, and only sequences of at most the length below take the deferred
# normalisation (rmt_t's 196-token stage 3 at batch 1 ran 1.6x faster on SDPA). float16 (CPU
# autocast): the plain matmul math up to that length (exp overflows at 11 in float16, so the
# deferred normalisation would fall back all the time).
CPU_DEFERRED_MAX_SCORE_BYTES = 8 * 2**20
CPU_HALF_PRECISION_MAX_LENGTH = 64


def _resolve(kernel: str, q: Tensor) -> _Kernel:
    """The kernel for one attention pass over the sequences of ``q``, (B, G, L, heads, head_dim)."""
    if kernel == "triton":  # a pass the Triton kernel does not run (see manhattan_attention)
        kernel = "auto"
    if kernel != "auto":
        return _KERNELS[kernel]
    if q.device.type == "cuda":
        # compiled, the plain math: inductor fuses it with the surrounding ops
        return _KERNELS["reference" if torch.compiler.is_compiling() else "cuda_sdpa_efficient_first"]
    if q.device.type == "cpu":
        b, g, length, n, _ = q.shape
        if q.dtype in (torch.float32, torch.float64) or (
            q.dtype == torch.bfloat16 and length <= CPU_HALF_PRECISION_MAX_LENGTH
        ):
            if b * g * n * length * length * max(q.element_size(), 4) <= CPU_DEFERRED_MAX_SCORE_BYTES:
                # in a graph (compiled training, exported, traced), the plain math: the range check
                # would break it, or be frozen into it with its outcome for the example input
                in_graph = torch.compiler.is_compiling() or torch.jit.is_tracing()
                return _KERNELS["reference" if in_graph else "cpu_deferred_normalisation"]
        elif q.dtype == torch.float16 and length <= CPU_HALF_PRECISION_MAX_LENGTH:
            return _KERNELS["cpu_matmul"]
    return _KERNELS["sdpa"]


def _attend_sequences(q: Tensor, k: Tensor, v: Tensor, bias: DecayBias, kernel: str) -> Tensor:
    """Attention over sequences along dim 2 of (B, G, L, heads, head_dim) inputs, for each of
    the B * G groups; returns (B, G, heads, L, head_dim)."""
    b, g, length, n, d = q.shape
    chosen = _resolve(kernel, q)

    def sequences(t: Tensor, transposed: bool) -> Tensor:
        if transposed:
            return t.permute(0, 1, 3, 4, 2).reshape(b * g, n, d, length).transpose(-2, -1)
        return t.permute(0, 1, 3, 2, 4).reshape(b * g, n, length, d)

    out = chosen.attend(sequences(q, False), sequences(k, chosen.k_transposed), sequences(v, False), bias)
    return out.view(b, g, n, length, d)


def _runs_fused(kernel: str, q: Tensor, v: Tensor, *lengths: int) -> bool:
    """Whether a pass over sequences of these lengths runs the Triton kernel: always where it
    can for ``triton``, and in eager inference on the GPUs it was measured on for ``auto``; it
    has no backward pass."""
    if kernel == "auto":
        if q.device.type != "cuda" or torch.compiler.is_compiling() or not fused_attention.measured_gpu(q.device):
            return False
    elif kernel != "triton":
        return False
    if torch.is_grad_enabled() and (q.requires_grad or v.requires_grad):
        return False
    return all(fused_attention.supports(q, length) for length in lengths)


def manhattan_attention(
    qk: Tensor, v: Tensor, tables: PositionTables, kernel: str, decomposed: bool, add_to: Optional[Tensor] = None
) -> Tensor:
    """MaSA from the projections: q and k stacked as (B, H, W, 2, heads, head_dim), not yet
    rotated (a fresh tensor, rotated in place unless the Triton kernel rotates them on loading),
    and v as (B, H, W, heads, head_dim). Returns (B, H, W, heads, head_dim), maybe a strided view;
    or, given ``add_to`` of that shape (not overlapping itself, qk or v), adds the attention into
    it in place and returns it (the Triton kernels add as they store their output, saving a
    launch and two passes over memory).
    """
    b, h, w = qk.shape[:3]
    if _runs_fused(kernel, qk, v, *((h, w) if decomposed else (h * w,))):
        if add_to is None or _kernels_can_write(add_to, qk, decomposed):
            return _fused_manhattan_attention(qk, v, tables, decomposed, add_to=add_to)
        out = _fused_manhattan_attention(qk, v, tables, decomposed)
    elif _runs_eager_cpu_path_in_graph(kernel, qk, v):
        out = _cpu_manhattan_attention_in_graph(qk, v, tables, decomposed)
    else:
        q, k = rotate_queries_and_keys(qk, tables, inplace=True).unbind(3)
        out = (decomposed_attention if decomposed else full_attention)(q, k, v, tables, kernel)
    # a strided view, read in place rather than copied into (B, H, W, heads, head_dim) first
    return out if add_to is None else add_to.add_(out)


def _runs_eager_cpu_path_in_graph(kernel: str, qk: Tensor, v: Tensor) -> bool:
    """Whether a compiled graph calls ``auto``'s eager CPU path as the operator
    ``rmt::cpu_manhattan_attention``: in CPU inference. The operator has no backward pass, and an
    exported program keeps plain aten operators, which other runtimes can run."""
    return (
        kernel == "auto" and qk.device.type == "cpu" and torch.compiler.is_compiling() and not exporting()
        and not (torch.is_grad_enabled() and (qk.requires_grad or v.requires_grad))
    )


def _cpu_manhattan_attention_in_graph(qk: Tensor, v: Tensor, tables: PositionTables, decomposed: bool) -> Tensor:
    if decomposed:
        out = _cpu_manhattan_attention_op(
            qk, v, tables.cos, tables.sin, tables.rows.decay, tables.rows.mask, tables.columns.mask, 0
        )
        return out.permute(0, 3, 1, 2, 4)  # (B, W, heads, H, d) -> (B, H, W, heads, d)
    full = tables.full
    out = _cpu_manhattan_attention_op(qk, v, tables.cos, tables.sin, full.decay, full.mask, None, full.grid_width)
    return out.permute(0, 2, 3, 1, 4)  # (B, heads, H, W, d) -> (B, H, W, heads, d)


# inductor passes a custom operator's inputs in the strides eager code gives them (its default
# layout constraint), which the rotary needs: it views q and k's channel pairs as complex numbers
@torch.library.custom_op("rmt::cpu_manhattan_attention", mutates_args=("qk",))
def _cpu_manhattan_attention_op(
    qk: Tensor, v: Tensor, cos: Tensor, sin: Tensor, decay: Tensor, mask: Tensor, columns_mask: Optional[Tensor],
    grid_width: int,
) -> Tensor:
    """``manhattan_attention``'s eager CPU path for ``auto`` as one operator of a compiled graph.

    Its kernels are eager code that inductor cannot generate: the rotary as one complex
    multiplication in place on qk, and the deferred normalisation, whose range check reads
    values. In the graph instead, the plain math made folded rmt_s compile 1.5 to 1.6 times as
    long and run 7% slower at batch 8 (docs/performance.md). ``mask`` is the row pass's of a
    decomposed stage (then ``columns_mask`` is the column pass's) or the full pass's. Returns
    the layout the kernels write: (B, W, heads, H, head_dim) decomposed, (B, heads, H, W,
    head_dim) full.
    """
    rotation = complex_rotation(cos, sin) if qk.dtype == torch.float32 else None
    if columns_mask is not None:
        rows, columns = DecayBias(mask, decay, 0), DecayBias(columns_mask, decay, 0)
        tables = PositionTables(cos, sin, rotation, rows=rows, columns=columns, full=None)
        out = manhattan_attention(qk, v, tables, "auto", decomposed=True).permute(0, 2, 3, 1, 4)
    else:
        tables = PositionTables(cos, sin, rotation, None, None, full=DecayBias(mask, decay, grid_width))
        out = manhattan_attention(qk, v, tables, "auto", decomposed=False).permute(0, 3, 1, 2, 4)
    return out.contiguous()  # SDPA (long sequences) may write another layout than the fake declares


@_cpu_manhattan_attention_op.register_fake
def _(qk, v, cos, sin, decay, mask, columns_mask, grid_width):
    b, h, w, n, d = v.shape
    return v.new_empty((b, w, n, h, d) if columns_mask is not None else (b, n, h, w, d))


def _fused_manhattan_attention(
    qk: Tensor, v: Tensor, tables: PositionTables, decomposed: bool, heads_per_program: int = 1,
    num_warps: Optional[int] = None, passes_in_one_program: bool = True, add_to: Optional[Tensor] = None,
) -> Tensor:
    """``manhattan_attention`` on the Triton kernels: a decomposed stage small enough
    (:func:`fused_attention.fits_one_program`, stage 3 at 224 px) in one kernel, one program an
    image and head, other passes one program a sequence and head, the configuration measured
    fastest on Hopper (docs/performance.md). The tuning arguments are for
    scripts/gpu_attention_variants.py, which times them: ``heads_per_program`` and ``num_warps``
    (:func:`fused_attention.decayed_attention`'s), and ``passes_in_one_program=False`` for the
    two passes of the small stages. ``add_to``: :func:`manhattan_attention`'s, one the kernels can
    write (:func:`_kernels_can_write`), into which the last kernel adds."""
    b, h, w, _, n, d = qk.shape
    q, k = qk.unbind(3)
    cos, sin = tables.cos[:, :, :, 0], tables.sin[:, :, :, 0]  # (H, W, 2, head_dim)
    if decomposed and passes_in_one_program and fused_attention.fits_one_program(q, h, w):
        # the row and the column pass share one decay (ManhattanPosition._build)
        return fused_attention.decomposed_decayed_attention(q, k, v, tables.rows.decay, cos, sin, num_warps, add_to)
    if decomposed:
        rows = fused_attention.decayed_attention(
            q, k, v, tables.rows.decay, 0, False, cos, sin, heads_per_program, num_warps
        )  # (B, H, W, heads, d)
        # the column pass reads the same tensors transposed and writes back in (B, H, W) order
        return fused_attention.decayed_attention(
            q.transpose(1, 2), k.transpose(1, 2), rows.transpose(1, 2), tables.columns.decay, 0, True,
            cos.transpose(0, 1), sin.transpose(0, 1), heads_per_program, num_warps, add_to,
        )
    q, k, v = (t.reshape(b, 1, h * w, n, d) for t in (q, k, v))
    cos, sin = cos.reshape(1, h * w, 2, d), sin.reshape(1, h * w, 2, d)
    full = fused_attention.decayed_attention(
        q, k, v, tables.full.decay, w, False, cos, sin, heads_per_program, num_warps,
        None if add_to is None else add_to.view(b, 1, h * w, n, d),
    )
    return full.view(b, h, w, n, d) if add_to is None else add_to


def _kernels_can_write(out: Tensor, qk: Tensor, decomposed: bool) -> bool:
    """Whether the Triton kernels can add into a (B, H, W, heads, head_dim) output: of qk's dtype,
    head_dim contiguous, and for full attention H and W as one axis of H * W tokens."""
    return out.dtype == qk.dtype and out.stride(-1) == 1 and (
        decomposed or out.shape[1] == 1 or out.stride(1) == out.shape[2] * out.stride(2)
    )


def decomposed_attention(q: Tensor, k: Tensor, v: Tensor, tables: PositionTables, kernel: str) -> Tensor:
    """Attention along each row, then along each column of its output, of rotated q and k.

    (B, H, W, heads, head_dim) in and out; the output may be a strided view.
    """
    rows = _attend_sequences(q, k, v, tables.rows, kernel)  # (B, H, heads, W, d)
    # along columns: sequences of length H; values = the row pass output
    columns = _attend_sequences(q.transpose(1, 2), k.transpose(1, 2), rows.permute(0, 3, 1, 2, 4), tables.columns, kernel)
    return columns.permute(0, 3, 1, 2, 4)  # (B, W, heads, H, d) -> (B, H, W, heads, d)


def full_attention(q: Tensor, k: Tensor, v: Tensor, tables: PositionTables, kernel: str) -> Tensor:
    """Attention over all H * W tokens with the 2-D Manhattan decay, of rotated q and k.

    (B, H, W, heads, head_dim) in and out; the output may be a strided view.
    """
    b, h, w, n, d = q.shape
    out = _attend_sequences(*(t.reshape(b, 1, h * w, n, d) for t in (q, k, v)), tables.full, kernel)
    return out.view(b, n, h, w, d).permute(0, 2, 3, 1, 4)


class ManhattanSelfAttention(nn.Module):
    """MaSA on (B, H, W, C) tokens: fused q/k/v projection, theta shift, decayed attention,
    plus LCE (a 5x5 depthwise conv of the values) before the output projection.

    The official code has separate ``q_proj``/``k_proj``/``v_proj``; we fuse q and k into one
    ``qk`` Linear (one matmul, one rotary call for both) and keep ``v`` apart so the LCE conv
    reads a dense tensor. Checkpoint conversion concatenates and splits them.
    """

    def __init__(self, dim: int, num_heads: int, decomposed: bool, kernel: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.decomposed = decomposed
        self.kernel = resolve_attention_kernel(kernel)
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.lce = DepthwiseConvNHWC(dim, 5)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, position: ManhattanPosition) -> Tensor:
        b, h, w, c = x.shape
        qk = call_linear(self.qk, x)
        v = call_linear(self.v, x)
        # FlexAttention's kernels need head_dim >= 16 (all published variants have it)
        kernel = "auto" if self.kernel == "flex" and self.head_dim < 16 else self.kernel
        tables = position.tables(h, w, qk.dtype, with_masks=kernel != "flex")
        # the rotary runs in place on this fresh output, which the projection's backward does not need
        qk = qk.unflatten(-1, (2, self.num_heads, self.head_dim))
        lce = self.lce(v)
        # the attention added into the fresh LCE output (the conv's backward does not need it)
        heads = (self.num_heads, self.head_dim)
        manhattan_attention(qk, v.unflatten(-1, heads), tables, kernel, self.decomposed, add_to=lce.unflatten(-1, heads))
        return call_linear(self.proj, lce)


__all__ = [
    "ATTENTION_KERNELS",
    "DecayBias",
    "ManhattanPosition",
    "ManhattanSelfAttention",
    "PositionTables",
    "complex_rotation",
    "decomposed_attention",
    "full_attention",
    "manhattan_attention",
    "resolve_attention_kernel",
    "rotate_queries_and_keys",
]
