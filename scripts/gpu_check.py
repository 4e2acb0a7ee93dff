"""The CUDA benchmark matrix of docs/performance.md, in priority order, inside a time budget.

Runs through rmt.bench.runner with the models `rmt bench` builds (random weights: no cache is
read) and writes everything into one file, OUT/gpu_check.json (rewritten after each job): each
job's schema-1 report, the profiles, and a summary table, which is also printed at the end.
Jobs that would start after the budget is spent are skipped and listed as skipped.

    OUT=runs/gpu python scripts/gpu_check.py --budget 420
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rmt.bench.precompile import compile_jobs, warm_compile_caches
from rmt.bench.runner import BenchSettings, run_benchmark
from rmt.io import write_json_atomic

RMT = ["rmt_t", "rmt_s", "rmt_b"]
SWIN = ["swin_t", "swin_s", "swin_b"]

# (job name, settings, RMT attention kernel); most important first. The profile jobs list the
# top device operators, batch 64, of (model, folded, compile mode) each.
JOBS = [
    ("eager_bf16", dict(models=RMT + SWIN, batches=[64, 256]), None),
    # folded for inference (RMT.reparameterize): no float32 layer norms and their copies, fewer bias adds
    ("eager_reparam_bf16", dict(models=RMT + ["swin_t"], batches=[64, 256], reparameterize=True), None),
    # the eager passes replayed from CUDA graphs (rmt bench --cuda-graph): the GPU's time for the
    # eager kernels, without the launches that bound eager RMT at batch 64, and without compiling
    ("eager_cuda_graph_reparam_bf16", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[64, 256], reparameterize=True, cuda_graph=True), None),
    # the folded models casting their weights on every pass, without their weight cache (autocast's cache off)
    ("eager_reparam_no_weight_cache_bf16", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[64, 256], reparameterize=True, autocast_cache=False), None),
    # the folded models compiled (compiling three models took 233 s on an H100: with the default
    # budget these two may need a call of their own, --only ...)
    ("compiled_reparam_bf16", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[64], compile_mode="default", reparameterize=True), None),
    ("cuda_graphs_reparam_bf16", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[64], compile_mode="reduce-overhead", reparameterize=True), None),
    # the same with the Triton kernel in the graph (auto compiles the plain math): which to pick
    # for compiled models (on an H200, as built, it was 12.3 against 13.1 ms under CUDA graphs)
    ("cuda_graphs_reparam_triton_bf16", dict(models=["rmt_t", "rmt_s"], batches=[64], compile_mode="reduce-overhead", reparameterize=True), "triton"),
    ("compiled_reparam_triton_bf16", dict(models=["rmt_t", "rmt_s"], batches=[64], compile_mode="default", reparameterize=True), "triton"),
    # the official-style plain path, and SDPA as torch dispatches it, on the same card
    ("reference_bf16", dict(models=RMT, batches=[64, 256]), "reference"),
    ("sdpa_bf16", dict(models=["rmt_t", "rmt_s"], batches=[64]), "sdpa"),
    ("profile", dict(profiles=[("rmt_s", False, None), ("rmt_s", True, None), ("swin_t", False, None)]), None),
    # where the GPU time of the compiled models goes: inductor's fused kernels by name
    # (two compiles of about 80 s on an H100: with the default budget, a call of its own, --only ...)
    ("profile_compiled", dict(profiles=[("rmt_s", True, "default"), ("swin_t", False, "default")]), None),
    # compiled with inductor's freezing (rmt bench --freeze): the weights' bf16 casts made once
    # when compiling instead of in every pass (docs/performance.md, "Freezing compiled graphs")
    ("compiled_reparam_frozen_bf16", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[64], compile_mode="default", reparameterize=True, freeze=True), None),
    ("cuda_graphs_reparam_frozen_bf16", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[64], compile_mode="reduce-overhead", reparameterize=True, freeze=True), None),
    ("compiled_bf16", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[64], compile_mode="default"), None),
    # the Triton kernel inside a compiled graph (auto compiles the plain math instead)
    ("compiled_triton_bf16", dict(models=["rmt_s"], batches=[64], compile_mode="default"), "triton"),
    # CUDA graphs: no CPU time per kernel launch, which bounds RMT's eager speed at batch 64
    ("cuda_graphs_bf16", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[64], compile_mode="reduce-overhead"), None),
    ("cuda_graphs_triton_bf16", dict(models=["rmt_s"], batches=[64], compile_mode="reduce-overhead"), "triton"),
    ("resolution_bf16", dict(models=["rmt_s", "swin_t"], batches=[1, 8], img_sizes=[(512, 512), (768, 768), (1024, 1024)]), None),
    ("cuda_graphs_small_bf16", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[1, 8], compile_mode="reduce-overhead"), None),
    ("compiled_bf16_b256", dict(models=["rmt_t", "rmt_s", "swin_t"], batches=[256], compile_mode="default"), None),
]


def _profile(device: str, profiles: list[tuple[str, bool, str | None]], batch: int, size: int) -> dict:
    """Top operators by device time (bf16) for each (model, folded, compile mode): where time
    goes. The traces go to a temporary folder; only the tables are kept."""
    from rmt.bench.profile import profile_model

    tables = {}
    with tempfile.TemporaryDirectory() as traces:
        for name, folded, compile_mode in profiles:
            summary = profile_model(name, traces, batch=batch, img_size=(size, size), device=device, dtype="bf16", top=20,
                                    reparameterize=folded, compile_mode=compile_mode)
            label = name + ("[reparam]" if folded else "") + (f"[compiled:{compile_mode}]" if compile_mode else "")
            tables[label] = summary["top_ops"]
            print(f"-- {label}: top ops by {summary['time']} per step")
            for op in summary["top_ops"]:
                print(f"   {op['op'][:60]:60s} {op['self_ms']:8.3f} ms {op['share']:6.1%} x{op['calls_per_step']}")
    return tables


def _settings(spec: dict, kernel: str | None, args: argparse.Namespace) -> BenchSettings:
    """A benchmark job's settings, with the command line's overrides."""
    if args.models:
        spec = {**spec, "models": [m for m in spec["models"] if m in args.models]}
    if args.batches:
        spec = {**spec, "batches": args.batches}
    if args.img_sizes:
        spec = {**spec, "img_sizes": [(s, s) for s in args.img_sizes]}
    return BenchSettings(device=args.device, dtype="bf16", warmup=args.warmup, iters=args.iters,
                         attn_kernel=kernel, baseline="swin_t" if "swin_t" in spec["models"] else None, **spec)


def _precompile(jobs: list, args: argparse.Namespace, results: dict, seconds: float) -> None:
    """Compile the first --compile-workers models and settings of the compiled jobs ahead, all at
    once, so that those jobs load them from inductor's caches (compiling took about 80 s a model
    on an H100); later ones compile as they come."""
    singles = compile_jobs(_settings(spec, kernel, args) for _, spec, kernel in jobs
                           if spec.get("compile_mode"))[:args.compile_workers]
    t0 = time.perf_counter()
    print(f"[precompile] {len(singles)} models and settings at once ...", flush=True)
    notes = warm_compile_caches(singles, args.compile_workers, timeout_s=seconds)
    results["precompile"] = {"seconds": round(time.perf_counter() - t0, 1), "models_and_settings": len(singles), "notes": notes}
    print(f"[precompile] done in {time.perf_counter() - t0:.0f} s" + "".join(f"\n  {n}" for n in notes), flush=True)


def _run_job(name: str, spec: dict, kernel: str | None, args: argparse.Namespace, results: dict) -> None:
    if "profiles" in spec:
        profiles = [p for p in spec["profiles"] if not args.models or p[0] in args.models]
        batch, size = (args.batches or [64])[0], (args.img_sizes or [224])[0]
        results["profiles"].update(_profile(args.device, profiles, batch, size))
        return
    report = run_benchmark(_settings(spec, kernel, args))
    results["jobs"][name] = report
    for r in report["results"]:
        results["summary"].append({
            "job": name, "model": r["model"] + ("[reparam]" if r.get("reparameterized") else "") + ("[frozen]" if r.get("frozen") else ""), "batch": r["batch"], "img": f"{r['img_size'][0]}x{r['img_size'][1]}",
            "img_s": r["throughput"], "ratio": r.get("ratio_to_baseline"), "ms": (r["latency_ms"] or {}).get("median"),
            "mem_mb": r["peak_memory_mb"], "mfu": r["mfu"], "ops": ",".join(o.split("::")[-1] for o in r["attention_ops"])[:60],
            "graphs": r.get("compiled_graphs"), "breaks": r.get("graph_breaks"),
            "status": r["status"] if r["status"] == "ok" else f"{r['status']}: {r['error']}",
        })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; jobs not started by then are skipped")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--only", nargs="*", help="job names to run")
    parser.add_argument("--device", default="cuda", help="cpu for a dry run of the script itself")
    parser.add_argument("--models", nargs="*", help="run only these of each job's models")
    parser.add_argument("--batches", type=int, nargs="*", help="override every job's batch sizes (dry runs)")
    parser.add_argument("--img-sizes", type=int, nargs="*", help="override every job's square image sizes (dry runs)")
    parser.add_argument("--compile-workers", type=int, default=12,
                        help="before the first compiled job, compile this many of the compiled jobs' models and "
                             "settings ahead, all at once (1: each job compiles its own, one model at a time)")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "runs/gpu_check"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict = {"jobs": {}, "profiles": {}, "summary": []}
    summary = results["summary"]
    selected = [job for job in JOBS if not args.only or job[0] in args.only]
    precompiled = args.compile_workers <= 1
    for index, (name, spec, kernel) in enumerate(selected):
        left = args.budget - (time.perf_counter() - start)
        if spec.get("compile_mode") and not precompiled and left >= 60:  # less: the job compiles its own
            _precompile(selected[index:], args, results, left)
            precompiled = True
        elapsed = time.perf_counter() - start
        if elapsed > args.budget:
            print(f"[skip] {name}: budget spent ({elapsed:.0f} s)", flush=True)
            summary.append({"job": name, "status": "skipped"})
            continue
        t0 = time.perf_counter()
        print(f"[run] {name} ...", flush=True)
        try:
            _run_job(name, spec, kernel, args, results)
        except Exception as e:  # recorded; the next job still runs
            summary.append({"job": name, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(f"[error] {name}: {type(e).__name__}: {e}", flush=True)
        write_json_atomic(out / "gpu_check.json", results)
        print(f"[done] {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"{'job':24s} {'model':15s} {'b':>4s} {'img':>9s} {'img/s':>9s} {'ratio':>6s} {'ms':>8s} {'MB':>8s} {'MFU':>6s} status/ops")
    for s in summary:
        if "model" not in s:  # a skipped or failed job
            print(f"{s['job']:24s} {s['status']}")
            continue
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{s['job']:24s} {s['model']:15s} {s['batch']:>4d} {s['img']:>9s} {fmt(s['img_s'], '9.1f')} "
              f"{fmt(s['ratio'], '6.2f')} {fmt(s['ms'], '8.2f')} {fmt(s['mem_mb'], '8.0f')} "
              f"{fmt(s['mfu'] * 100 if s['mfu'] is not None else None, '5.1f')}% {s['status'] if s['status'] != 'ok' else s['ops']}"
              + (f" [{s['graphs']} graphs, {s['breaks']} breaks]" if s.get("graphs") is not None else ""))


if __name__ == "__main__":
    main()
