"""Decayed attention over short sequences in Triton kernels, for CUDA inference.

At 224 px every attention pass of RMT is short: the decomposed stages attend along rows and
columns of 56, 28 and 14 tokens, and stage 4 attends over 7 x 7 = 49 tokens. Library attention
kernels tile 64 to 128 queries against 64+ keys and need q, k and v as (batch, heads, L,
head_dim) tensors, so each pass pays for padding, a materialised (heads, L, L) decay mask and
the copies that lay the row and column sequences out. Here one program holds one whole
sequence of one head: it reads q, k and v through their strides (the row pass and the column
pass read the same (B, H, W, heads, head_dim) tensors), computes the decay from the token
indices, and writes its output straight into (B, H, W, heads, head_dim) order. A second kernel
runs both passes of a decomposed stage whose grid is at most 16 x 16 tokens (stage 3 of rmt_s,
rmt_b and rmt_l at 224 px) in one program an image and head, keeping the row pass's output in
the program.

Forward only: the attention kernels of :mod:`rmt.models.attention` choose it when no gradient
is recorded, and keep the differentiable kernels for training.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from rmt.models.kernel_calls import on_the_tensors_gpu, profiler_label

try:
    import triton
    import triton.language as tl
    # TRITON_INTERPRET=1 when the kernel is defined makes it a CPU interpreter taking CPU tensors
    # (how the tests run it without a GPU)
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # CPU-only torch wheels do not ship Triton
    triton = None

MAX_LENGTH = 64  # one program holds an L x L score tile in registers
MAX_ROWS = 128  # tokens (padded to a power of two, at least 16) times heads per program
HEAD_DIMS = (16, 32, 64, 128)  # tl.dot needs >= 16, tl.arange powers of two
# decomposed attention in one program: a head's whole grid, 16 x 16 tokens padded, in registers;
# at 4 warps ptxas spills (sm_90a, head_dim 32; scripts/triton_kernel_registers.py)
MAX_GRID_SIDE = 16
ONE_PROGRAM_WARPS = 8

# How a compiled graph calls the kernels. False (measured, docs/performance.md): as custom
# operators, opaque to inductor, whose Python launch runs in torch's dispatcher on every call.
# True: as ``torch.library.triton_op`` operators, which inductor traces into, launching the
# kernels from its own generated code like its own kernels: no faster on an H200 (session 12,
# docs/performance.md), hence off; scripts/gpu_attention_variants.py's ``+inductor_launches``.
INDUCTOR_LAUNCHES = False


def supports(q: Tensor, length: int) -> bool:
    """Whether the kernel can run attention over ``length``-token sequences of q's shape and device."""
    return (
        triton is not None
        and (q.is_cuda or isinstance(_decayed_attention_kernel, InterpretedFunction))
        and length <= MAX_LENGTH
        and q.shape[-1] in HEAD_DIMS
        and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    )


def _padded_length(length: int) -> int:
    """The tokens of a program's tile: the sequence padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (length - 1).bit_length())


def groups_heads(length: int, heads: int, heads_per_program: int) -> bool:
    """Whether one program can attend ``heads_per_program`` of ``heads`` heads of ``length``-token
    sequences: a power of two dividing the heads, at most :data:`MAX_ROWS` rows of padded tokens
    times heads."""
    p = heads_per_program
    return p >= 1 and p & (p - 1) == 0 and heads % p == 0 and _padded_length(length) * p <= MAX_ROWS


@functools.lru_cache(maxsize=None)
def measured_gpu(device: torch.device) -> bool:
    """Whether ``auto`` may pick the kernel on this GPU: NVIDIA from Ampere (sm80) on, for
    bfloat16 tensor-core products; it was measured on Hopper. Other GPUs (and ROCm) keep the
    library kernels unless ``triton`` is asked for by name."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device) >= (8, 0)


if triton is not None:

    @triton.jit
    def _tile(ptr, batch, group, head, i, d, stride_b, stride_g, stride_l, stride_h):
        """Pointers to the (rows, head_dim) tile of one sequence: row r is token i[r] of head head[r]."""
        return ptr + batch * stride_b + group * stride_g + head[:, None] * stride_h + i[:, None] * stride_l + d[None, :]

    @triton.jit
    def _rotate_by_pairs(x, cos_ptr, sin_ptr, at, mask):
        """The official theta shift of a tile x (..., head_dim) by its channel pairs, in float32:
        (even, odd) -> (even * cos - odd * sin, odd * cos + even * sin). ``at`` (..., head_dim / 2)
        holds the table offsets of each pair's even entry: cos is read there and sin at the odd
        entry beside it (a pair's two cos entries are equal in RMT's tables, its sin entries equal
        but for the sign, the minus folded into the even one). Splitting the tile this way, rather
        than loading it again with its pairs swapped against the full tables, took ptxas from 198
        to 128 registers a thread at stage 1 and made every pass faster on an H100
        (docs/performance.md)."""
        cos = tl.load(cos_ptr + at, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + at + 1, mask=mask, other=0.0).to(tl.float32)
        # the tile's shape with its last axis as (pairs, 2), spelled out for each rank: the shape is
        # a list in Triton 3.2 (where shape + (2,) failed to compile) and a tuple from 3.3
        if len(x.shape) == 2:
            pairs = tl.reshape(x.to(tl.float32), (x.shape[0], x.shape[1] // 2, 2))
        else:
            pairs = tl.reshape(x.to(tl.float32), (x.shape[0], x.shape[1], x.shape[2] // 2, 2))
        even, odd = tl.split(pairs)
        rotated = tl.join(even * cos - odd * sin, odd * cos + even * sin)
        return tl.reshape(rotated, x.shape).to(x.dtype)

    @triton.jit
    def _load(ptr, cos_ptr, sin_ptr, table_offset, batch, group, head, i, d, rows,
              stride_b, stride_g, stride_l, stride_h, table_g, table_l, ROTATE: tl.constexpr):
        """The (rows, head_dim) tile of q, k or v; of q and k rotated (:func:`_rotate_by_pairs`) if ROTATE."""
        x = tl.load(_tile(ptr, batch, group, head, i, d, stride_b, stride_g, stride_l, stride_h), mask=rows, other=0.0)
        if ROTATE:
            pair = tl.arange(0, d.shape[0] // 2)
            at = table_offset + group * table_g + i[:, None] * table_l + 2 * pair[None, :]
            x = _rotate_by_pairs(x, cos_ptr, sin_ptr, at, rows)
        return x

    @triton.jit
    def _store(ptrs, out, mask, ADD: tl.constexpr):
        """Store the float32 ``out`` in the output's dtype; with ADD, added to what is there first,
        as torch adds two tensors of that dtype: ``out`` rounded to it, the sum in float32, rounded."""
        out = out.to(ptrs.dtype.element_ty)
        if ADD:
            out = (out.to(tl.float32) + tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)).to(ptrs.dtype.element_ty)
        tl.store(ptrs, out, mask=mask)

    @triton.jit
    def _softmax_times(scores, v, AXIS: tl.constexpr, IEEE: tl.constexpr):
        """softmax(scores) v over the keys' axis AXIS (the last) of float32 scores, masked keys at
        -inf, normalised after the product (one division a row of the output); float32 out."""
        weights = tl.exp(scores - tl.expand_dims(tl.max(scores, axis=AXIS), AXIS))
        total = tl.sum(weights, axis=AXIS)
        if IEEE:  # fp32 inputs: full fp32 products, as the reference path computes them
            out = tl.dot(weights, v, input_precision="ieee")
        else:
            out = tl.dot(weights.to(v.dtype), v)
        return out / tl.expand_dims(total, AXIS)

    @triton.jit
    def _decayed_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, decay_ptr, cos_ptr, sin_ptr,
        q_strides_b, q_strides_g, q_strides_l, q_strides_h,
        k_strides_b, k_strides_g, k_strides_l, k_strides_h,
        v_strides_b, v_strides_g, v_strides_l, v_strides_h,
        o_strides_b, o_strides_g, o_strides_l, o_strides_h,
        table_strides_g, table_strides_l, table_strides_qk,
        groups, heads, length, grid_width,
        BLOCK_L: tl.constexpr, HEAD_DIM: tl.constexpr, MANHATTAN: tl.constexpr, IEEE: tl.constexpr,
        ROTATE: tl.constexpr, HEADS: tl.constexpr, ADD: tl.constexpr,
    ):
        # one program: one sequence of HEADS heads, as BLOCK_L * HEADS rows, token-major (row r is
        # token r // HEADS of head r % HEADS), so that a token's heads are adjacent in memory and
        # in the tile; scores between rows of different heads are masked out
        program = tl.program_id(0)
        head_blocks = heads // HEADS
        first_head = (program % head_blocks) * HEADS
        group = (program // head_blocks) % groups
        batch = (program // head_blocks // groups).to(tl.int64)  # int64: large batches overflow int32 offsets
        r = tl.arange(0, BLOCK_L * HEADS)
        i = r // HEADS
        head = first_head + r % HEADS
        d = tl.arange(0, HEAD_DIM)
        valid = i < length
        rows = valid[:, None]
        q = _load(q_ptr, cos_ptr, sin_ptr, 0, batch, group, head, i, d, rows,
                  q_strides_b, q_strides_g, q_strides_l, q_strides_h, table_strides_g, table_strides_l, ROTATE)
        k = _load(k_ptr, cos_ptr, sin_ptr, table_strides_qk, batch, group, head, i, d, rows,
                  k_strides_b, k_strides_g, k_strides_l, k_strides_h, table_strides_g, table_strides_l, ROTATE)
        v = _load(v_ptr, cos_ptr, sin_ptr, 0, batch, group, head, i, d, rows,
                  v_strides_b, v_strides_g, v_strides_l, v_strides_h, table_strides_g, table_strides_l, False)
        if IEEE:  # fp32 inputs: full fp32 products, as the reference path computes them
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        if MANHATTAN:
            distance = tl.abs(i[:, None] // grid_width - i[None, :] // grid_width) + tl.abs(
                i[:, None] % grid_width - i[None, :] % grid_width
            )
        else:
            distance = tl.abs(i[:, None] - i[None, :])
        scores += tl.load(decay_ptr + head)[:, None] * distance.to(tl.float32)
        keys = valid[None, :]
        if HEADS > 1:
            keys = keys & (head[:, None] == head[None, :])
        out = _softmax_times(tl.where(keys, scores, float("-inf")), v, 1, IEEE)
        _store(_tile(out_ptr, batch, group, head, i, d, o_strides_b, o_strides_g, o_strides_l, o_strides_h),
               out, rows, ADD)

    @triton.jit
    def _image_tile(ptr, batch, head, y, x, d, stride_b, stride_y, stride_x, stride_h):
        """Pointers to the (len(y), len(x), head_dim) tile of one head of one image: [a, b] is the
        token at (y[a], x[b])."""
        return (ptr + batch * stride_b + head * stride_h + y[:, None, None] * stride_y
                + x[None, :, None] * stride_x + d[None, None, :])

    @triton.jit
    def _load_image(ptr, cos_ptr, sin_ptr, table_offset, batch, head, y, x, d, inside,
                    stride_b, stride_y, stride_x, stride_h, table_y, table_x, ROTATE: tl.constexpr):
        """:func:`_load` for one head's tile of a whole image, (len(y), len(x), head_dim)."""
        t = tl.load(_image_tile(ptr, batch, head, y, x, d, stride_b, stride_y, stride_x, stride_h), mask=inside, other=0.0)
        if ROTATE:
            pair = tl.arange(0, d.shape[0] // 2)
            at = table_offset + y[:, None, None] * table_y + x[None, :, None] * table_x + 2 * pair[None, None, :]
            t = _rotate_by_pairs(t, cos_ptr, sin_ptr, at, inside)
        return t

    @triton.jit
    def _attend_along_lines(q, k, v, decay, length, BLOCK: tl.constexpr, IEEE: tl.constexpr):
        """softmax(q k^T + decay * |i - j|) v along the middle axis of (lines, BLOCK, head_dim) tiles,
        each line a sequence of ``length`` tokens (keys beyond it masked out); float32 out."""
        if IEEE:
            scores = tl.dot(q, tl.permute(k, (0, 2, 1)), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.permute(k, (0, 2, 1)))
        i = tl.arange(0, BLOCK)
        scores += decay * tl.abs(i[:, None] - i[None, :]).to(tl.float32)[None, :, :]
        return _softmax_times(tl.where((i < length)[None, None, :], scores, float("-inf")), v, 2, IEEE)

    @triton.jit
    def _decomposed_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, decay_ptr, cos_ptr, sin_ptr,
        q_strides_b, q_strides_y, q_strides_x, q_strides_h,
        k_strides_b, k_strides_y, k_strides_x, k_strides_h,
        v_strides_b, v_strides_y, v_strides_x, v_strides_h,
        o_strides_b, o_strides_y, o_strides_x, o_strides_h,
        table_strides_y, table_strides_x, table_strides_qk,
        heads, height, width,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
        ROTATE: tl.constexpr, ADD: tl.constexpr,
    ):
        # one program: one head of one image, its whole (BLOCK_H, BLOCK_W, head_dim) grid; the row
        # pass's output stays in the program for the column pass
        program = tl.program_id(0)
        head = program % heads
        batch = (program // heads).to(tl.int64)  # int64: large batches overflow int32 offsets
        y = tl.arange(0, BLOCK_H)
        x = tl.arange(0, BLOCK_W)
        d = tl.arange(0, HEAD_DIM)
        inside = (y < height)[:, None, None] & (x < width)[None, :, None]
        q = _load_image(q_ptr, cos_ptr, sin_ptr, 0, batch, head, y, x, d, inside,
                        q_strides_b, q_strides_y, q_strides_x, q_strides_h, table_strides_y, table_strides_x, ROTATE)
        k = _load_image(k_ptr, cos_ptr, sin_ptr, table_strides_qk, batch, head, y, x, d, inside,
                        k_strides_b, k_strides_y, k_strides_x, k_strides_h, table_strides_y, table_strides_x, ROTATE)
        v = _load_image(v_ptr, cos_ptr, sin_ptr, 0, batch, head, y, x, d, inside,
                        v_strides_b, v_strides_y, v_strides_x, v_strides_h, table_strides_y, table_strides_x, False)
        decay = tl.load(decay_ptr + head)
        # along each row, rounded to the inputs' dtype as the two-pass form stores it between passes
        rows = _attend_along_lines(q, k, v, decay, width, BLOCK_W, IEEE).to(v.dtype)
        # along each column: the tiles transposed to (W, H, head_dim)
        out = _attend_along_lines(tl.permute(q, (1, 0, 2)), tl.permute(k, (1, 0, 2)), tl.permute(rows, (1, 0, 2)),
                                  decay, height, BLOCK_H, IEEE)
        _store(_image_tile(out_ptr, batch, head, x, y, d, o_strides_b, o_strides_x, o_strides_y, o_strides_h),
               out, tl.permute(inside, (1, 0, 2)), ADD)


def decayed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    grid_width: int,
    transpose_out: bool,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    heads_per_program: int = 1,
    num_warps: Optional[int] = None,
    add_to: Optional[Tensor] = None,
) -> Tensor:
    """Softmax attention with the decay ``decay[head] * distance`` over sequences along dim 2 of
    (B, G, L, heads, head_dim) q, k and v (any strides, head_dim contiguous); k is pre-scaled.

    ``grid_width`` 0: the 1-D distance ``|i - j|``; otherwise the Manhattan distance of flattened
    positions on a grid that wide. ``cos`` and ``sin``, (G, L, 2, head_dim) views of the rotary
    tables (q's, then k's): q and k are rotated on loading (the theta shift, fused). The output
    is (B, G, L, heads, head_dim), or (B, L, G, heads, head_dim) if ``transpose_out`` (the column
    pass writing back in row-major image order).

    ``heads_per_program``: how many heads of a sequence one program attends (a power of two
    dividing the heads, at most :data:`MAX_ROWS` rows of tokens times heads). One program per
    head is what was measured on Hopper; grouping heads gives each program whole tokens to load
    and fewer, larger programs, for `scripts/gpu_attention_variants.py` to compare. ``num_warps``:
    the warps per program (default: by tile size, :func:`_warps`), for the same comparison.
    The rotary reads a pair's cos at its even entry and its sin at its odd one
    (:func:`_rotate_by_pairs`), so it needs tables in which a pair's two cos entries are equal and
    its sin entries equal but for the sign, as RMT's are.

    ``add_to``: a tensor of the output's shape and q's dtype (head_dim contiguous, not overlapping
    itself, q, k or v) into which the output is added in place as the kernel stores it, and which
    is returned. RMT adds the attention into its LCE conv's output; this saves that add's launch
    and its passes over memory, with the numbers of ``add_to.add_(output)``.

    Eagerly the kernel is launched directly; a compiled graph calls it as the custom operator
    ``rmt::decayed_attention`` (the operator's dispatch would add CPU time to every eager call,
    and RMT's eager CUDA inference is bound by CPU time per operator at batch 64), or with
    :data:`INDUCTOR_LAUNCHES` as ``rmt::decayed_attention_traceable``, which inductor traces into.
    """
    if torch.compiler.is_compiling():
        # (the operators write a fresh output: one that added into its input would be functionalised
        # into a copy of it)
        op = _graph_operator(_decayed_attention_op, _decayed_attention_traceable_op)
        out = op(q, k, v, decay, grid_width, transpose_out, cos, sin, heads_per_program, num_warps)
        return out if add_to is None else add_to.add_(out)
    with profiler_label("rmt::decayed_attention"):
        return _launch(q, k, v, decay, grid_width, transpose_out, cos, sin, heads_per_program, num_warps, add_to=add_to)


def _launch(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, grid_width: int, transpose_out: bool,
    cos: Optional[Tensor], sin: Optional[Tensor], heads_per_program: int, num_warps: Optional[int],
    traced: bool = False, add_to: Optional[Tensor] = None,
) -> Tensor:
    b, g, length, n, d = q.shape
    out = _output("decayed_attention", q, (b, length, g, n, d) if transpose_out else (b, g, length, n, d), add_to)
    out_view = out.transpose(1, 2) if transpose_out else out
    table_strides = _table_strides("decayed_attention", (q, k, v, out_view), cos, sin, "(G, L, 2, head_dim)", (g, length, 2, d))
    block = _padded_length(length)
    if not groups_heads(length, n, heads_per_program):
        raise ValueError(f"decayed_attention cannot give {heads_per_program} of {n} heads of {length} tokens to one program")
    kernel = torch.library.wrap_triton(_decayed_attention_kernel) if traced else _decayed_attention_kernel
    with on_the_tensors_gpu(q):
        kernel[(b * g * (n // heads_per_program),)](
            q, k, v, out_view, decay.float().contiguous(), q if cos is None else cos, q if sin is None else sin,
            *(s for t in (q, k, v, out_view) for s in t.stride()[:4]),
            *table_strides,
            g, n, length, grid_width,
            BLOCK_L=block, HEAD_DIM=d, MANHATTAN=grid_width > 0, IEEE=q.dtype == torch.float32,
            ROTATE=cos is not None, HEADS=heads_per_program, ADD=add_to is not None,
            num_warps=num_warps or _warps(block * heads_per_program, d),
        )
    return out


def _output(name: str, q: Tensor, shape: tuple[int, ...], add_to: Optional[Tensor]) -> Tensor:
    """A kernel's output: a fresh tensor, or ``add_to`` (its shape, q's dtype and device checked)."""
    if add_to is None:
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    if add_to.shape != shape or add_to.dtype != q.dtype or add_to.device != q.device:
        raise ValueError(f"{name} adds into a {tuple(shape)} tensor of q's dtype and device, got "
                         f"{tuple(add_to.shape)} {add_to.dtype} on {add_to.device}")
    return add_to


def _table_strides(
    name: str, tensors: tuple[Tensor, ...], cos: Optional[Tensor], sin: Optional[Tensor], layout: str,
    table_shape: tuple[int, ...],
) -> tuple[int, int, int]:
    """The first three strides of the rotary tables (zeros without them), after checking what the
    kernels assume: both tables or neither, of one layout, head_dim contiguous everywhere."""
    if (cos is None) != (sin is None):
        raise ValueError(f"{name} needs both cos and sin, or neither")
    if cos is not None and (cos.stride() != sin.stride() or cos.shape != table_shape):
        raise ValueError(f"{name} needs cos and sin as {layout} views of one layout")
    if any(t.stride(-1) != 1 for t in tensors + (() if cos is None else (cos, sin))):
        raise ValueError(f"{name} needs head_dim contiguous")
    return (0, 0, 0) if cos is None else cos.stride()[:3]


def _warps(rows: int, head_dim: int) -> int:
    """Warps per program: 2 for small tiles, 4 from a 64 x 32 tile, 8 for the 128-row score tiles
    of grouped heads (128 x 128 float32 scores are 64 registers a thread at 8 warps). The rule
    measured for one head per program; at 2 warps a 64-token tile of head_dim 16 takes 128
    registers a thread for sm90 (ptxas, scripts/triton_kernel_registers.py), and ``num_warps``
    compares other counts."""
    return 8 if rows >= 128 else 4 if rows * head_dim >= 64 * 32 else 2


def decomposed_decayed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
    num_warps: Optional[int] = None,
    add_to: Optional[Tensor] = None,
) -> Tensor:
    """Both passes of decomposed attention in one kernel: attention with the decay
    ``decay[head] * |i - j|`` along each row of (B, H, W, heads, head_dim) q, k and v (k
    pre-scaled, any strides, head_dim contiguous), then along each column of its output, with
    one decay for both passes as RMT's tables have: what the two calls of
    :func:`decayed_attention` in ``_fused_manhattan_attention`` compute.

    One program attends one head of one image, its whole grid, so the row pass's output never
    leaves it: q, k and v are read once (q and k rotated once, not once a pass) and the output
    written once, in one launch, where the two-pass form also writes and reads back the row
    pass's output and reads q and k twice. For grids of at most :data:`MAX_GRID_SIDE` tokens a
    side (:func:`fits_one_program`; stage 3 at 224 px is 14 x 14, decomposed in all variants
    but rmt_t). ``cos`` and ``sin``: (H, W, 2, head_dim) views of the rotary tables (q's, then
    k's). Returns (B, H, W, heads, head_dim), or ``add_to`` with the output added into it
    (:func:`decayed_attention`).
    """
    if torch.compiler.is_compiling():
        op = _graph_operator(_decomposed_attention_op, _decomposed_attention_traceable_op)
        out = op(q, k, v, decay, cos, sin, num_warps)
        return out if add_to is None else add_to.add_(out)
    with profiler_label("rmt::decomposed_decayed_attention"):
        return _launch_decomposed(q, k, v, decay, cos, sin, num_warps, add_to=add_to)


def _launch_decomposed(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
    num_warps: Optional[int], traced: bool = False, add_to: Optional[Tensor] = None,
) -> Tensor:
    b, h, w, n, d = q.shape
    if max(h, w) > MAX_GRID_SIDE:
        raise ValueError(f"decomposed_decayed_attention takes grids of at most {MAX_GRID_SIDE} tokens a side, got {h} x {w}")
    out = _output("decomposed_decayed_attention", q, (b, h, w, n, d), add_to)
    table_strides = _table_strides("decomposed_decayed_attention", (q, k, v, out), cos, sin, "(H, W, 2, head_dim)", (h, w, 2, d))
    kernel = torch.library.wrap_triton(_decomposed_attention_kernel) if traced else _decomposed_attention_kernel
    with on_the_tensors_gpu(q):
        kernel[(b * n,)](
            q, k, v, out, decay.float().contiguous(), q if cos is None else cos, q if sin is None else sin,
            *(s for t in (q, k, v, out) for s in t.stride()[:4]),
            *table_strides,
            n, h, w,
            BLOCK_H=_padded_length(h), BLOCK_W=_padded_length(w), HEAD_DIM=d, IEEE=q.dtype == torch.float32,
            ROTATE=cos is not None, ADD=add_to is not None, num_warps=num_warps or ONE_PROGRAM_WARPS,
        )
    return out


def fits_one_program(q: Tensor, height: int, width: int) -> bool:
    """Whether :func:`decomposed_decayed_attention` runs an ``height`` x ``width`` grid of q's
    head_dim, dtype and device."""
    return max(height, width) <= MAX_GRID_SIDE and supports(q, max(height, width))


@torch.library.custom_op("rmt::decayed_attention", mutates_args=())
def _decayed_attention_op(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, grid_width: int, transpose_out: bool,
    cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, heads_per_program: int = 1,
    num_warps: Optional[int] = None,
) -> Tensor:
    return _launch(q, k, v, decay, grid_width, transpose_out, cos, sin, heads_per_program, num_warps)


@_decayed_attention_op.register_fake
def _(q, k, v, decay, grid_width, transpose_out, cos=None, sin=None, heads_per_program=1, num_warps=None):
    b, g, length, n, d = q.shape
    return q.new_empty((b, length, g, n, d) if transpose_out else (b, g, length, n, d))


@torch.library.custom_op("rmt::decomposed_decayed_attention", mutates_args=())
def _decomposed_attention_op(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None,
    num_warps: Optional[int] = None,
) -> Tensor:
    return _launch_decomposed(q, k, v, decay, cos, sin, num_warps)


@_decomposed_attention_op.register_fake
def _(q, k, v, decay, cos=None, sin=None, num_warps=None):
    return q.new_empty(q.shape)


# the operators of INDUCTOR_LAUNCHES: each traces into its launch, where ``wrap_triton`` puts the
# kernel call in the graph; the function also serves as the operator's fake
@torch.library.triton_op("rmt::decayed_attention_traceable", mutates_args=())
def _decayed_attention_traceable_op(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, grid_width: int, transpose_out: bool,
    cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, heads_per_program: int = 1,
    num_warps: Optional[int] = None,
) -> Tensor:
    return _launch(q, k, v, decay, grid_width, transpose_out, cos, sin, heads_per_program, num_warps, traced=True)


@torch.library.triton_op("rmt::decomposed_decayed_attention_traceable", mutates_args=())
def _decomposed_attention_traceable_op(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None,
    num_warps: Optional[int] = None,
) -> Tensor:
    return _launch_decomposed(q, k, v, decay, cos, sin, num_warps, traced=True)


def _graph_operator(custom_op: Callable, traceable_op: Callable) -> Callable:
    """The operator a compiled graph calls, by :data:`INDUCTOR_LAUNCHES`."""
    return traceable_op if INDUCTOR_LAUNCHES else custom_op


__all__ = [
    "MAX_GRID_SIDE",
    "MAX_LENGTH",
    "MAX_ROWS",
    "decayed_attention",
    "decomposed_decayed_attention",
    "fits_one_program",
    "groups_heads",
    "measured_gpu",
    "supports",
]
