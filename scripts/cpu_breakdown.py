"""Where a CPU forward pass spends its time: total, inside nn.Linear, and fresh memory pages.

For each model (eval mode, inference_mode, fp32): the median over ROUNDS passes of the whole
forward time, of the time spent inside nn.Linear modules (GEMMs at the CPU's peak rate, the part
no layout change can shrink), and the minor page faults per pass (fresh allocations the C
allocator had returned to the kernel: each 4 KiB page is faulted in and zeroed again).

    python scripts/cpu_breakdown.py --models swin_tiny_patch4_window7_224 rmt_t rmt_s rmt_b
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import timm
import torch
from torch import nn

import rmt  # noqa: F401  (registers the RMT variants with timm)


def _timed_linears(model: nn.Module, spent: list[float]) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            forward = module.forward

            def timed(x: torch.Tensor, forward=forward) -> torch.Tensor:
                start = time.perf_counter()
                out = forward(x)
                spent[0] += time.perf_counter() - start
                return out

            module.forward = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["swin_tiny_patch4_window7_224", "rmt_t", "rmt_s", "rmt_b"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 224, 224)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, median of {args.rounds}")
    print(f"{'model':32s} {'total ms':>9s} {'linear ms':>10s} {'linear %':>9s} {'page faults':>12s}")
    for name in args.models:
        model = timm.create_model(name).eval()
        spent = [0.0]
        _timed_linears(model, spent)
        totals, linears, faults = [], [], []
        with torch.inference_mode():
            for _ in range(2):
                model(x)
            for _ in range(args.rounds):
                spent[0] = 0.0
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                model(x)
                totals.append(time.perf_counter() - start)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
                linears.append(spent[0])
        total, linear = statistics.median(totals) * 1000, statistics.median(linears) * 1000
        print(f"{name:32s} {total:9.1f} {linear:10.1f} {100 * linear / total:8.0f}% {statistics.median(faults):12.0f}")


if __name__ == "__main__":
    main()
