"""CPU time of one Manhattan self-attention call per stage, for each attention kernel.

Runs each model once (eval mode, inference_mode, fp32 or bf16 autocast) to capture the rotated q, k and v that
the first block of every stage passes to its attention, with the shapes of eval-mode CPU
inference (chunks of images), then times the attention alone on them: each kernel in turn, in
an order rotating every round, ROUNDS rounds, the median per call; and says which kernel
``auto`` runs. The rotary and the projections are not included.

    python scripts/cpu_attention_kernels.py --models rmt_t rmt_s rmt_b --kernels auto reference sdpa
    python scripts/cpu_attention_kernels.py --dtype bf16 --kernels cpu_matmul sdpa cpu_deferred_normalisation

Besides the public kernels, ``auto``'s internal CPU choices can be named: ``cpu_deferred_normalisation``
and ``cpu_matmul`` (the plain math with k stored transposed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import timm
import torch

import rmt  # noqa: F401  (registers the RMT variants with timm)
from rmt.bench.runner import precision
from rmt.models import attention


def capture_stage_inputs(model: torch.nn.Module, x: torch.Tensor, dtype: str = "fp32") -> list[tuple]:
    """(stage, attention function, q, k, v, tables) of the first attention call of each stage."""
    captured: dict[int, tuple] = {}
    current = [0]
    hooks = [
        stage.register_forward_pre_hook(lambda module, args, i=i: current.__setitem__(0, i))
        for i, stage in enumerate(model.stages)
    ]
    originals = {"decomposed_attention": attention.decomposed_attention, "full_attention": attention.full_attention}

    def capturing(attend):
        def call(q, k, v, tables, kernel):
            if current[0] not in captured:
                # q and k as strided views of one stacked tensor, like the projection's output
                q_copy, k_copy = torch.stack((q, k), dim=3).unbind(3)
                captured[current[0]] = (current[0], attend, q_copy, k_copy, v.clone(), tables)
            return attend(q, k, v, tables, kernel)

        return call

    try:
        for name, attend in originals.items():
            setattr(attention, name, capturing(attend))
        with torch.inference_mode(), precision(torch.device("cpu"), dtype):
            model(x)
    finally:
        for name, attend in originals.items():
            setattr(attention, name, attend)
        for hook in hooks:
            hook.remove()
    return [captured[stage] for stage in sorted(captured)]


def auto_choice(q: torch.Tensor) -> str:
    """The kernel ``auto`` runs for a pass over the sequences of q, (B, G, L, heads, head_dim)."""
    chosen = attention._resolve("auto", q)
    return next(name for name, kernel in attention._KERNELS.items() if kernel is chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["rmt_t", "rmt_s", "rmt_b"])
    parser.add_argument("--kernels", nargs="+", default=["auto", "reference", "sdpa"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: q, k and v from CPU autocast")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.img_size}px, {args.dtype}, "
          f"median of {args.rounds} interleaved calls, ms per call")
    print(f"{'model':8s} {'stage':>5s} {'q shape (B, H, W, heads, d)':>30s} " + " ".join(f"{k:>10s}" for k in args.kernels))
    results = []
    for name in args.models:
        for stage, attend, q, k, v, tables in capture_stage_inputs(timm.create_model(name).eval(), x, args.dtype):
            times: dict[str, list[float]] = {kernel: [] for kernel in args.kernels}
            with torch.inference_mode():
                for round_ in range(args.rounds + 3):
                    # each kernel in turn, the order rotating every round: a kernel's time also
                    # depends on what the one before it left in the caches and the allocator
                    shift = round_ % len(args.kernels)
                    for kernel in args.kernels[shift:] + args.kernels[:shift]:
                        start = time.perf_counter()
                        attend(q, k, v, tables, kernel)
                        if round_ >= 3:  # warm-up rounds
                            times[kernel].append((time.perf_counter() - start) * 1000)
            medians = {kernel: round(statistics.median(t), 4) for kernel, t in times.items()}
            decomposed = attend is attention.decomposed_attention
            auto = auto_choice(q if decomposed else q.flatten(1, 2).unsqueeze(1))
            results.append({"model": name, "stage": stage + 1, "q_shape": list(q.shape), "decomposed": decomposed,
                            "auto_runs": auto, "ms": medians})
            print(f"{name:8s} {stage + 1:5d} {str(tuple(q.shape)):>30s} "
                  + " ".join(f"{medians[k]:10.3f}" for k in args.kernels) + f"   auto = {auto}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "img_size": args.img_size, "threads": args.threads, "rounds": args.rounds, "dtype": args.dtype,
                       "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
