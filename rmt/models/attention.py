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
* ``"auto"`` (default): the fastest measured for RMT's short sequences: SDPA on the CPU; on CUDA
  SDPA with the memory-efficient backend first (torch prefers cuDNN, 1.5x slower here), and under
  ``torch.compile`` the reference math, which inductor fuses (rmt_s 15.4 ms against 22.2 ms
  with cuDNN SDPA, batch 64 bf16, two runs on H200 machines).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_KERNELS = ("auto", "sdpa", "reference", "flex")


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
    decay: Tensor
    grid_width: int


@dataclass(frozen=True)
class PositionTables:
    """Everything the attention of one stage needs for one (height, width, device, dtype)."""

    cos: Tensor  # (H, W, head_dim)
    sin: Tensor  # (H, W, head_dim), the sign of the pair rotation folded in
    rotation: Optional[Tensor]  # (H, W, head_dim / 2) complex e^(i angle), float32 tables only
    rows: Optional[DecayBias]  # decomposed stages: attention along each row (sequence = width)
    columns: Optional[DecayBias]  # decomposed stages: attention along each column (sequence = height)
    full: Optional[DecayBias]  # other stages: attention over all H * W tokens


class ManhattanPosition(nn.Module):
    """Rotary tables and decay masks of one stage, built once per input size and reused.

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

    def official_buffers(self) -> dict[str, Tensor]:
        """``angle`` and ``decay`` as the official ``Relpos`` module computes them (fp32, CPU)."""
        with torch.device("cpu"):
            angle = 1.0 / (10000 ** torch.linspace(0, 1, self.dim // self.num_heads // 2))
            heads = torch.arange(self.num_heads, dtype=torch.float)
            decay = torch.log(1 - 2 ** (-self.decay_init - self.decay_heads_range * heads / self.num_heads))
        return {"angle": angle.unsqueeze(-1).repeat(1, 2).flatten(), "decay": decay}

    def _apply(self, fn, recurse=True):  # .to() / .cuda() / .half(): tables follow the buffers
        self._cache = {}
        return super()._apply(fn, recurse)

    def tables(self, height: int, width: int, dtype: torch.dtype, with_masks: bool) -> PositionTables:
        key = (height, width, dtype, with_masks)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if torch.compiler.is_compiling():  # a compiled graph folds the tables into constants
            return self._build(height, width, dtype, with_masks)
        # normal tensors even when first called under inference_mode, so that the cached tables
        # also serve a later training step
        with torch.inference_mode(False), torch.no_grad():
            tables = self._build(height, width, dtype, with_masks)
        if len(self._cache) >= self._MAX_CACHED_SIZES:
            self._cache.clear()
        self._cache[key] = tables
        return tables

    def _build(self, height: int, width: int, dtype: torch.dtype, with_masks: bool) -> PositionTables:
        decay = self.decay  # float32: the official code computes all tables in float32
        index = torch.arange(height * width, device=decay.device, dtype=decay.dtype)
        phase = index[:, None] * self.angle[None, :]
        cos, sin = torch.cos(phase), torch.sin(phase)
        # each pair is rotated by the same angle: as complex numbers, one multiplication
        rotation = torch.complex(cos[:, 0::2], sin[:, 0::2]).reshape(height, width, -1) if dtype == torch.float32 else None
        # rotate_every_two(x) * sin == swap_pairs(x) * sin_signed, with the pair's minus sign folded in
        sin = (sin.unflatten(-1, (-1, 2)) * torch.tensor([-1.0, 1.0], device=decay.device)).flatten(-2)
        cos = cos.reshape(height, width, -1).to(dtype)
        sin = sin.reshape(height, width, -1).to(dtype)

        def bias(distance: Optional[Tensor], grid_width: int) -> DecayBias:
            mask = None
            if with_masks and distance is not None:
                mask = (distance * decay[:, None, None]).unsqueeze(0).to(dtype)
            return DecayBias(mask, decay.to(dtype), grid_width)

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


def apply_rotary(x: Tensor, tables: PositionTables) -> Tensor:
    """The official theta shift, ``x * cos + rotate_every_two(x) * sin``, on (B, H, W, ..., head_dim).

    In float32 eager mode the interleaved pairs are viewed as complex numbers and rotated by one
    complex multiplication (several times faster on the CPU than the swap, two products and a
    sum); other dtypes and compiled graphs, which fuse the real form, use cos and sin.
    """
    extra = x.dim() - 3  # dims between (B, H, W) and head_dim broadcast over the tables
    if tables.rotation is not None and x.dtype == torch.float32 and not torch.compiler.is_compiling():
        rotation = tables.rotation.reshape(tables.rotation.shape[:2] + (1,) * (extra - 1) + tables.rotation.shape[-1:])
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rotation).flatten(-2)
    shape = tables.cos.shape[:2] + (1,) * (extra - 1) + tables.cos.shape[-1:]
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * tables.cos.reshape(shape) + swapped * tables.sin.reshape(shape)


# --- kernels: (q, k, v, bias) -> out, all (batch, heads, L, head_dim); scale head_dim ** -0.5 ---


def _attend_reference(q: Tensor, k: Tensor, v: Tensor, bias: DecayBias) -> Tensor:
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    scores = scores + bias.mask
    return torch.softmax(scores, dim=-1) @ v


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, bias: DecayBias) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.mask)


@functools.lru_cache(maxsize=1)
def _efficient_first() -> Callable[[], contextlib.AbstractContextManager]:
    """A context giving SDPA's memory-efficient backend priority over cuDNN (torch >= 2.6)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:
        return functools.partial(sdpa_kernel, order, set_priority=True)
    return functools.partial(sdpa_kernel, [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _attend_auto(q: Tensor, k: Tensor, v: Tensor, bias: DecayBias) -> Tensor:
    if not q.is_cuda:
        return _attend_sdpa(q, k, v, bias)
    if torch.compiler.is_compiling():
        return _attend_reference(q, k, v, bias)
    with _efficient_first()():
        return _attend_sdpa(q, k, v, bias)


def _decay_score_mod(bias: DecayBias) -> Callable:
    decay, grid_width = bias.decay, bias.grid_width

    if grid_width:

        def score_mod(score, b, h, q_idx, kv_idx):
            dh = (q_idx // grid_width - kv_idx // grid_width).abs()
            dw = (q_idx % grid_width - kv_idx % grid_width).abs()
            return score + decay[h] * (dh + dw).to(score.dtype)

    else:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + decay[h] * (q_idx - kv_idx).abs().to(score.dtype)

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
    return flex_attention(q, k, v, score_mod=_decay_score_mod(bias))


_KERNELS: dict[str, Callable[[Tensor, Tensor, Tensor, DecayBias], Tensor]] = {
    "auto": _attend_auto,
    "reference": _attend_reference,
    "sdpa": _attend_sdpa,
    "flex": _attend_flex,
}


def decomposed_attention(q: Tensor, k: Tensor, v: Tensor, tables: PositionTables, kernel: str) -> Tensor:
    """Attention along each row, then along each column of its output; (B, H, W, n, d) in and out."""
    attend = _KERNELS[kernel]
    b, h, w, n, d = q.shape
    # along rows: sequences of length W, one per (image, row)
    rows = [t.permute(0, 1, 3, 2, 4).reshape(b * h, n, w, d) for t in (q, k, v)]
    out = attend(*rows, tables.rows).reshape(b, h, n, w, d)
    # along columns: sequences of length H, one per (image, column); values = the row pass output
    q_c, k_c = (t.permute(0, 2, 3, 1, 4).reshape(b * w, n, h, d) for t in (q, k))
    v_c = out.permute(0, 3, 2, 1, 4).reshape(b * w, n, h, d)
    out = attend(q_c, k_c, v_c, tables.columns)
    return out.reshape(b, w, n, h, d).permute(0, 3, 1, 2, 4)


def full_attention(q: Tensor, k: Tensor, v: Tensor, tables: PositionTables, kernel: str) -> Tensor:
    """Attention over all H * W tokens with the 2-D Manhattan decay; (B, H, W, n, d) in and out."""
    b, h, w, n, d = q.shape
    q, k, v = (t.reshape(b, h * w, n, d).transpose(1, 2) for t in (q, k, v))
    out = _KERNELS[kernel](q, k, v, tables.full)
    return out.transpose(1, 2).reshape(b, h, w, n, d)


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
        self.lce = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, position: ManhattanPosition) -> Tensor:
        b, h, w, c = x.shape
        qk = self.qk(x)
        v = self.v(x)
        # FlexAttention's kernels need head_dim >= 16 (all published variants have it)
        kernel = "auto" if self.kernel == "flex" and self.head_dim < 16 else self.kernel
        tables = position.tables(h, w, qk.dtype, with_masks=kernel != "flex")
        qk = apply_rotary(qk.unflatten(-1, (2, self.num_heads, self.head_dim)), tables)
        q, k = qk.unbind(3)
        attention = decomposed_attention if self.decomposed else full_attention
        out = attention(q, k, v.unflatten(-1, (self.num_heads, self.head_dim)), tables, kernel)
        lce = self.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(lce.add_(out.reshape(b, h, w, c)))


__all__ = [
    "ATTENTION_KERNELS",
    "DecayBias",
    "ManhattanPosition",
    "ManhattanSelfAttention",
    "PositionTables",
    "apply_rotary",
    "decomposed_attention",
    "full_attention",
    "resolve_attention_kernel",
]
