"""CPU forward latency of RMT variants as a ratio to timm's Swin-T, measured in one process.

Method: fp32, eval mode, inference_mode, one fixed random batch, warmup, then ROUNDS rounds in
which every model runs once in turn (interleaved, so drift hits all alike); each model's median
over the rounds is reported with its ratio to swin_tiny_patch4_window7_224.

    python scripts/cpu_latency_vs_swin.py --models rmt_t rmt_s rmt_b --batch 8 --threads 2 --rounds 7
    python scripts/cpu_latency_vs_swin.py --kernels auto reference ...   (each RMT model on each kernel)
    python scripts/cpu_latency_vs_swin.py --compile ...   (every model, Swin-T too, under torch.compile,
        as rmt bench compiles: static shapes)
    python scripts/cpu_latency_vs_swin.py --compile --freeze ...   (compiled with inductor's freezing)
    python scripts/cpu_latency_vs_swin.py --reparam ...   (each RMT model also reparameterized, RMT.reparameterize)
    python scripts/cpu_latency_vs_swin.py --dtype bf16 --reparam --weight-cache-ab ...
        (bf16 autocast; each folded model also without its weight cache, AutocastWeightCache)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import timm
import torch

import rmt  # noqa: F401  (registers the RMT variants with timm)
from rmt.bench.runner import compile_model, precision

BASELINE = "swin_tiny_patch4_window7_224"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["rmt_t", "rmt_s", "rmt_b"])
    parser.add_argument("--kernels", nargs="+", default=["auto"], help="attention kernels of the RMT models")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile every model, Swin-T included")
    parser.add_argument("--freeze", action="store_true", help="with --compile: inductor's freezing (rmt bench --freeze)")
    parser.add_argument("--reparam", action="store_true", help="also run each RMT model reparameterized for inference")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: CPU autocast")
    parser.add_argument("--weight-cache-ab", action="store_true",
                        help="with --reparam: also run each folded model with autocast's cache off, casting its weights every pass")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.freeze and not args.compile:
        parser.error("--freeze needs --compile")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    models = {BASELINE: timm.create_model(BASELINE, img_size=args.img_size).eval()}  # (built for 224 px otherwise)
    no_cache = set()  # labels run with autocast's cache off
    for name in args.models:
        for kernel in args.kernels:
            label = name if kernel == "auto" else f"{name}[{kernel}]"
            models[label] = timm.create_model(name, attn_kernel=kernel).eval()
            if args.reparam:
                models[f"{label}[reparam]"] = timm.create_model(name, attn_kernel=kernel).eval().reparameterize()
                if args.weight_cache_ab:
                    models[f"{label}[reparam,no-cache]"] = models[f"{label}[reparam]"]
                    no_cache.add(f"{label}[reparam,no-cache]")
    if args.compile:
        models = {label: compile_model(model, "default", args.freeze) for label, model in models.items()}
    names = list(models)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    times: dict[str, list[float]] = {n: [] for n in names}

    def run(name: str) -> None:
        with precision(torch.device("cpu"), args.dtype, autocast_cache=name not in no_cache):
            models[name](x)

    with torch.inference_mode():
        for _ in range(args.warmup):
            for name in names:
                run(name)
        for _ in range(args.rounds):
            for name in names:
                start = time.perf_counter()
                run(name)
                times[name].append((time.perf_counter() - start) * 1000)
    base = statistics.median(times[BASELINE])
    results = []
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, {args.img_size}px, {args.dtype}, "
          f"median of {args.rounds} interleaved rounds{', compiled' if args.compile else ''}{' and frozen' if args.freeze else ''}")
    for name in names:
        med = statistics.median(times[name])
        results.append({"model": name, "median_ms": round(med, 2), "ratio_to_swin_t": round(med / base, 3)})
        print(f"{name:36s} {med:9.1f} ms   x{med / base:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                       "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                       "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                       "kernels": args.kernels, "compiled": args.compile, "frozen": args.freeze, "reparam": args.reparam, "dtype": args.dtype,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
