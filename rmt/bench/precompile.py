"""Compile a benchmark's models in parallel processes first, so that the benchmark loads them.

A first ``torch.compile`` call spends most of its time in single-threaded Python (dynamo's
tracing, inductor's lowering) and in building the kernels inductor generates: 45 s for folded
rmt_s on a 2-core CPU, about 80 s on an H100's host. Inductor keeps what it builds on disk (its
FX graph cache and the compiled kernels), keyed by the graph and the settings, not by the
process, and a second process compiling the same graph loads it: 5.6 s against 44.8 s for that
rmt_s. :func:`warm_compile_caches` runs each (model, image size, batch) of a compiled benchmark
once, in up to ``compile_workers`` processes at a time, through the benchmark's own code path;
the benchmark then compiles its models one after another, as before, from the caches. What it
measures does not change: it runs the graphs and kernels it would have built itself, and the
launch configurations inductor picks by timing kernels on their first call are timed again in the
run, not taken from the processes, which timed them beside each other. The modes that choose
kernels by timing them while compiling (max-autotune) are refused for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from typing import IO, Iterable, Iterator, Optional, Sequence

from rmt.bench.runner import BenchSettings, run_benchmark

DEFAULT_TIMEOUT_S = 1200.0


def caches_enabled() -> bool:
    """Whether inductor may read what another process compiled (TORCHINDUCTOR_FORCE_DISABLE_CACHES off)."""
    import torch._inductor.config as inductor_config

    return bool(inductor_config.fx_graph_cache and not inductor_config.force_disable_caches)


def compile_jobs(runs: Iterable[BenchSettings]) -> list[BenchSettings]:
    """Each (model, image size, batch) of the compiled ``runs``, once, in the runs' order: the
    settings of one process of :func:`warm_compile_caches`, with one timed pass."""
    jobs = {json.dumps(asdict(job), sort_keys=True): job for job in (
        replace(settings, models=[name], img_sizes=[size], batches=[batch], warmup=2, iters=1, compile_workers=1,
                baseline=None)
        for settings in runs if settings.compile_mode
        for size in settings.img_sizes for batch in settings.batches for name in settings.models)}
    return list(jobs.values())


def warm_compile_caches(runs: Sequence[BenchSettings], workers: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Compile every (model, image size, batch) of the compiled ``runs`` once (:func:`compile_jobs`),
    ``workers`` processes at a time, each through :func:`run_benchmark` with one timed pass.
    Returns a note for each that failed or ran past ``timeout_s`` (all of them together): the
    benchmark compiles those itself. Each process holds its model and a batch on the device while
    it runs."""
    jobs = compile_jobs(runs)
    if not jobs:
        return []
    if not caches_enabled():
        return ["inductor's caches are off (TORCHINDUCTOR_FORCE_DISABLE_CACHES): the models were not "
                "compiled ahead, each compiled in the run"]
    workers = max(1, min(workers, len(jobs)))
    env = dict(os.environ)
    # the processes share the cores: inductor's own compile workers a share each
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    deadline = time.monotonic() + timeout_s
    pending = list(enumerate(jobs))
    running: list[tuple[int, BenchSettings, subprocess.Popen, IO[str]]] = []
    notes: dict[int, str] = {}  # by job, so that they come in the run's order
    try:
        with _exit_on_sigterm():
            while (pending or running) and time.monotonic() <= deadline:
                while pending and len(running) < workers:
                    index, job = pending.pop(0)
                    log = tempfile.TemporaryFile(mode="w+")
                    child = subprocess.Popen(_child_command(job), stdout=subprocess.DEVNULL, stderr=log, env=env, text=True)
                    running.append((index, job, child, log))
                for entry in list(running):
                    index, job, child, log = entry
                    if child.poll() is not None:
                        running.remove(entry)
                        if child.returncode:
                            notes[index] = _failed(job, log)
                        log.close()
                time.sleep(0.2)
    finally:  # out of time, or interrupted: no process is left behind
        for index, job, child, log in running:
            if child.poll() is None:
                child.kill()
                child.wait()
                notes[index] = (f"precompiling {_label(job)} was still running when the {timeout_s:.0f} s for all of "
                                "them ran out; it was compiled in the run")
            elif child.returncode:
                notes[index] = _failed(job, log)
            log.close()
        for index, job in pending:
            notes[index] = f"precompiling {_label(job)} had not started when the {timeout_s:.0f} s ran out; it was compiled in the run"
    return [notes[index] for index in sorted(notes)]


@contextlib.contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """SIGTERM (a CI job's time limit, ``kill``) as SystemExit while the processes run: Python's
    default would end this one without its ``finally``, and leave them compiling."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # signals reach the main thread only; a handler already set is the caller's to keep
        return

    def exit_(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _child_command(job: BenchSettings) -> list[str]:
    return [sys.executable, "-m", "rmt.bench.precompile", json.dumps(asdict(job))]


def _label(job: BenchSettings) -> str:
    (h, w), = job.img_sizes
    return f"{job.models[0]} {h}x{w} b{job.batches[0]}"


def _failed(job: BenchSettings, log: IO[str]) -> str:
    """The note for a process that failed, with the last line it wrote."""
    log.seek(0)
    lines = [line.strip() for line in log.read().splitlines() if line.strip()]
    return f"precompiling {_label(job)} failed ({lines[-1][:200] if lines else 'no output'}); it was compiled in the run"


def main(argv: Optional[list[str]] = None) -> int:
    """One job of :func:`warm_compile_caches`: its settings as JSON in the first argument."""
    import torch._inductor.config as inductor_config

    fields = json.loads((argv if argv is not None else sys.argv[1:])[0])
    fields["img_sizes"] = [tuple(size) for size in fields["img_sizes"]]
    # kernels whose launch configuration inductor picks by timing them on their first call: timed
    # here beside the other processes, so the run times them again itself, on its own
    inductor_config.autotune_local_cache = False
    report = run_benchmark(BenchSettings(**fields))
    failed = [row for row in report["results"] if row["status"] != "ok"]
    if failed:
        print(f"{failed[0]['status']}: {failed[0]['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
