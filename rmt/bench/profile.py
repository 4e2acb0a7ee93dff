"""``rmt profile``: a torch.profiler trace of a model's forward pass, for TensorBoard and Perfetto."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from rmt.bench.env import resolve_device
from rmt.bench.runner import (
    DTYPES, build_model, check_batch, check_compile_mode, check_freeze, check_img_size, compile_counts,
    compile_counts_since, compile_model, precision, quiet_stderr,
)
from rmt.errors import RMTError
from rmt.zoo import fold_for_inference


def profile_model(
    name: str,
    out_dir: os.PathLike | str,
    batch: int = 8,
    img_size: tuple[int, int] = (224, 224),
    device: str = "auto",
    dtype: str = "fp32",
    memory: bool = False,
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
    top: int = 15,
    model: Optional[torch.nn.Module] = None,
    reparameterize: bool = False,
    compile_mode: Optional[str] = None,
    freeze: bool = False,
) -> dict[str, Any]:
    """Profile ``wait + warmup + active`` forward passes on a schedule and write the trace to ``out_dir``.

    Returns the trace files, the top operators by self time (device time on CUDA) and, with
    ``memory``, their memory use. ``reparameterize`` folds the model for inference first
    (:func:`rmt.zoo.fold_for_inference`). ``compile_mode`` profiles the model compiled
    with that ``torch.compile`` mode and static shapes, as ``rmt bench --compile`` runs it: the
    first (wait) step compiles, and the fused kernels are the operators listed. It starts with
    ``torch.compiler.reset()``, which drops every compiled function of this process. ``freeze``
    compiles with inductor's freezing (:class:`rmt.bench.runner.FrozenCompiled`).
    """
    if dtype not in DTYPES:
        raise RMTError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_batch(batch)
    if model is None:  # (a model of the caller's own may take smaller images than RMT's 32)
        check_img_size(*img_size)
    for what, value, least in (("active steps", active, 1), ("top", top, 1),
                               ("wait steps", wait, 0), ("warmup steps", warmup, 0)):
        if value < least:
            raise RMTError(f"{what} must be at least {least}, got {value}")
    check_compile_mode(compile_mode)
    check_freeze(compile_mode, freeze)
    if compile_mode is not None and wait + warmup < 2:
        # CUDA graphs are recorded on a model's second call: profiled steps should replay them
        raise RMTError("a compiled model needs wait + warmup >= 2 steps before the profiled ones")
    if not os.fspath(out_dir):
        raise RMTError("cannot write traces to an empty path: give a folder")
    out = Path(out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists()), None)  # mkdir would say "File exists" or "Not a directory"
    if blocker is not None and not blocker.is_dir():
        raise RMTError(f"cannot write traces to {out}: {blocker} is a file, not a folder")
    dev = resolve_device(device)
    if model is None:  # an unknown name fails before the trace directory is made
        model = build_model(name, img_size)
    model = model.eval()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RMTError(f"cannot create {out}: {e.strerror or e}") from None
    before = set(out.glob("**/*.pt.trace.json*"))
    folded = False
    if reparameterize:
        folded = fold_for_inference(model, name)
    model = model.to(dev)
    if compile_mode is not None:
        # graphs of an earlier compile in this process would be reused uncounted
        torch.compiler.reset()
        model = compile_model(model, compile_mode, freeze)
    x = torch.randn(batch, 3, *img_size, device=dev)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1)
    compiled_before = compile_counts()
    with torch.inference_mode(), quiet_stderr(), torch.profiler.profile(
        activities=activities,
        schedule=schedule,
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(out), worker_name=name),
        record_shapes=True,
        profile_memory=memory,
    ) as prof:
        for _ in range(wait + warmup + active):
            with precision(dev, dtype):
                model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            prof.step()
    traces = sorted(set(out.glob("**/*.pt.trace.json*")) - before)
    graphs, breaks = compile_counts_since(compiled_before)
    on_cuda = dev.type == "cuda"

    def self_time(e: Any) -> float:  # microseconds
        return e.self_device_time_total if on_cuda else e.self_cpu_time_total

    events = sorted((e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")), key=lambda e: -self_time(e))
    total = sum(self_time(e) for e in events) or 1.0
    top_ops = []
    for e in events[:top]:
        entry = {"op": e.key, "self_ms": round(self_time(e) / 1000 / active, 3),
                 "share": round(self_time(e) / total, 4), "calls_per_step": e.count // active}
        if memory:
            used = e.self_device_memory_usage if on_cuda else e.self_cpu_memory_usage
            entry["self_memory_mb"] = round(used / 2**20, 2)
        top_ops.append(entry)
    return {
        "model": name,
        "device": str(dev),
        "dtype": dtype,
        "batch": batch,
        "img_size": list(img_size),
        "reparameterized": folded,
        "compile": compile_mode,
        "frozen": freeze,
        "compiled_graphs": graphs if compile_mode else None,
        "graph_breaks": breaks if compile_mode else None,
        "steps": {"wait": wait, "warmup": warmup, "active": active},
        "time": "device (CUDA) self time" if on_cuda else "CPU self time",
        "trace_files": [str(t) for t in traces],
        "top_ops": top_ops,
        "open": {
            "tensorboard": f"pip install 'rmt[tensorboard]' && tensorboard --logdir {out}",
            "perfetto": "open https://ui.perfetto.dev and load the .pt.trace.json file (or chrome://tracing)",
        },
    }
