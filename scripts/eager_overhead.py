"""The CPU time RMT's own Python adds to each layer call of an eager inference pass.

Eager CUDA inference at batch 64 is bound by CPU time: the GPU finishes each kernel before the
CPU has launched the next (docs/performance.md). Part of that time is torch's dispatch and the
launches; part is the Python of RMT's layers around each operator: the weight cache's checks,
autocast switched off for the layer norms, the attention's choice of kernel and the arguments
of its Triton launches. This script measures that part, for a model folded for inference under
bf16 autocast without autograd (as ``rmt bench --reparam`` runs it on a GPU):

- for each kind of layer, a call of the module against a call of the bare operator it ends in,
  with the same weights, on the same small input, interleaved over rounds (the median of each);
- the attention's Python and view ops around its kernels (``triton`` attention, the kernel
  calls replaced by no-ops: launching is Triton's own cost), at each stage's size at 224 px;
- each multiplied by its calls in one forward pass at 224 px;
- apart, not in the total: the depthwise convs with ``rmt.models.depthwise_conv.ENABLED`` (the
  Triton kernel, its launch replaced by a no-op), the Python of a call against nothing, beside
  the library path's (the rows above, whose F.conv2d is not counted).

It runs on the CPU, one thread. The Python is the same on a GPU but for the weight cache's CUDA
stream lookup; the bare operators' dispatch is not counted. (The folded norm's bare operator is
plain ``F.layer_norm``: CPU autocast leaves layer norm alone, where CUDA's would run it in float32,
which is what the norm's autocast switch is for.)

    python scripts/eager_overhead.py --model rmt_s --json overhead.json
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import rmt  # noqa: F401  (registers the RMT variants with timm)
from rmt.io import write_json_atomic
from rmt.models import attention, depthwise_conv, fused_attention
from rmt.zoo import create_model, fold_for_inference


class _NoLaunch:
    """A Triton kernel whose launches do nothing but count (``kernel[grid](...)``)."""

    launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        _NoLaunch.launches += 1


def _mean_us(fn: Callable[[], object], calls: int) -> float:
    """µs a call, the mean of ``calls`` calls in a row."""
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - begin) / calls * 1e6


def compare(module_call: Callable[[], object], bare_call: Callable[[], object], rounds: int, calls: int) -> dict:
    """µs a call of each: the median over ``rounds`` interleaved rounds (after a warmup) of each
    round's mean."""
    for fn in (module_call, bare_call):
        _mean_us(fn, calls // 10 + 1)
    module_times, bare_times = [], []
    for _ in range(rounds):
        module_times.append(_mean_us(module_call, calls))
        bare_times.append(_mean_us(bare_call, calls))
    module_us, bare_us = statistics.median(module_times), statistics.median(bare_times)
    return {"module_us": round(module_us, 2), "bare_us": round(bare_us, 2), "added_us": round(module_us - bare_us, 2)}


def _conv_bare(conv: torch.nn.Conv2d, x: torch.Tensor) -> Callable[[], object]:
    weight, bias = conv.autocast_parameters()
    return lambda: F.conv2d(x.permute(0, 3, 1, 2), weight, bias, conv.stride, conv.padding, conv.dilation,
                            conv.groups).permute(0, 2, 3, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rmt_s")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=2000, help="calls timed together in a round")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = create_model(args.model, attn_kernel="triton").eval()
    fold_for_inference(model, args.model)
    calls_per_pass: collections.Counter[str] = collections.Counter()
    hooks = [m.register_forward_pre_hook(lambda m, _: calls_per_pass.update([type(m).__name__])) for m in model.modules()]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()

    block = model.stages[2].blocks[0]
    dim = block.norm1.normalized_shape[0]
    rows: dict[str, dict] = {}
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        token = torch.randn(1, 1, 1, dim, dtype=torch.bfloat16)
        grid = torch.randn(1, 3, 3, dim, dtype=torch.bfloat16)
        linear = block.attn.v
        weight, bias = linear.autocast_parameters()
        rows["CachedLinear"] = compare(lambda: linear(token), lambda: F.linear(token, weight, bias), args.rounds, args.calls)
        norm = block.norm1
        rows["AffineFreeLayerNorm"] = compare(lambda: norm(token), lambda: F.layer_norm(token, (dim,), None, None, norm.eps),
                                              args.rounds, args.calls)
        rows["CachedResidualDepthwiseConvNHWC"] = compare(lambda: block.cpe(grid), _conv_bare(block.cpe, grid),
                                                          args.rounds, args.calls)
        rows["CachedDepthwiseConvNHWC"] = compare(lambda: block.attn.lce(grid), _conv_bare(block.attn.lce, grid),
                                                  args.rounds, args.calls)
    for name, row in rows.items():
        row["calls_per_pass"] = calls_per_pass[name]

    skipped: list[str] = []
    if fused_attention.triton is None:
        skipped.append("the attention: this torch has no Triton")
    else:
        kernels = fused_attention._decayed_attention_kernel, fused_attention._decomposed_attention_kernel
        interpreted = fused_attention.InterpretedFunction
        fused_attention._decayed_attention_kernel = fused_attention._decomposed_attention_kernel = _NoLaunch()
        fused_attention.InterpretedFunction = _NoLaunch  # supports() then accepts CPU tensors
        try:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                for i, stage in enumerate(model.stages):
                    side = 56 >> i  # the stage's grid at 224 px
                    attn = stage.blocks[0].attn
                    n, d = attn.num_heads, attn.head_dim
                    qk = torch.randn(1, side, side, 2, n, d, dtype=torch.bfloat16)
                    v = torch.randn(1, side, side, n, d, dtype=torch.bfloat16)
                    tables = stage.position.tables(side, side, torch.bfloat16, with_masks=True)
                    lce = torch.randn(1, side, side, n, d, dtype=torch.bfloat16)  # the kernels add into it

                    def call(qk=qk, v=v, tables=tables, decomposed=attn.decomposed, lce=lce) -> object:
                        return attention.manhattan_attention(qk, v, tables, "triton", decomposed, add_to=lce)

                    before = _NoLaunch.launches
                    call()
                    if _NoLaunch.launches == before:  # too long for the kernels (rmt_t's 196-token stage 3)
                        skipped.append(f"stage {i + 1} ({side}x{side}): its attention does not run the Triton kernels")
                        continue
                    row = compare(call, lambda: None, args.rounds, args.calls)
                    row["calls_per_pass"] = len(stage.blocks)
                    rows[f"manhattan_attention, stage {i + 1} ({side}x{side})"] = row
        finally:
            fused_attention._decayed_attention_kernel, fused_attention._decomposed_attention_kernel = kernels
            fused_attention.InterpretedFunction = interpreted

    for row in rows.values():
        row["added_ms_per_pass"] = round(row["added_us"] * row["calls_per_pass"] / 1e3, 3)
    total = round(sum(row["added_ms_per_pass"] for row in rows.values()), 3)

    # the depthwise convs in the Triton kernel (not yet the default): all their Python is added
    triton_conv_rows: dict[str, dict] = {}
    if depthwise_conv.triton is None:
        skipped.append("the Triton depthwise conv: this torch has no Triton")
    else:
        kernel, interpreted, enabled = depthwise_conv._depthwise_conv_kernel, depthwise_conv._INTERPRETED, depthwise_conv.ENABLED
        depthwise_conv._depthwise_conv_kernel, depthwise_conv._INTERPRETED = _NoLaunch(), True  # CPU tensors accepted
        depthwise_conv.ENABLED = True
        try:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                for name, conv in (("CachedResidualDepthwiseConvNHWC", block.cpe), ("CachedDepthwiseConvNHWC", block.attn.lce)):
                    before = _NoLaunch.launches
                    conv(grid)
                    assert _NoLaunch.launches == before + 1, f"{name} did not take the Triton path"
                    row = compare(lambda conv=conv: conv(grid), lambda: None, args.rounds, args.calls)
                    row["calls_per_pass"] = calls_per_pass[name]
                    row["added_ms_per_pass"] = round(row["added_us"] * row["calls_per_pass"] / 1e3, 3)
                    row["library_path_added_ms_per_pass"] = rows[name]["added_ms_per_pass"]
                    triton_conv_rows[name] = row
        finally:
            depthwise_conv._depthwise_conv_kernel, depthwise_conv._INTERPRETED = kernel, interpreted
            depthwise_conv.ENABLED = enabled
    print(f"{args.model}, folded, bf16 autocast, CPU, 1 thread: µs a call (median of {args.rounds} rounds)")
    print(f"{'':44s} {'module':>8s} {'bare op':>8s} {'added':>8s} {'calls':>6s} {'ms/pass':>8s}")
    for name, row in rows.items():
        print(f"{name:44s} {row['module_us']:8.2f} {row['bare_us']:8.2f} {row['added_us']:8.2f} "
              f"{row['calls_per_pass']:6d} {row['added_ms_per_pass']:8.3f}")
    for line in skipped:
        print(f"not counted: {line}")
    print(f"added by RMT's Python in one forward pass: {total:.3f} ms")
    if triton_conv_rows:
        print("with depthwise_conv.ENABLED, the convs' Python before the Triton launch (the launch a no-op), "
              "against the library path's above:")
        for name, row in triton_conv_rows.items():
            print(f"{name:44s} {row['module_us']:8.2f} {'':8s} {row['added_us']:8.2f} {row['calls_per_pass']:6d} "
                  f"{row['added_ms_per_pass']:8.3f}  (library path {row['library_path_added_ms_per_pass']:.3f})")
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "torch": torch.__version__, "rounds": args.rounds,
                                      "calls": args.calls, "rows": rows, "not_counted": skipped,
                                      "added_ms_per_pass": total, "triton_depthwise_conv_rows": triton_conv_rows})


if __name__ == "__main__":
    main()
