"""Which attention kernel is fastest for RMT's short sequences on CUDA?

Times one Manhattan self-attention call, from the projections on: the rotary of q and k, then
both passes for decomposed stages, at the shapes of rmt_s at 224x224, batch 64, bf16, for:
- the Triton kernels as the model runs them (``triton``: stage 3's passes in one program an
  image and head, the others one program a sequence and head, the rotary fused), and the
  two-pass kernel with 4 and 8 warps (``triton_w4``, ``triton_w8``; the default is 2 or 4 by
  tile size), with a sequence's heads grouped two, four or eight to a program
  (``triton_heads2``...), and at stage 3 in two passes (``triton_two_passes``), and the
  one-program kernel with 16 warps (``triton_one_program_w16``);
- for stage 3, both passes as SDPA calls over the whole grid with row and column masks
  (``sdpa_masked_grid``, eagerly and compiled);
- SDPA as dispatched (cuDNN on Hopper), SDPA forced to the memory-efficient backend, the plain
  reference path eagerly and compiled, and (--flex) FlexAttention compiled with its default and
  with small tiles.
Every timed call starts with one copy of the stacked q/k projection, which the rotary then
overwrites (as in the model). Every stage's uncompiled variants run before the compiled ones, so
a short budget reaches every stage's Triton launches. Then, inside the time budget, whole models
(``--models``; ``--reparam`` folds the RMT models first), each with a variant of its attention
(``use_variant``: a kernel, then changes such as ``+two_passes``): eager rmt_s as it runs, with
its depthwise convs in the Triton kernel of ``rmt.models.depthwise_conv``, with
grouped heads, with stage 3 in two passes, with SDPA with and without the masked grid at stage 3,
and on the plain path, beside Swin-T; then the compiled models of COMPILED_MODELS. Those compile
in processes of their own, all at once (one took about 80 s on an H100 alone; 7 at once took
64-169 s each on an H200, 16 at once 182-254 s on an H100), with ``--alongside`` (the GPU tests)
beside them; then they are timed one at a time, in interleaved rounds, and the profiled ones
report their GPU time by kernel kind. The launch configurations inductor picks by timing kernels
on their first call are picked while the others compile: a study's caveat. Results go to
OUT/attention.json.

    OUT=runs/attn python scripts/gpu_attention_variants.py --budget 150
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

import rmt.models.attention as attention
from rmt.errors import first_line
from rmt.models import depthwise_conv, fused_attention
from rmt.models.attention import ManhattanPosition, manhattan_attention
from rmt.models.layers import DepthwiseConvNHWC

STAGES = {  # rmt_s at 224: (H, W, heads, head_dim, decomposed)
    "stage1": (56, 56, 4, 16, True),
    "stage2": (28, 28, 4, 32, True),
    "stage3": (14, 14, 8, 32, True),
    "stage4": (7, 7, 16, 32, False),
}


def groupings(length: int, heads: int) -> list[int]:
    """The heads-per-program counts above one that the Triton kernel takes for these sequences."""
    return [p for p in (2, 4, 8, 16) if fused_attention.groups_heads(length, heads, p)]


def widest_grouping(qk, v, tables, decomposed, add_to=None, *, fused):
    """``_fused_manhattan_attention`` with as many heads per program as the kernel takes."""
    h, w, n = qk.shape[1], qk.shape[2], qk.shape[4]
    widest = groupings(max(h, w) if decomposed else h * w, n)
    return fused(qk, v, tables, decomposed, widest[-1] if widest else 1, add_to=add_to)


def lce_added_apart(qk, v, tables, decomposed, add_to=None, *, fused):
    """``_fused_manhattan_attention`` writing a fresh output, which is then added into the LCE
    conv's output by an add of its own: as before the kernels added it as they stored it."""
    out = fused(qk, v, tables, decomposed)
    return out if add_to is None else add_to.add_(out)


# decomposed stages of at most this many tokens take the masked-grid form in the "masked_grid"
# variants (stage 3 at 224 px, 196 tokens; stage 2's 784 would multiply the attention's work by 28)
MASKED_GRID_MAX_TOKENS = 256
_grid_masks_cache: dict = {}


def grid_masks(decay: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and the column pass of a decomposed stage as attention masks over the whole H x W
    grid, (1, heads, H*W, H*W): ``decay * distance`` between tokens of the same row (column),
    -inf between others. Cached per stage in eager code (by the address of the stage's decay,
    which its cached tables hold: clear the cache for each new model); a compiled graph computes
    them itself."""
    if torch.compiler.is_compiling():
        return _build_grid_masks(decay, h, w, dtype)
    key = (decay.data_ptr(), h, w, dtype)
    if key not in _grid_masks_cache:
        _grid_masks_cache[key] = _build_grid_masks(decay, h, w, dtype)
    return _grid_masks_cache[key]


def _build_grid_masks(decay: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    y, x = (t.flatten() for t in torch.meshgrid(torch.arange(h, device=decay.device),
                                                torch.arange(w, device=decay.device), indexing="ij"))

    def mask(along: torch.Tensor, line: torch.Tensor) -> torch.Tensor:
        scores = decay.float()[:, None, None] * (along[:, None] - along[None, :]).abs()
        return scores.masked_fill(line[:, None] != line[None, :], float("-inf")).unsqueeze(0).to(dtype)

    return mask(x, y), mask(y, x)


def decomposed_as_masked_grid(q, k, v, tables, kernel, *, decomposed_attention):
    """``attention.decomposed_attention`` with each pass as one SDPA call over the whole grid of a
    small stage (at most MASKED_GRID_MAX_TOKENS tokens): the decomposed passes as full attention
    masked to the row or column, W (H) times the multiply-adds of the passes, in one library
    kernel call on sequences of H*W tokens instead of many of H or W. Larger stages as
    ``decomposed_attention``."""
    b, h, w, n, d = q.shape
    if h * w > MASKED_GRID_MAX_TOKENS:
        return decomposed_attention(q, k, v, tables, kernel)
    rows_mask, columns_mask = grid_masks(tables.rows.decay, h, w, q.dtype)
    q, k, v = (t.reshape(b, h * w, n, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, H*W, d) views
    rows = F.scaled_dot_product_attention(q, k, v, attn_mask=rows_mask, scale=1.0)  # k arrives scaled
    out = F.scaled_dot_product_attention(q, k, rows, attn_mask=columns_mask, scale=1.0)
    return out.transpose(1, 2).unflatten(1, (h, w))


def time_ms(fn, warmup: int = 5, reps: int = 30) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # dry runs of the script on a CPU
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1000
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def flex_with(block: int):
    compiled = torch.compile(flex_attention, dynamic=False)

    def attend(q, k, v, bias):
        options = {"BLOCK_M": block, "BLOCK_N": block} if block else None
        # k arrives scaled (the scale rides in its rotary table), as for the library's own kernels
        return compiled(q, k, v, score_mod=attention._decay_score_mod(bias), scale=1.0, kernel_options=options)

    return attend


def _stage_variants(h: int, w: int, n: int, d: int, decomposed: bool, *, batch: int, dev: torch.device,
                    dtype: torch.dtype, flex: bool) -> tuple[dict, torch.Tensor]:
    """The timed calls of one stage's attention, by variant name, and the float32 result."""
    torch.manual_seed(0)
    qk = torch.randn(batch, h, w, 2, n, d, device=dev, dtype=dtype)
    v = torch.randn(batch, h, w, n, d, device=dev, dtype=dtype)
    work = torch.empty_like(qk)
    position = ManhattanPosition(n * d, n, 2.0, 6.0 if n >= 8 else 4.0, decomposed).to(dev)
    tables = position.tables(h, w, dtype, with_masks=True)
    reference = manhattan_attention(qk.float().clone(), v.float(), position.tables(h, w, torch.float32, True),
                                    "reference", decomposed)

    def run(kernel: str) -> torch.Tensor:
        return manhattan_attention(work.copy_(qk), v, tables, kernel, decomposed)

    def fused(heads_per_program: int, num_warps: int | None = None, passes_in_one_program: bool = False) -> torch.Tensor:
        return attention._fused_manhattan_attention(work.copy_(qk), v, tables, decomposed, heads_per_program, num_warps,
                                                    passes_in_one_program)

    def masked_grid() -> torch.Tensor:
        q, k = attention.rotate_queries_and_keys(work.copy_(qk), tables, inplace=True).unbind(3)
        return decomposed_as_masked_grid(q, k, v, tables, "sdpa", decomposed_attention=attention.decomposed_attention)

    one_program = decomposed and fused_attention.fits_one_program(qk, h, w)
    # "triton" as the model runs it (stage 3: both passes in one program); the others vary the
    # two-pass kernel, or the one-program kernel's warps
    variants = {
        "triton": lambda: run("triton"),
        **({"triton_two_passes": functools.partial(fused, 1), "triton_one_program_w16": functools.partial(fused, 1, 16, True)}
           if one_program else {}),
        **{f"triton_w{warps}": functools.partial(fused, 1, warps) for warps in (4, 8)},
        **{f"triton_heads{p}": functools.partial(fused, p) for p in groupings(max(h, w) if decomposed else h * w, n)},
        "sdpa": lambda: run("sdpa"),
        "sdpa_efficient": lambda: _with_backend(SDPBackend.EFFICIENT_ATTENTION, run),
        **({"sdpa_masked_grid": lambda: masked_grid(), "sdpa_masked_grid_compiled": torch.compile(lambda: masked_grid())}
           if decomposed and h * w <= MASKED_GRID_MAX_TOKENS else {}),
        "reference": lambda: run("reference"),
        "reference_compiled": torch.compile(lambda: run("reference")),
    }
    for block in (0, 64, 32, 16) if flex else ():
        if block and block > 2 * max(h, w):
            continue
        attention._KERNELS[f"flex{block}"] = attention._Kernel(flex_with(block))
        variants[f"flex_compiled_b{block or 'default'}"] = functools.partial(run, f"flex{block}")
    return variants, reference


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the kernels and the eager models")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--flex", action="store_true", help="also FlexAttention with several tile sizes (slow to compile)")
    parser.add_argument("--models", action="store_true", help="then whole models: eager, then compiled")
    parser.add_argument("--model-batches", type=int, nargs="+", help="the eager models' batches (default: --batch)")
    parser.add_argument("--reparam", action="store_true", help="fold the RMT models for inference first")
    parser.add_argument("--compiled", nargs="+", choices=list(COMPILED_MODELS), metavar="LABEL",
                        help=f"which compiled models (default: all of {', '.join(COMPILED_MODELS)})")
    parser.add_argument("--compile-timeout", type=float, default=300.0, help="seconds for the compiled models to be ready")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds of the compiled models")
    parser.add_argument("--alongside", help="a shell command to run while the models compile (the GPU tests); "
                                            "the compiled models are timed after it ends")
    parser.add_argument("--serve", choices=list(COMPILED_MODELS), help=argparse.SUPPRESS)  # one compiled model's process
    args = parser.parse_args()
    args.model_batches = args.model_batches or [args.batch]
    if args.serve:
        return serve(args.serve, args)
    out = Path(os.environ.get("OUT", "runs/attn"))
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    dev, dtype = torch.device(args.device), torch.bfloat16
    results: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "batch": args.batch,
                     "torch": torch.__version__, "reparam": args.reparam, "stages": {}, "models": {},
                     "compiled_models": {}}
    stages = {stage: _stage_variants(*shape, batch=args.batch, dev=dev, dtype=dtype, flex=args.flex)
              for stage, shape in STAGES.items()}
    # uncompiled first, then what compiles (slow to start), so that a short budget still reaches
    # every stage's Triton launches and the eager models
    _time_stages(stages, False, results, args.budget, out)
    if args.models:
        _time_eager_models(args, results, args.budget - (time.perf_counter() - begin), out)
    _time_stages(stages, True, results, args.budget - (time.perf_counter() - begin), out)
    if args.models:
        _time_compiled_models(args, results, out)


def _time_stages(stages: dict, compiled: bool, results: dict, budget: float, out: Path) -> None:
    begin = time.perf_counter()
    for stage, (variants, reference) in stages.items():
        row = results["stages"].setdefault(stage, {})
        for name, fn in variants.items():
            if ("compiled" in name) != compiled:
                continue
            if time.perf_counter() - begin > budget:
                row[name] = "skipped (budget)"
                continue
            try:
                result = fn()
                err = ((result.float() - reference).norm() / reference.norm()).item()
                row[name] = {"ms": round(time_ms(fn), 4), "rel_err_vs_fp32": round(err, 5)}
            except Exception as e:  # record and go on
                row[name] = f"error: {type(e).__name__}: {first_line(e)[:200]}"
            print(stage, name, row[name], flush=True)
        (out / "attention.json").write_text(json.dumps(results, indent=1))


# whole models, (name, variant): a variant is an attention kernel ("auto", "triton", "sdpa",
# "reference": the official-style plain path), then "+"-joined changes to it (VARIANT_CHANGES);
# swin_t has none. Eager models run in this process; compiled ones each in a process of their
# own (COMPILED_MODELS).
EAGER_MODELS = [("swin_t", None), ("rmt_s", "auto"), ("rmt_s", "auto+triton_dwconv"), ("rmt_s", "auto+lce_add_apart"),
                ("rmt_s", "auto+grouped"), ("rmt_s", "auto+two_passes"), ("rmt_s", "sdpa"), ("rmt_s", "sdpa+masked_grid"),
                ("rmt_s", "reference")]
# "grouped": each two-pass Triton launch groups as many heads a program as it takes (stage 3, in
# one program an image and head, is grouped with "+two_passes" only); "lce_add_apart": the Triton
# kernels write a fresh output, added into the LCE conv's output by a launch of its own (as before
# they added it as they stored it); "two_passes": the
# small decomposed stages in two Triton launches instead of one program an image and head;
# "masked_grid": stage 3 as masked-grid SDPA calls where the Triton kernels do not run (eager
# "sdpa"; compiled "auto"). Compiled only: "inductor_launches", the Triton kernels launched by
# inductor (fused_attention.INDUCTOR_LAUNCHES); "traced_tables", the rotary tables and decay
# computed in the graph on every pass, as before they became its constants (the model's
# ``attention._fixed_size`` answering no); "dwconv_as_window_sums", the depthwise convs as sums over
# each token's window, which inductor fuses with their neighbours where a conv is a cuDNN call.
# Eager and compiled: "triton_dwconv", the depthwise convs in rmt.models.depthwise_conv's Triton
# kernel (its ENABLED), one launch a conv with its bias, where cuDNN's takes two.
VARIANT_CHANGES = ("grouped", "lce_add_apart", "two_passes", "masked_grid", "inductor_launches", "traced_tables",
                   "dwconv_as_window_sums", "triton_dwconv")
TRITON_PATH, BY_LINES = attention._fused_manhattan_attention, attention.decomposed_attention
FIXED_SIZE_CHECK, DEPTHWISE_CONV_FORWARD = attention._fixed_size, DepthwiseConvNHWC.forward


def depthwise_conv_as_window_sums(self: DepthwiseConvNHWC, x: torch.Tensor) -> torch.Tensor:
    """``DepthwiseConvNHWC.forward``, (B, H, W, C) tokens, as each token's k x k window times the
    channel's weights, summed: a reduction inductor generates itself and can fuse with the ops
    around it, where a conv is a library call of its own. The conv's bias, and its identity once
    folded, are in its parameters as they are. (As one sum of k * k shifted products instead,
    rmt_t compiled in 96 s on a 2-core CPU, against 25 s.)"""
    k = self.kernel_size[0]
    # as the conv under autocast: inputs and weights in autocast's dtype, float32 sums, a result
    # in autocast's dtype (a layer norm's float32 output included)
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    windows = F.pad(x.to(dtype), (0, 0, k // 2, k // 2, k // 2, k // 2)).unfold(1, k, 1).unfold(2, k, 1)  # (B, H, W, C, k, k)
    out = (windows.float() * self.weight.to(dtype).float().view(-1, k, k)).sum((-2, -1))
    return (out + self.bias.to(dtype).float() if self.bias is not None else out).to(dtype)


def use_variant(variant: str) -> str:
    """Point the attention module at a variant's functions; returns its attention kernel."""
    kernel, *changes = variant.split("+")
    unknown = sorted(set(changes) - set(VARIANT_CHANGES))
    if kernel not in attention.ATTENTION_KERNELS or unknown:
        raise SystemExit(f"unknown variant {variant!r}: a kernel of {attention.ATTENTION_KERNELS}, then + any of {VARIANT_CHANGES}")
    if {"dwconv_as_window_sums", "triton_dwconv"} <= set(changes):
        raise SystemExit(f"variant {variant!r}: the depthwise convs as window sums or in Triton, not both")
    depthwise_conv.ENABLED = "triton_dwconv" in changes
    fused_attention.INDUCTOR_LAUNCHES = "inductor_launches" in changes
    attention._fixed_size = (lambda size: False) if "traced_tables" in changes else FIXED_SIZE_CHECK
    DepthwiseConvNHWC.forward = (depthwise_conv_as_window_sums if "dwconv_as_window_sums" in changes
                                 else DEPTHWISE_CONV_FORWARD)
    fused = functools.partial(TRITON_PATH, passes_in_one_program="two_passes" not in changes)
    if "grouped" in changes:
        fused = functools.partial(widest_grouping, fused=fused)
    if "lce_add_apart" in changes:
        fused = functools.partial(lce_added_apart, fused=fused)
    attention._fused_manhattan_attention = fused
    attention.decomposed_attention = (functools.partial(decomposed_as_masked_grid, decomposed_attention=BY_LINES)
                                      if "masked_grid" in changes else BY_LINES)
    _grid_masks_cache.clear()  # keyed by the address of a stage's decay, which a new model may reuse
    return kernel


def restore_attention() -> None:
    attention._fused_manhattan_attention, attention.decomposed_attention = TRITON_PATH, BY_LINES
    fused_attention.INDUCTOR_LAUNCHES, attention._fixed_size = False, FIXED_SIZE_CHECK
    DepthwiseConvNHWC.forward, depthwise_conv.ENABLED = DEPTHWISE_CONV_FORWARD, False


def build_model(name: str, variant: str | None, reparam: bool, dev: torch.device) -> torch.nn.Module:
    import timm

    import rmt  # noqa: F401  (registers the RMT models with timm)

    kernel = use_variant(variant) if variant else None
    model = timm.create_model("swin_tiny_patch4_window7_224" if name == "swin_t" else name,
                              **({"attn_kernel": kernel} if kernel else {}))
    if reparam and name != "swin_t":
        model.reparameterize()
    return model.eval().to(dev)


def _time_eager_models(args: argparse.Namespace, results: dict, budget: float, out: Path) -> None:
    begin = time.perf_counter()
    dev, dtype = torch.device(args.device), torch.bfloat16
    for batch in args.model_batches:
        x = torch.randn(batch, 3, 224, 224, device=dev)
        for name, variant in EAGER_MODELS:
            label = f"{name}{'_' + variant if variant else ''}_eager"
            row = results["models"].setdefault(label, {})
            if time.perf_counter() - begin > budget:
                row[batch] = "skipped (budget)"
                continue
            try:
                model = build_model(name, variant, args.reparam, dev)
                with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype):
                    ms = time_ms(lambda: model(x), warmup=5, reps=20)
                row[batch] = {"ms": round(ms, 3), "img_s": round(batch / ms * 1000, 1)}
            except Exception as e:  # record and go on: the models after it still run
                row[batch] = f"error: {type(e).__name__}: {first_line(e)[:200]}"
            finally:
                restore_attention()
            print(label, batch, row[batch], flush=True)
            (out / "attention.json").write_text(json.dumps(results, indent=1))


class Compiled(NamedTuple):
    """A compiled model: ``torch.compile`` ``mode``, inductor's C++ wrapper (which launches the
    kernels from C++ instead of Python), the batches as multiples of --batch, and whether its GPU
    time is profiled by kernel kind."""

    name: str
    variant: str | None
    mode: str = "default"
    cpp_wrapper: bool = False
    batches: tuple[int, ...] = (1,)
    profiled: bool = False

    @property
    def label(self) -> str:
        return (f"{self.name}{'_' + self.variant if self.variant else ''}_"
                f"{'cuda_graphs' if self.mode == 'reduce-overhead' else 'compiled'}{'_cpp_wrapper' if self.cpp_wrapper else ''}")


# Compiled models, by label. Each compiles in a process of its own, all at once: compiling one
# took about 80 s on an H100, most of it single-threaded Python in dynamo and inductor. Then they
# are timed one at a time, in interleaved rounds, and the profiled ones give their GPU time by
# kernel. Compiled, "auto" is the plain math on CUDA (inductor's kernels), "triton" our kernels.
# (The runs of 2026-11-27 also compiled stage 3 in two passes, the masked grid and frozen graphs:
# docs/performance.md.)
COMPILED_MODELS = {model.label: model for model in [
    Compiled("swin_t", None, batches=(1, 4), profiled=True),
    Compiled("rmt_s", "auto", batches=(1, 4), profiled=True),
    Compiled("rmt_s", "auto+traced_tables", batches=(1, 4)),
    Compiled("rmt_s", "auto+dwconv_as_window_sums", batches=(1, 4), profiled=True),
    Compiled("rmt_s", "triton", batches=(1, 4), profiled=True),
    Compiled("rmt_s", "triton+inductor_launches", batches=(1, 4), profiled=True),
    Compiled("rmt_s", "triton+inductor_launches+dwconv_as_window_sums", batches=(1, 4)),
    Compiled("rmt_s", "triton+triton_dwconv", batches=(1, 4), profiled=True),
    Compiled("rmt_s", "auto+triton_dwconv", batches=(1, 4)),
    Compiled("rmt_t", "auto", batches=(1, 4)),
    Compiled("rmt_t", "triton", batches=(1, 4)),
    Compiled("rmt_t", "triton+inductor_launches", batches=(1, 4)),
    Compiled("swin_t", None, cpp_wrapper=True),
    Compiled("rmt_s", "auto", cpp_wrapper=True),
    Compiled("rmt_s", "triton+inductor_launches", cpp_wrapper=True),
    Compiled("swin_t", None, "reduce-overhead"),
    Compiled("rmt_s", "triton", "reduce-overhead"),
    Compiled("rmt_s", "triton+triton_dwconv", "reduce-overhead"),
    Compiled("rmt_s", "triton+inductor_launches", "reduce-overhead"),
]}
REPLY = "@@ "  # marks the protocol's lines among whatever else a compiled model's process prints


def serve(label: str, args: argparse.Namespace) -> None:
    """One compiled model's process: compile and warm up, say ready (with how far its output is
    from the same model's eager output, without the variant's changes), then answer "time" and
    "profile" on stdin until it closes."""
    import torch._inductor.config

    from rmt.bench.runner import compile_model

    spec = COMPILED_MODELS[label]
    batches = [args.batch * m for m in spec.batches]
    dev = torch.device(args.device)
    torch._inductor.config.cpp_wrapper = spec.cpp_wrapper  # this process compiles this one model
    try:
        eager = build_model(spec.name, spec.variant, args.reparam, dev)
        inputs = {batch: torch.randn(batch, 3, 224, 224, device=dev) for batch in batches}

        def forward(model: torch.nn.Module, batch: int) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
                return model(inputs[batch])

        restore_attention()
        expected = forward(eager, batches[0]).float()
        if spec.variant:
            use_variant(spec.variant)
        begin = time.perf_counter()
        model = compile_model(eager, spec.mode)
        for batch in batches:
            for _ in range(3):  # compiles; CUDA graphs are recorded on a later call
                forward(model, batch)
        difference = ((forward(model, batches[0]).float() - expected).abs().max() / expected.abs().max()).item()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except Exception as e:
        traceback.print_exc()  # into the process's log, whose end the results keep
        _reply({"error": f"{type(e).__name__}: {first_line(e)[:300]}"})
        return
    _reply({"compile_s": round(time.perf_counter() - begin, 1), "max_abs_diff_to_eager_rel": round(difference, 5)})
    for line in sys.stdin:
        if line.strip() == "time":
            _reply({batch: time_ms(functools.partial(forward, model, batch), warmup=3, reps=20) for batch in batches})
        elif line.strip() == "profile":
            _reply(kernel_times(functools.partial(forward, model, batches[0])))


def _reply(message: dict) -> None:
    print(REPLY + json.dumps(message), flush=True)


class _Child:
    """A compiled model's process: its replies are read by a thread of their own, so that one
    that hangs or dies costs a timeout, not the run."""

    def __init__(self, label: str, args: argparse.Namespace, logs: Path, env: dict) -> None:
        command = [sys.executable, __file__, "--serve", label, "--device", args.device, "--batch", str(args.batch)]
        command += ["--reparam"] if args.reparam else []
        self.log = logs / f"{label}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            text=True, env=env)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                self.replies.put(json.loads(line[len(REPLY):]))
        self.replies.put(None)  # it ended

    def reply(self, timeout: float) -> dict | None:
        """Its next reply, or None if it ended or gave none in time."""
        try:
            return self.replies.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def ask(self, command: str, timeout: float = 300.0) -> dict | None:
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except OSError:  # a broken pipe: it died
            return None
        return self.reply(timeout)

    def log_tail(self) -> list[str]:
        return self.log.read_text().strip().splitlines()[-8:]

    def end(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# where a compiled model's GPU time goes, by the kernel names' telltale parts (first match)
KERNEL_KINDS = [
    ("attention, our Triton kernels", ("_decayed_attention_kernel", "_decomposed_attention_kernel")),
    # inductor's names hold the ops they fuse ("convolution", "bmm"): before the library kinds
    ("inductor reductions (norms, softmax)", ("triton_per_", "triton_red_")),
    ("inductor pointwise", ("triton_poi_",)),
    ("matrix products", ("triton_tem_",)),
    ("convolutions", ("conv", "fprop", "implicit", "winograd", "depthwise")),  # cuDNN's implicit GEMMs too
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass")),
    ("attention, SDPA", ("fmha", "flash", "attention", "sdpa")),
]


def kernel_times(forward, steps: int = 3) -> dict:
    """The GPU time of one forward pass by kernel kind, and the 25 kernels that take the most."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            forward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    for e in kernels:
        kind = next((kind for kind, parts in KERNEL_KINDS if any(p in e.key.lower() for p in parts)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_device_time_total / 1000 / steps
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    return {"kernel_ms_per_pass": round(sum(by_kind.values()), 3),
            "by_kind_ms": {kind: round(ms, 3) for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"kernel": e.key[:120], "ms": round(e.self_device_time_total / 1000 / steps, 4),
                             "calls": e.count // steps} for e in top]}


def _time_compiled_models(args: argparse.Namespace, results: dict, out: Path) -> None:
    """Start a process for each compiled model, all at once (and --alongside beside them); when
    they are ready and --alongside has ended, time them in interleaved rounds, one at a time. A
    model whose process fails, hangs or dies is recorded with the end of its log, and the others
    go on."""
    labels = args.compiled or list(COMPILED_MODELS)
    logs = Path(tempfile.mkdtemp(prefix="rmt_compiled_models_"))
    # each process's own compile workers: a few, since the processes themselves share the cores
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "4")}
    children = {label: _Child(label, args, logs, env) for label in labels}
    alongside = subprocess.Popen(args.alongside, shell=True) if args.alongside else None
    rows = results["compiled_models"]
    ready: list[str] = []

    def drop(label: str, error: str) -> None:
        rows[label] = {**rows.get(label, {}), "error": error, "log_tail": children[label].log_tail()}
        children[label].process.kill()
        if label in ready:
            ready.remove(label)

    deadline = time.monotonic() + args.compile_timeout
    for label, child in children.items():
        rows[label] = child.reply(deadline - time.monotonic()) or {
            "error": f"not ready in {args.compile_timeout:.0f} s" if child.process.poll() is None
            else f"its process ended (exit code {child.process.returncode})"}
        if "error" in rows[label]:
            drop(label, rows[label]["error"])
        else:
            ready.append(label)
        print(label, rows[label], flush=True)
    if alongside:
        alongside.wait()
    times: dict = {label: {} for label in ready}
    for round_ in range(args.rounds):
        for label in list(ready):  # one at a time: the GPU is theirs alone while timed
            reply = children[label].ask("time")
            if reply is None:
                drop(label, f"no timing in round {round_ + 1}: its process ended or hung")
                continue
            for batch, ms in reply.items():
                times[label].setdefault(int(batch), []).append(ms)
        # after every round, so that a run stopped at its time limit keeps the rounds it timed
        for label in ready:
            rows[label]["batches"] = {batch: {"ms": round(statistics.median(ms), 3),
                                              "rounds_ms": [round(t, 3) for t in ms],
                                              "img_s": round(batch / statistics.median(ms) * 1000, 1)}
                                      for batch, ms in times[label].items()}
        _add_ratios_to_swin(rows)
        (out / "attention.json").write_text(json.dumps(results, indent=1))
        print(f"round {round_ + 1} of {args.rounds} timed", flush=True)
    for label in ready:
        if COMPILED_MODELS[label].profiled:
            rows[label]["profile"] = children[label].ask("profile")
    for child in children.values():
        child.end()
    (out / "attention.json").write_text(json.dumps(results, indent=1))  # with the profiles
    for label, row in rows.items():
        print(label, {batch: (b["ms"], b.get("to_swin_t")) for batch, b in row.get("batches", {}).items()} or row, flush=True)


def _add_ratios_to_swin(rows: dict) -> None:
    """Each model's throughput as a multiple of Swin-T's compiled the same way (mode, wrapper)."""
    for label, row in rows.items():
        spec = COMPILED_MODELS[label]
        swin = rows.get(Compiled("swin_t", None, spec.mode, spec.cpp_wrapper).label, {})
        for batch, timing in row.get("batches", {}).items():
            if batch in swin.get("batches", {}):
                timing["to_swin_t"] = round(swin["batches"][batch]["ms"] / timing["ms"], 3)


def _with_backend(backend, run):
    with sdpa_kernel([backend]):
        return run("sdpa")


if __name__ == "__main__":
    main()
