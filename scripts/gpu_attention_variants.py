"""Which attention kernel is fastest for RMT's short sequences on CUDA?

Times one Manhattan self-attention call, from the projections on: the rotary of q and k, then
both passes for decomposed stages, at the shapes of rmt_s at 224x224, batch 64, bf16, for:
- the Triton kernel (rotary fused) with one head per program, also with 4 and 8 warps
  (``triton_w4``, ``triton_w8``; the default is 2 or 4 by tile size), with the rotary by the
  tiles' even and odd entries and half tables (``triton_pairs``: fewer registers), and with a
  sequence's heads grouped two, four or eight to a program (``triton_heads2``...);
- for stage 3, both passes in one Triton program an image and head (``triton_one_program``, 8
  warps, and ``_w16``), and both passes as SDPA calls over the whole grid with row and column
  masks (``sdpa_masked_grid``, eagerly and compiled);
- SDPA as dispatched (cuDNN on Hopper), SDPA forced to the memory-efficient backend, the plain
  reference path eagerly and compiled, and (--flex) FlexAttention compiled with its default and
  with small tiles.
Every timed call starts with one copy of the stacked q/k projection, which the rotary then
overwrites (as in the model). Every stage's uncompiled variants run before the compiled ones, so
a short budget reaches every stage's Triton launches. Then, inside the time budget, whole models
in the same process (``--models``; ``--reparam`` folds the RMT models first): eager rmt_s with
and without grouped heads, one-program stage 3 and the rotary by pairs, with SDPA with and
without the masked grid at stage 3; compiled rmt_s with the reference math (``auto``) with and
without the masked grid, with the Triton kernels as operators (``triton``), and with those and
one-program stage 3. Eager models run before the compiled kernels. Results go to
OUT/attention.json.

    OUT=runs/attn python scripts/gpu_attention_variants.py --budget 150
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

import rmt.models.attention as attention
from rmt.models import fused_attention
from rmt.models.attention import ManhattanPosition, manhattan_attention

STAGES = {  # rmt_s at 224: (H, W, heads, head_dim, decomposed)
    "stage1": (56, 56, 4, 16, True),
    "stage2": (28, 28, 4, 32, True),
    "stage3": (14, 14, 8, 32, True),
    "stage4": (7, 7, 16, 32, False),
}


def groupings(length: int, heads: int) -> list[int]:
    """The heads-per-program counts above one that the Triton kernel takes for these sequences."""
    return [p for p in (2, 4, 8, 16) if fused_attention.groups_heads(length, heads, p)]


def widest_grouping(qk, v, tables, decomposed, heads_per_program=1, *, fused):
    """``_fused_manhattan_attention`` with as many heads per program as the kernel takes."""
    h, w, n = qk.shape[1], qk.shape[2], qk.shape[4]
    widest = groupings(max(h, w) if decomposed else h * w, n)
    return fused(qk, v, tables, decomposed, widest[-1] if widest else 1)


# decomposed stages of at most this many tokens take the masked-grid form in the "masked_grid"
# variants (stage 3 at 224 px, 196 tokens; stage 2's 784 would multiply the attention's work by 28)
MASKED_GRID_MAX_TOKENS = 256
_grid_masks_cache: dict = {}


def grid_masks(decay: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and the column pass of a decomposed stage as attention masks over the whole H x W
    grid, (1, heads, H*W, H*W): ``decay * distance`` between tokens of the same row (column),
    -inf between others. Cached per stage in eager code (by the decay buffer's address: clear
    the cache for each new model); a compiled graph computes them itself."""
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

    def fused(heads_per_program: int, num_warps: int | None = None, passes_in_one_program: bool = False,
              rotary_pairs: bool = False) -> torch.Tensor:
        return attention._fused_manhattan_attention(work.copy_(qk), v, tables, decomposed, heads_per_program, num_warps,
                                                    passes_in_one_program, rotary_pairs)

    def masked_grid() -> torch.Tensor:
        q, k = attention.rotate_queries_and_keys(work.copy_(qk), tables, inplace=True).unbind(3)
        return decomposed_as_masked_grid(q, k, v, tables, "sdpa", decomposed_attention=attention.decomposed_attention)

    one_program = decomposed and fused_attention.fits_one_program(qk, h, w)
    variants = {
        "triton": lambda: run("triton"),
        **{f"triton_w{warps}": functools.partial(fused, 1, warps) for warps in (4, 8)},
        "triton_pairs": functools.partial(fused, 1, rotary_pairs=True),
        **{f"triton_heads{p}": functools.partial(fused, p) for p in groupings(max(h, w) if decomposed else h * w, n)},
        **{f"triton_one_program{f'_w{warps}' if warps else ''}": functools.partial(fused, 1, warps, True)
           for warps in ((None, 16) if one_program else ())},
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
    parser.add_argument("--budget", type=float, default=150.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--flex", action="store_true", help="also FlexAttention with several tile sizes (slow to compile)")
    parser.add_argument("--models", action="store_true", help="then whole models in the same process")
    parser.add_argument("--reparam", action="store_true", help="fold the RMT models for inference first")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "runs/attn"))
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    dev, dtype = torch.device(args.device), torch.bfloat16
    results: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "batch": args.batch,
                     "torch": torch.__version__, "reparam": args.reparam, "stages": {}, "models": {}}
    stages = {stage: _stage_variants(*shape, batch=args.batch, dev=dev, dtype=dtype, flex=args.flex)
              for stage, shape in STAGES.items()}
    # uncompiled first, then what compiles (slow to start), so that a short budget still reaches
    # every stage's Triton launches and the eager models
    for compiled in (False, True):
        _time_stages(stages, compiled, results, args.budget - (time.perf_counter() - begin), out)
        if args.models:
            _time_models(compiled, args, results, args.budget - (time.perf_counter() - begin), out)


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
                row[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(stage, name, row[name], flush=True)
        (out / "attention.json").write_text(json.dumps(results, indent=1))


# whole models, (name, variant): eager, then compiled
MODELS = {
    False: [("swin_t", None), ("rmt_s", "auto"), ("rmt_s", "grouped"), ("rmt_s", "one_program"), ("rmt_s", "pairs"),
            ("rmt_s", "sdpa"), ("rmt_s", "sdpa_masked_grid")],
    True: [("swin_t", None), ("rmt_s", "auto"), ("rmt_s", "auto_masked_grid"), ("rmt_s", "triton_one_program"),
           ("rmt_s", "triton")],
}


def _time_models(compiled: bool, args: argparse.Namespace, results: dict, budget: float, out: Path) -> None:
    import timm

    import rmt  # noqa: F401

    begin = time.perf_counter()
    dev, dtype = torch.device(args.device), torch.bfloat16
    x = torch.randn(args.batch, 3, 224, 224, device=dev)
    triton_path, by_lines = attention._fused_manhattan_attention, attention.decomposed_attention
    masked_grid = functools.partial(decomposed_as_masked_grid, decomposed_attention=by_lines)
    one_program = functools.partial(triton_path, passes_in_one_program=True)
    # variant -> (attention kernel, the Triton path, decomposed attention). "grouped": each Triton
    # launch grouping as many heads per program as it takes; "one_program": both passes of the
    # stages that fit in one Triton program; "pairs": the Triton kernel's rotary by pairs and half
    # tables (fewer registers); "..._masked_grid": stage 3 as masked-grid SDPA calls,
    # the other passes as "sdpa" (eager: under "auto" the Triton kernel would take stage 3) or
    # "auto". Compiled, "auto" is the reference math on CUDA, and "triton" puts the Triton kernels
    # in the graph as operators.
    variants = {"grouped": ("auto", functools.partial(widest_grouping, fused=triton_path), by_lines),
                "one_program": ("auto", one_program, by_lines),
                "pairs": ("auto", functools.partial(triton_path, rotary_pairs=True), by_lines),
                "triton_one_program": ("triton", one_program, by_lines),
                "sdpa_masked_grid": ("sdpa", triton_path, masked_grid),
                "auto_masked_grid": ("auto", triton_path, masked_grid)}
    for name, variant in MODELS[compiled]:
        label = f"{name}{'_' + variant if variant else ''}{'_compiled' if compiled else '_eager'}"
        if time.perf_counter() - begin > budget:
            results["models"][label] = "skipped (budget)"
            continue
        kernel, attention._fused_manhattan_attention, attention.decomposed_attention = variants.get(
            variant, (variant, triton_path, by_lines))
        _grid_masks_cache.clear()  # keyed by the decay buffer's address, which a new model may reuse
        try:
            model = timm.create_model("swin_tiny_patch4_window7_224" if name == "swin_t" else name,
                                      **({"attn_kernel": kernel} if kernel else {}))
            if args.reparam and name != "swin_t":
                model.reparameterize()
            model = model.eval().to(dev)
            if compiled:
                # dynamo guards each variant's module attributes and patched functions: a fresh
                # cache keeps the variants from counting towards one recompile limit
                torch.compiler.reset()
                model = torch.compile(model)
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype):
                ms = time_ms(lambda: model(x), warmup=5, reps=20)
            results["models"][label] = {"ms": round(ms, 3), "img_s": round(args.batch / ms * 1000, 1)}
        except Exception as e:  # record and go on: the models after it still run
            results["models"][label] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        finally:
            attention._fused_manhattan_attention, attention.decomposed_attention = triton_path, by_lines
        print(label, results["models"][label], flush=True)
        (out / "attention.json").write_text(json.dumps(results, indent=1))
    (out / "attention.json").write_text(json.dumps(results, indent=1))


def _with_backend(backend, run):
    with sdpa_kernel([backend]):
        return run("sdpa")


if __name__ == "__main__":
    main()
