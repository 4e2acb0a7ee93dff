"""Registers and spills of RMT's Triton kernels per launch configuration, without a GPU.

Compiles ``rmt.models.fused_attention``'s kernel for an NVIDIA target (default sm_90a, Hopper)
with the installed Triton and runs the ptxas that Triton ships with ``-v`` on each PTX: the
registers a thread uses bound how many programs an SM holds at once. Configurations: rmt_s's
attention passes at 224 px (tokens padded to a power of two, head_dim), bf16 with the rotary
fused, one head per program with the default and more warps, and grouped heads; and the kernel
running both passes of stage 3 in one program (``decomposed_decayed_attention``). At the default
warps each is compiled twice: storing a fresh output (the row passes of eager inference, and
every launch from a compiled graph) and adding its output into the LCE conv's (``ADD``, the last
launch of each stage in eager inference), which loads one tile more. Other warp counts, for
comparison, with the add. Then the depthwise conv kernel (``rmt.models.depthwise_conv``) in
each configuration RMT's convs launch (3 x 3 and 5 x 5, 64 and 128 channels a program) and a 7 x 7,
with a bias.

    python scripts/triton_kernel_registers.py [--arch 90] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rmt.io import write_json_atomic
from rmt.models import depthwise_conv, fused_attention
from rmt.models.depthwise_conv import _depthwise_conv_kernel
from rmt.models.fused_attention import ONE_PROGRAM_WARPS, _decayed_attention_kernel, _decomposed_attention_kernel, _warps

# (pass, tokens padded, head_dim, heads per program): rmt_s at 224 px
PASSES = [
    ("stage1 56 tokens", 64, 16, 1), ("stage1 56 tokens", 64, 16, 2),
    ("stage2 28 tokens", 32, 32, 1), ("stage2 28 tokens", 32, 32, 4),
    ("stage3 14 tokens", 16, 32, 1), ("stage3 14 tokens", 16, 32, 8),
    ("stage4 49 tokens", 64, 32, 1), ("stage4 49 tokens", 64, 32, 2),
]
# (stage, grid side padded, head_dim): decomposed stages whose whole grid one program holds
GRIDS = [("stage3 14x14, both passes", 16, 32)]
# (kernel size, width): the depthwise convs of rmt_s (widths 64 to 1536: 64 or 128 channels a
# program, depthwise_conv._channel_block), and a 7 x 7, whose tile takes one output a thread
CONVS = [(3, 64), (3, 128), (5, 64), (5, 128), (7, 64)]


def registers(kernel, constants: dict, warps: int, arch: int) -> dict:
    """ptxas's report for one configuration of a kernel taking bf16 tensors: registers a thread, spill bytes."""
    signature = {
        name: "constexpr" if name in constants else "*fp32" if name == "decay_ptr" else "*bf16" if name.endswith("_ptr") else "i32"
        for name in inspect.signature(kernel.fn).parameters
    }
    # Triton 3.2 names the constexprs "constants"
    constants_kw = "constexprs" if "constexprs" in inspect.signature(ASTSource).parameters else "constants"
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, **{constants_kw: constants}),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    used = next(line for line in report.splitlines() if "Used" in line and "registers" in line)
    spills = next(line for line in report.splitlines() if "spill stores" in line)
    return {"registers": int(used.split("Used")[1].split("registers")[0]),
            "spill_store_bytes": int(spills.split("bytes spill stores")[0].split(",")[-1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90, help="compute capability as a number (90: Hopper)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        print(f"{row['pass']:25s} heads/program {row['heads_per_program']}  warps {row['num_warps']}"
              f"{'*' if row['default_warps'] else ' '}  {'added' if row['adds'] else 'fresh'}  {row['registers']:3d} registers  "
              f"{row['spill_store_bytes']} B spilled", flush=True)

    def compile_each(kernel, constants: dict, warps_counts: list[int], default: int, row: dict) -> None:
        for warps in warps_counts:
            for adds in (False, True) if warps == default else (True,):
                report({**row, "num_warps": warps, "default_warps": warps == default, "adds": adds,
                        **registers(kernel, {**constants, "ADD": adds}, warps, args.arch)})

    for name, block, head_dim, heads in PASSES:
        default = _warps(block * heads, head_dim)
        constants = {"BLOCK_L": block, "HEAD_DIM": head_dim, "MANHATTAN": False, "IEEE": False, "ROTATE": True,
                     "HEADS": heads}
        compile_each(_decayed_attention_kernel, constants, [default] if heads > 1 else sorted({default, 4, 8}), default,
                     {"pass": name, "tokens_padded": block, "head_dim": head_dim, "heads_per_program": heads,
                      "both_passes": False})
    # both passes of a decomposed stage in one program (decomposed_decayed_attention)
    for name, side, head_dim in GRIDS:
        constants = {"BLOCK_H": side, "BLOCK_W": side, "HEAD_DIM": head_dim, "IEEE": False, "ROTATE": True}
        compile_each(_decomposed_attention_kernel, constants, [4, 8, 16], ONE_PROGRAM_WARPS,
                     {"pass": name, "tokens_padded": side * side, "head_dim": head_dim, "heads_per_program": 1,
                      "both_passes": True})
    print("* the default warps for that tile (fused_attention._warps; ONE_PROGRAM_WARPS for both passes);"
          " fresh: a new output, added: added into the LCE conv's")
    conv_rows = []
    for size, width in CONVS:
        tokens, channels = depthwise_conv._tile(size, width)
        constants = {"KERNEL": size, "HAS_BIAS": True, "BLOCK_P": tokens, "BLOCK_C": channels}
        row = {"kernel_size": size, "channels_per_program": channels, "tokens_per_program": tokens,
               "num_warps": depthwise_conv.WARPS,
               **registers(_depthwise_conv_kernel, constants, depthwise_conv.WARPS, args.arch)}
        conv_rows.append(row)
        print(f"depthwise conv {size}x{size}, {channels:3d} channels a program  warps {row['num_warps']}  "
              f"{row['registers']:3d} registers  {row['spill_store_bytes']} B spilled", flush=True)
    if args.json:
        write_json_atomic(args.json, {"triton": triton.__version__, "arch": f"sm_{args.arch}a",
                                      "max_rows": fused_attention.MAX_ROWS, "rows": rows, "depthwise_conv_rows": conv_rows})


if __name__ == "__main__":
    main()
