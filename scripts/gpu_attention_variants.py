"""Which attention kernel is fastest for RMT's short sequences on CUDA?

Times one Manhattan self-attention call, from the projections on: the rotary of q and k, then
both passes for decomposed stages, at the shapes of rmt_s at 224x224, batch 64, bf16, for: the
Triton kernel (rotary fused) with one head per program, also with 4 and 8 warps (``triton_w4``,
``triton_w8``; the default is 2 or 4 by tile size), and with a sequence's heads grouped two, four
or eight to a program (``triton_heads2``...), and for stage 3 both passes in one program an image and
head (``triton_one_program``, 8 warps, and ``_w16``), SDPA as dispatched (cuDNN on Hopper), SDPA forced to the
memory-efficient backend, the plain reference path eagerly and compiled, and (--flex)
FlexAttention compiled with its default and with small tiles. Every timed call starts with one
copy of the stacked q/k projection, which the rotary then overwrites (as in the model). Every
stage's uncompiled variants run before the compiled ones, so a short budget reaches every
stage's Triton launches. Then,
inside the time budget, whole models in the same process (``--models``; ``--reparam`` folds the
RMT models first): eager rmt_s with and without grouped heads and one-program stage 3, and
compiled rmt_s with the reference math (``auto``), with the Triton kernels as operators
(``triton``) and with those and one-program stage 3. Results go to
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
    reference = manhattan_attention(qk.float(), v.float(), position.tables(h, w, torch.float32, True),
                                    "reference", decomposed)

    def run(kernel: str) -> torch.Tensor:
        return manhattan_attention(work.copy_(qk), v, tables, kernel, decomposed)

    def fused(heads_per_program: int, num_warps: int | None = None, passes_in_one_program: bool = False) -> torch.Tensor:
        return attention._fused_manhattan_attention(work.copy_(qk), v, tables, decomposed, heads_per_program, num_warps,
                                                    passes_in_one_program)

    one_program = decomposed and fused_attention.fits_one_program(qk, h, w)
    variants = {
        "triton": lambda: run("triton"),
        **{f"triton_w{warps}": functools.partial(fused, 1, warps) for warps in (4, 8)},
        **{f"triton_heads{p}": functools.partial(fused, p) for p in groupings(max(h, w) if decomposed else h * w, n)},
        **{f"triton_one_program{f'_w{warps}' if warps else ''}": functools.partial(fused, 1, warps, True)
           for warps in ((None, 16) if one_program else ())},
        "sdpa": lambda: run("sdpa"),
        "sdpa_efficient": lambda: _with_backend(SDPBackend.EFFICIENT_ATTENTION, run),
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
    # every stage's uncompiled variants first, then those that compile (slow to start), so that a
    # short budget still reaches every stage's Triton launches
    for compiled in (False, True):
        for stage, (variants, reference) in stages.items():
            row = results["stages"].setdefault(stage, {})
            for name, fn in variants.items():
                if ("compiled" in name) != compiled:
                    continue
                if time.perf_counter() - begin > args.budget:
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
    if not args.models:
        return
    # whole models, same process, if time is left
    import timm

    import rmt  # noqa: F401

    x = torch.randn(args.batch, 3, 224, 224, device=dev)
    fused = attention._fused_manhattan_attention
    # variants of the Triton path, by label: (attention kernel, the Triton path's function); "grouped":
    # each launch grouping as many heads per program as it takes; "one_program": both passes of the
    # stages that fit in one program. Compiled, auto is the reference math on CUDA, and "triton"
    # puts the Triton kernels in the graph as operators.
    one_program = functools.partial(fused, passes_in_one_program=True)
    tuned = {"grouped": ("auto", functools.partial(widest_grouping, fused=fused)), "one_program": ("auto", one_program),
             "triton_one_program": ("triton", one_program)}
    for name, kernel, compiled in (("swin_t", None, False), ("rmt_s", "auto", False), ("rmt_s", "grouped", False),
                                   ("rmt_s", "one_program", False), ("rmt_s", "sdpa", False), ("swin_t", None, True),
                                   ("rmt_s", "auto", True), ("rmt_s", "triton_one_program", True),
                                   ("rmt_s", "triton", True)):
        label = f"{name}{'_' + kernel if kernel else ''}{'_compiled' if compiled else '_eager'}"
        if time.perf_counter() - begin > args.budget:
            results["models"][label] = "skipped (budget)"
            (out / "attention.json").write_text(json.dumps(results, indent=1))
            continue
        attn_kernel, attention._fused_manhattan_attention = tuned.get(kernel, (kernel, fused))
        model = timm.create_model("swin_tiny_patch4_window7_224" if name == "swin_t" else name,
                                  **({"attn_kernel": attn_kernel} if kernel else {}))
        if args.reparam and name != "swin_t":
            model.reparameterize()
        model = model.eval().to(dev)
        if compiled:
            model = torch.compile(model)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype):
            ms = time_ms(lambda: model(x), warmup=5, reps=20)
        attention._fused_manhattan_attention = fused
        results["models"][label] = {"ms": round(ms, 3), "img_s": round(args.batch / ms * 1000, 1)}
        print(label, results["models"][label], flush=True)
        (out / "attention.json").write_text(json.dumps(results, indent=1))


def _with_backend(backend, run):
    with sdpa_kernel([backend]):
        return run("sdpa")


if __name__ == "__main__":
    main()
