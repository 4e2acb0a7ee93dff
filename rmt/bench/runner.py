"""Inference benchmarks: throughput, latency spread, peak memory, GMACs and MFU per model.

Method (docs/bench.md):
- eval mode and ``torch.inference_mode``; one fixed random input per setting;
- warmup, then ``iters`` rounds in which every model runs once in turn (interleaved, so clock
  and thermal drift hit all models alike); per-iteration time from CUDA events with a
  synchronisation on GPU, ``time.perf_counter`` on CPU;
- peak memory in a pass of its own (CUDA: the model's weights and input plus the growth of
  ``max_memory_allocated`` over what the run holds before the pass, after the timing; CPU: the
  growth of the process's peak RSS during the first warmup pass);
- a failure (OOM, error) marks that model's row and the run goes on.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from rmt.bench.devices import peak_tflops
from rmt.bench.env import environment, resolve_device
from rmt.bench.flops import count_flops
from rmt.errors import RMTError, first_line, is_out_of_memory
from rmt.models.attention import ManhattanPosition, resolve_attention_kernel
from rmt.models.layers import AutocastWeightCache
from rmt.zoo.models import fold_for_inference, has_folds

SCHEMA_VERSION = 1
DTYPES = ("fp32", "tf32", "bf16", "fp16")
DEFAULT_MODELS = ("rmt_t", "rmt_s", "rmt_b", "rmt_l", "swin_t", "swin_s", "swin_b")
CPU_TIME_BUDGET_S = 150.0
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

Progress = Callable[[str, int, int], None]  # (what is running, steps done, steps in all)


def check_compile_mode(mode: Optional[str]) -> None:
    """Raise a one-line RMTError unless ``mode`` is None (eager) or a torch.compile mode."""
    if mode is not None and mode not in COMPILE_MODES:
        raise RMTError(f"unknown compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")


def compile_model(model: nn.Module, mode: str, freeze: bool = False) -> nn.Module:
    """``torch.compile`` as ``rmt bench --compile MODE`` runs it: static shapes, so that each setting
    measures the kernels specialised for its own size and batch. ``freeze``: with inductor's
    freezing (:class:`FrozenCompiled`)."""
    compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
    return FrozenCompiled(compiled) if freeze else compiled


class FrozenCompiled(nn.Module):
    """Calls a compiled model with inductor's freezing on, for inference: the weights become
    constants of the graph, so their casts to the autocast dtype, layout changes and CPU weight
    packing are done once, at compile time, instead of on every pass. The graph keeps the values
    it was compiled with: in-place changes to the parameters (an optimizer step,
    ``load_state_dict``) do not reach it.

    Dynamo and inductor read ``torch._inductor.config.freezing`` while they trace and compile, on
    the first call (and on any recompile), and only without autograd; hence the flag and
    ``no_grad`` around each call. (``torch.compile(options={"freezing": True})`` does not reach
    dynamo: on torch 2.14 it compiled without freezing, silently.)
    """

    def __init__(self, compiled: nn.Module) -> None:
        import torch._inductor.config as inductor_config  # imports inductor: only when freezing

        super().__init__()
        self.compiled = compiled
        self._freezing = inductor_config.patch(freezing=True)  # re-entrant: made once, not per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._freezing:
            return self.compiled(x)


def check_freeze(compile_mode: Optional[str], freeze: bool) -> None:
    """Raise a one-line RMTError for ``freeze`` without a compile mode."""
    if freeze and compile_mode is None:
        raise RMTError("--freeze needs --compile: freezing applies to compiled graphs only")


_CAPTURE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def capture_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream every CUDA graph capture of this process runs on, one per GPU: each new
    stream gets a cuBLAS workspace of its own, allocated on its first matmul and never freed."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _CAPTURE_STREAMS[device]


def run_on_capture_stream(fn: Callable[[], Any], device: torch.device) -> Any:
    """``fn()`` on :func:`capture_stream`, ordered after and before the current stream's work."""
    stream, current = capture_stream(device), torch.cuda.current_stream(device)
    stream.wait_stream(current)
    try:
        # (the stream's context restores the current stream even if fn raises)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            return fn()
    finally:  # a failure too: what the current stream frees next may still be in use there
        current.wait_stream(stream)


def capture_failure(error: Exception) -> Exception:
    """What a failed CUDA graph capture raises: its cause (a capture that an operation broke ends
    in ``capture_end``'s own error, raised while the first one was handled), as it is if out of
    memory, so that ``--retry-oom`` retries with half the batch; otherwise one RMTError naming it."""
    cause = error.__context__ if error.__context__ is not None else error
    if is_out_of_memory(cause):
        return cause
    return RMTError(f"capturing a CUDA graph failed: {type(cause).__name__}: {first_line(cause)}")


class CUDAGraphed(nn.Module):
    """An eager model's forward pass on one input, captured once in a CUDA graph and replayed.

    Replaying launches every kernel of the pass in one call, without the Python, dispatch and
    launch work of eager mode: the GPU's own time for the eager kernels. The capture runs on
    :func:`capture_stream` after a pass there, under the caller's autocast and grad mode, once
    the model has warmed up (Triton and cuDNN choose and compile their kernels on first calls,
    which a capture cannot do). So the graph reads what that pass cached: RMT's position tables,
    and the weight cache's bf16 copies, which it keeps a set of per stream (made on the capture's
    stream, they are read by the graph, not cast again in it). Autocast's own cache is emptied
    before the capture: its casts, made outside the graph's memory, are freed when autocast ends,
    so the graph makes its own. The graph keeps the memory of the captured pass (its private
    pool) and writes one output tensor, overwritten by each replay. While it lives the model must
    not change, nor run eagerly on another stream, which would replace the copies it reads. A call
    with another tensor copies it into the captured input first; its shape, dtype and device must
    be the captured one's.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.static_input = x
        self.graph = torch.cuda.CUDAGraph()

        def capture() -> torch.Tensor:
            model(x)
            torch.clear_autocast_cache()
            try:
                with torch.cuda.graph(self.graph, stream=capture_stream(x.device)):
                    return model(x)
            except Exception as error:
                failure = capture_failure(error)
                if failure is error:
                    raise
                # (the cause re-raised as it was, or the RMTError with the capture's error behind it)
                raise failure from (None if failure is error.__context__ else error)

        self.static_output = run_on_capture_stream(capture, x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self.static_input:
            if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype or x.device != self.static_input.device:
                raise RMTError(f"this CUDA graph was captured for a {tuple(self.static_input.shape)} "
                               f"{self.static_input.dtype} input on {self.static_input.device}, got "
                               f"{tuple(x.shape)} {x.dtype} on {x.device}")
            self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output


@dataclass
class BenchSettings:
    models: Sequence[str] = DEFAULT_MODELS
    batches: Sequence[int] = (64,)
    img_sizes: Sequence[tuple[int, int]] = ((224, 224),)
    device: str = "auto"
    dtype: Optional[str] = None  # None: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = False
    compile_mode: Optional[str] = None  # None: eager; else a torch.compile mode ("default", ...)
    freeze: bool = False  # with compile_mode: compile with inductor's freezing (FrozenCompiled)
    cuda_graph: bool = False  # eager models replayed from a CUDA graph captured after the warmup (CUDAGraphed)
    warmup: Optional[int] = None  # None: 10 on CUDA, 1 on CPU
    iters: Optional[int] = None  # None: 50 on CUDA; on CPU as many (1-5) as the time budget allows
    attn_kernel: Optional[str] = None  # RMT models only; None: the model's default
    reparameterize: bool = False  # fold every model for inference first (rmt.zoo.fold_for_inference)
    # False: torch.autocast(cache_enabled=False), which also turns off RMT's weight cache, so RMT
    # casts its weights on every pass as timm models do (rmt.models.layers.AutocastWeightCache)
    autocast_cache: bool = True
    time_budget_s: float = CPU_TIME_BUDGET_S
    retry_oom: bool = False
    baseline: Optional[str] = None  # ratios are to this model (default: the first one)
    # with compile_mode: compile every model and setting in up to this many processes at once
    # first, so that the run's own compiles load them from inductor's caches (rmt.bench.precompile)
    compile_workers: int = 1

    def validate(self) -> None:
        if not self.models:
            raise RMTError("no models to benchmark")
        if not self.batches or not self.img_sizes:
            raise RMTError(f"no {'batch sizes' if not self.batches else 'image sizes'} to benchmark")
        # two rows of one model and setting would make the baseline and compare's matching ambiguous
        for what, values in (("model", list(self.models)), ("batch size", list(self.batches)),
                             ("image size", [f"{h}x{w}" for h, w in self.img_sizes])):
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise RMTError(f"{what} {', '.join(repeated)} listed more than once")
        if not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            raise RMTError(f"the time budget must be a positive number of seconds, got {self.time_budget_s:g}")
        check_compile_mode(self.compile_mode)
        check_freeze(self.compile_mode, self.freeze)
        if self.cuda_graph:
            if self.compile_mode is not None:
                raise RMTError("--cuda-graph captures eager models: for compiled ones, --compile reduce-overhead "
                               "records CUDA graphs")
            if resolve_device(self.device).type != "cuda":
                raise RMTError(f"--cuda-graph needs a CUDA device; this run's is {resolve_device(self.device)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise RMTError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        for batch in self.batches:
            check_batch(batch)
        for h, w in self.img_sizes:
            check_img_size(h, w)
        if self.attn_kernel is not None:
            resolve_attention_kernel(self.attn_kernel)
        for name, value in (("warmup", self.warmup), ("iters", self.iters)):
            if value is not None and value < (0 if name == "warmup" else 1):
                raise RMTError(f"--{name} must be {'>= 0' if name == 'warmup' else '>= 1'}, got {value}")
        if self.baseline is not None and self.baseline not in self.models:
            raise RMTError(f"baseline {self.baseline!r} is not among the benchmarked models")
        if self.compile_workers < 1:
            raise RMTError(f"--compile-workers must be >= 1, got {self.compile_workers}")
        if self.compile_workers > 1 and self.compile_mode is None:
            raise RMTError("--compile-workers needs --compile: it compiles the models ahead of the run")
        if self.compile_workers > 1 and self.compile_mode.startswith("max-autotune"):
            # those modes time kernel candidates while compiling and keep the choice in the graph
            raise RMTError(f"--compile-workers does not take --compile {self.compile_mode}: it would choose kernels "
                           "by timing them beside the other compiling processes")


@dataclass
class _Candidate:
    name: str
    model: Optional[nn.Module] = None
    row: dict[str, Any] = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list)
    x: Optional[torch.Tensor] = None  # the input batch, set by the warmup
    warm_ms: float = 0.0  # the last warmup pass (sizes the CPU time budget)


MIN_IMG_SIZE = 32  # one token at stride 32
# far beyond any memory (and torch's int64 sizes), so that a typo is one clear error, not an overflow
MAX_IMG_SIZE = 1 << 16
MAX_BATCH = 1 << 20


def check_img_size(h: int, w: int) -> None:
    if min(h, w) < MIN_IMG_SIZE:
        raise RMTError(f"image size {h}x{w} is too small: at least {MIN_IMG_SIZE}x{MIN_IMG_SIZE}")
    if max(h, w) > MAX_IMG_SIZE:
        raise RMTError(f"image size {h}x{w} is too large: at most {MAX_IMG_SIZE} a side")


def check_batch(batch: int) -> None:
    if not 1 <= batch <= MAX_BATCH:
        raise RMTError(f"batch size {batch} is out of range: 1 to {MAX_BATCH:,}")


def parse_img_size(text: str) -> tuple[int, int]:
    """``224`` or ``HxW`` (``512x768``), each side from 32 to 65536."""
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise RMTError(f"image size {text!r} is not N or HxW") from None
    if len(values) not in (1, 2):
        raise RMTError(f"image size {text!r} is not N or HxW")
    h, w = values[0], values[-1]
    check_img_size(h, w)
    return h, w


def latency_stats(times_ms: Sequence[float]) -> dict[str, float]:
    """Median, p90, p99, interquartile range, mean and min of per-iteration latencies."""
    ordered = sorted(times_ms)

    def pct(p: float) -> float:  # linear interpolation between closest ranks
        if len(ordered) == 1:
            return ordered[0]
        k = (len(ordered) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {
        "median": round(statistics.median(ordered), 4),
        "p90": round(pct(90), 4),
        "p99": round(pct(99), 4),
        "iqr": round(pct(75) - pct(25), 4),
        "mean": round(statistics.fmean(ordered), 4),
        "min": round(ordered[0], 4),
    }


@contextlib.contextmanager
def precision(device: torch.device, dtype: str, autocast_cache: bool = True) -> Iterator[None]:
    """fp32 with TF32 off or on, or bf16/fp16 autocast (with its cast cache on or off); flags
    restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    try:
        if dtype in ("bf16", "fp16"):
            low = torch.bfloat16 if dtype == "bf16" else torch.float16
            with torch.autocast(device.type, dtype=low, cache_enabled=autocast_cache):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _short_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}"[:300]


class _PeakRSS:
    """Peak resident-memory growth of this process around a block (Linux: VmHWM reset via clear_refs)."""

    def __init__(self) -> None:
        self.growth_mb: Optional[float] = None

    @staticmethod
    def _status(field_name: str) -> Optional[int]:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])  # kB
        except OSError:
            return None
        return None

    def __enter__(self) -> "_PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._reset = True
        except OSError:
            self._reset = False
        self._before = self._status("VmRSS")
        return self

    def __exit__(self, *exc: Any) -> None:
        peak = self._status("VmHWM")
        if self._reset and peak is not None and self._before is not None:
            self.growth_mb = round(max(peak - self._before, 0) / 1024, 1)


def _timed_forward(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Milliseconds for one forward pass of one batch."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    model(x)
    return (time.perf_counter() - begin) * 1000


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines); Python errors still raise."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def recording_attention_ops() -> Iterator[list[str]]:
    """The attention kernels that the code inside really dispatches to (SDPA backend,
    FlexAttention, RMT's Triton kernel...), listed into the yielded list on leaving."""
    found: list[str] = []
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        yield found
    keep = ("attention", "flex", "bmm", "softmax")
    found.extend(sorted(
        n for n in {e.key for e in prof.key_averages()}
        if any(k in n.lower() for k in keep) and n.startswith(("aten::", "flex", "rmt::"))
    ))


def attention_ops(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The attention kernels a forward pass of ``model`` really dispatches to."""
    with recording_attention_ops() as found:
        model(x)
    return found


Builder = Callable[[tuple[int, int]], nn.Module]  # image size -> model


def build_model(name: str, size: tuple[int, int], attn_kernel: Optional[str] = None) -> nn.Module:
    """A zoo or timm model (random weights) ready for an input of ``size``.

    RMT takes any size; timm models with a fixed input grid (Swin, ViT) are built for ``size``
    when they accept ``img_size``, others (ConvNets) take any size as they are.
    """
    from rmt import zoo

    entry = zoo.get_entry(name)
    if entry.is_rmt:
        return zoo.create_model(name, **({"attn_kernel": attn_kernel} if attn_kernel else {}))
    default_size = tuple(entry.preprocessing.get("input_size", (3, 224, 224))[1:])
    if size != default_size:
        try:
            return zoo.create_model(name, img_size=size)
        except TypeError as e:  # this architecture has no img_size argument: it is size-agnostic
            if "img_size" not in str(e):
                raise
    return zoo.create_model(name)


def _model_builder(name: str, attn_kernel: Optional[str]) -> Builder:
    from rmt import zoo

    zoo.get_entry(name)  # unknown names fail before anything runs
    return lambda size: build_model(name, size, attn_kernel)


def run_benchmark(
    settings: BenchSettings,
    progress: Optional[Progress] = None,
    builders: Optional[dict[str, Builder]] = None,
) -> dict[str, Any]:
    """Benchmark every model at every (image size, batch) setting; returns the schema-1 report.

    ``builders`` maps model names to constructors taking the image size (default: the zoo); each
    call must return a new model (``reparameterize`` folds it in place). With ``compile_mode``,
    each setting starts with ``torch.compiler.reset()``, which drops every compiled function of
    this process, not only the benchmark's, and ``compile_workers`` above 1 first compiles the
    zoo's models in that many processes at once (:mod:`rmt.bench.precompile`).
    """
    settings.validate()
    device = resolve_device(settings.device)
    if settings.dtype is None:
        settings = replace(settings, dtype="bf16" if device.type == "cuda" else "fp32")
    custom_builders = builders is not None
    if builders is None:
        builders = {name: _model_builder(name, settings.attn_kernel) for name in settings.models}
    on_cuda = device.type == "cuda"
    warmup = settings.warmup if settings.warmup is not None else (10 if on_cuda else 1)
    if not on_cuda:  # the first CPU pass measures memory and sizes the time budget: always one
        warmup = max(warmup, 1)
    if settings.compile_mode:  # the first pass compiles, the second lists the attention ops (_warm_up)
        warmup = max(warmup, 2)
    budgeted = settings.iters is None and not on_cuda
    notes = []
    if not on_cuda:
        notes.append("CPU figures are not GPU figures: run on a CUDA machine for GPU throughput")
    elif settings.freeze:  # the frozen copies are made when compiling, before the memory pass
        notes.append("frozen: peak memory counts the weights as the model holds them, not the copies "
                     "the frozen graphs keep (cast to the autocast dtype or laid out anew)")
    if settings.compile_mode and settings.compile_workers > 1:
        if progress:
            progress(f"compiling the models ahead, {settings.compile_workers} processes at a time", 0, 1)
        notes.extend(_precompile(settings, custom_builders))
    baseline = settings.baseline or settings.models[0]
    grid = [(size, batch) for size in settings.img_sizes for batch in settings.batches]
    total_steps = len(grid) * len(settings.models) * 3
    done = 0
    started = time.perf_counter()
    flops_cache: dict[tuple[str, tuple[int, int]], int] = {}  # GMACs do not depend on the batch
    rows: list[dict[str, Any]] = []
    unfolded: set[str] = set()  # models with something to fold, run as built

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(what, done, total_steps)

    with torch.inference_mode():
        for setting_index, (size, batch) in enumerate(grid):
            torch.manual_seed(0)
            if settings.compile_mode:
                # the previous setting's models are gone: without a reset, their entries would
                # count toward dynamo's per-function recompile limit (past it, a model silently
                # runs eager) and a new input size would turn on dynamic shapes
                torch.compiler.reset()
            candidates = [_Candidate(name) for name in settings.models]
            for c in candidates:
                c.row = _prepare(c, builders[c.name], settings, device, size, batch, flops_cache)
                if c.model is not None and not settings.reparameterize and has_folds(c.model):
                    unfolded.add(c.name)
                if c.model is not None:
                    c.row.update(_warm_up(c, settings, device, size, batch, warmup))
                step(f"{c.name} {size[0]}x{size[1]} b{batch}: warmup")
            live = [c for c in candidates if c.row["status"] == "ok"]
            iters = settings.iters or 50
            if budgeted:
                round_ms = sum(c.warm_ms for c in live) or 1.0
                remaining_s = settings.time_budget_s - (time.perf_counter() - started)
                settings_left = len(grid) - setting_index
                iters = max(1, min(5, int(remaining_s / settings_left * 1000 / round_ms)))
            for i in range(iters):
                for c in live:
                    if c.row["status"] != "ok":
                        continue
                    try:
                        with precision(device, settings.dtype, settings.autocast_cache):
                            c.times_ms.append(_timed_forward(c.model, c.x, device))
                    except Exception as e:  # keep going with the other models
                        _fail(c.row, e)
                if progress:
                    progress(f"{size[0]}x{size[1]} b{batch}: round {i + 1}/{iters}", done, total_steps)
            for c in candidates:
                step(f"{c.name}: timed")
            for c in candidates:
                if c.row["status"] == "ok" and c.times_ms:
                    _finish_row(c, settings, device)
                c.model = c.x = None
                step(f"{c.name}: memory")
                rows.append(c.row)
            if on_cuda:
                torch.cuda.empty_cache()
    if budgeted:
        counts = "-".join(str(n) for n in sorted({r["iters"] for r in rows if r.get("iters")})) or "0"
        notes.append(
            f"CPU run: {warmup} warmup and {counts} timed iteration(s) per model, chosen to fit a "
            f"{settings.time_budget_s:.0f} s budget (--iters overrides)"
        )
    if unfolded:  # what a deployment would run: the same outputs, fewer operators
        pronoun = "it" if len(unfolded) == 1 else "them"
        notes.append(f"{', '.join(sorted(unfolded))} ran as built: --reparam folds {pronoun} for inference first "
                     "(the same outputs within float32 rounding, fewer operators; docs/models.md)")
    for r in rows:
        where = f"{r['model']} {r['img_size'][0]}x{r['img_size'][1]} b{r['batch']}"
        if r["graph_breaks"]:  # a figure of several graphs with eager code between them
            notes.append(f"{where}: {graph_break_note(r['compiled_graphs'], r['graph_breaks'])}")
        elif settings.compile_mode and r["status"] == "ok" and r["compiled_graphs"] is None:
            notes.append(f"{where}: torch.compile reused the graphs of an earlier model of this setting; "
                         "that model's row counts them")
    _add_ratios(rows, baseline)
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            **{k: v for k, v in asdict(settings).items() if k not in ("models", "img_sizes", "batches")},
            "models": list(settings.models),
            "batches": list(settings.batches),
            "img_sizes": [list(s) for s in settings.img_sizes],
            "warmup": warmup,
            "baseline": baseline,
        },
        "env": {**environment(device), "dtype": settings.dtype},
        "notes": notes,
        "results": rows,
    }


def _precompile(settings: BenchSettings, custom_builders: bool) -> list[str]:
    from rmt.bench import precompile

    if custom_builders:  # other processes can build only what the zoo names
        return ["--compile-workers: models given as builders compile in this process only"]
    return precompile.warm_compile_caches([settings], settings.compile_workers)


def _base_row(name: str, settings: BenchSettings, device: torch.device, size: tuple[int, int], batch: int) -> dict[str, Any]:
    return {
        "model": name,
        "batch": batch,
        "requested_batch": batch,
        "img_size": list(size),
        "device": str(device),
        "dtype": settings.dtype,
        "channels_last": settings.channels_last,
        "compile": settings.compile_mode,
        "frozen": settings.freeze,
        "cuda_graph": settings.cuda_graph,
        "attn_kernel": None,
        "reparameterized": False,
        "attention_ops": [],
        "compiled_graphs": None,
        "graph_breaks": None,
        "first_call_s": None,
        "params": None,
        "gmacs": None,
        "throughput": None,
        "latency_ms": None,
        "iters": 0,
        "warmup": 0,
        "peak_memory_mb": None,
        "memory_kind": "cuda_model_peak" if device.type == "cuda" else "cpu_peak_rss_growth",
        "tflops": None,
        "mfu": None,
        "status": "ok",
        "error": None,
    }


# what a row measured; a failed row's are null, whichever pass failed
_MEASUREMENTS = ("throughput", "latency_ms", "peak_memory_mb", "tflops", "mfu")


def _fail(row: dict[str, Any], error: BaseException) -> None:
    row["status"] = "oom" if is_out_of_memory(error) else "error"
    row["error"] = _short_error(error)
    row.update(dict.fromkeys(_MEASUREMENTS))


def _prepare(
    c: _Candidate,
    build: Builder,
    settings: BenchSettings,
    device: torch.device,
    size: tuple[int, int],
    batch: int,
    flops_cache: dict[tuple[str, tuple[int, int]], int],
) -> dict[str, Any]:
    row = _base_row(c.name, settings, device, size, batch)
    try:
        with torch.inference_mode(False):
            model = build(size).eval()
        row["params"] = sum(p.numel() for p in model.parameters())
        key = (c.name, size)
        if key not in flops_cache:
            flops_cache[key] = count_flops(model, size, c.name).macs
        row["gmacs"] = round(flops_cache[key] / 1e9, 4)
        row["attn_kernel"] = getattr(model, "attn_kernel", None)
        if settings.reparameterize:  # params and GMACs above stay those of the published model
            row["reparameterized"] = fold_for_inference(model, c.name)
        model = model.to(device)
        if settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if settings.compile_mode:  # its attention ops are those of the compiled graph, after the warmup
            model = compile_model(model, settings.compile_mode, settings.freeze)
        else:
            with precision(device, settings.dtype, settings.autocast_cache):
                row["attention_ops"] = attention_ops(model, torch.randn(1, 3, *size, device=device))
        c.model = model
    except Exception as e:
        _fail(row, e)
    return row


def _drop_model_caches(model: nn.Module) -> None:
    """Drop RMT's cached position tables, decay masks and autocast-dtype weights (made in the
    attention-ops pass and the warmup), so that the pass measuring memory makes them again and
    counts them: they are the model's memory too. A compiled graph keeps its own tables as constants."""
    for module in model.modules():
        if isinstance(module, ManhattanPosition):
            module.clear_tables()
        elif isinstance(module, AutocastWeightCache):
            module.clear_autocast_copies()


def _warm_up(
    c: _Candidate, settings: BenchSettings, device: torch.device, size: tuple[int, int], batch: int, warmup: int
) -> dict[str, Any]:
    """Warmup passes (compilation included), retrying with half the batch on OOM if asked."""
    while True:
        try:
            x = torch.randn(batch, 3, *size, device=device)
            if settings.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            update: dict[str, Any] = {"batch": batch, "warmup": warmup}
            compiled_before = compile_counts()
            for i in range(warmup):
                measures_rss = i == 0 and device.type == "cpu"
                # a compiled model's attention ops: its second call. The first also lists what
                # dynamo traces, and CUDA graphs (recorded on the second) replay without
                # dispatching any operator
                lists_ops = i == 1 and settings.compile_mode is not None
                if measures_rss:
                    _drop_model_caches(c.model)
                with (precision(device, settings.dtype, settings.autocast_cache),
                      _PeakRSS() if measures_rss else contextlib.nullcontext() as rss,
                      recording_attention_ops() if lists_ops else contextlib.nullcontext() as ops):
                    c.warm_ms = _timed_forward(c.model, x, device)
                if i == 0 and settings.compile_mode:  # the time to compile, and one pass
                    update["first_call_s"] = round(c.warm_ms / 1000, 3)
                if measures_rss:
                    update["peak_memory_mb"] = rss.growth_mb
                if lists_ops:
                    update["attention_ops"] = ops
            if settings.compile_mode:
                graphs, breaks = compile_counts_since(compiled_before)
                # none: dynamo reused graphs another model of this setting compiled (same code
                # and guards), whose counts went to that model's row
                if graphs or breaks:
                    update.update(compiled_graphs=graphs, graph_breaks=breaks)
            c.x = x
            if settings.cuda_graph:
                update["peak_memory_mb"] = _capture(c, settings, device)
            return update
        except Exception as e:
            if not (settings.retry_oom and is_out_of_memory(e) and batch > 1):
                row: dict[str, Any] = {}
                _fail(row, e)
                c.model = None
                return {**row, "batch": batch}
        # out of the except block: the error's traceback, which holds the failed pass's
        # activations, is gone; with the old input dropped too (kept by a failed capture), the
        # cache can really be emptied before the smaller retry
        x = c.x = None
        batch //= 2
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _capture(c: _Candidate, settings: BenchSettings, device: torch.device) -> float:
    """Replace a warm model by its :class:`CUDAGraphed` capture on the candidate's input; returns
    the capture's peak memory in MB, counted as the eager memory pass counts it
    (:func:`_cuda_peak_mb`: the caches dropped first, so that the capture's passes make them
    again). The graph keeps that memory: its pool is reserved while the graph lives, until the
    setting's models are dropped."""
    with precision(device, settings.dtype, settings.autocast_cache):
        # a pass on the capture's stream first, out of the count: a new stream's cuBLAS workspace
        # is no memory of the model's, and an eager pass on the current stream allocates none
        run_on_capture_stream(lambda: c.model(c.x), device)
    peak_mb, c.model = _cuda_peak_mb(c, settings, device, lambda: CUDAGraphed(c.model, c.x))
    return peak_mb


def _cuda_peak_mb(c: _Candidate, settings: BenchSettings, device: torch.device, run: Callable[[], Any]) -> tuple[float, Any]:
    """The peak memory of ``run()``, a pass of the candidate's model, in MB, and what it returned:
    the model's own weights, buffers and input, plus what the pass allocates over what the run
    holds before it. RMT's caches are dropped first, so that the pass makes and counts them."""
    _drop_model_caches(c.model)
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)
    # the models measured after this one (and their inputs) stay resident: count only this
    # model's growth over what is allocated now, plus its own weights and input
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with precision(device, settings.dtype, settings.autocast_cache):
        result = run()
    torch.cuda.synchronize(device)
    growth = torch.cuda.max_memory_allocated(device) - resident
    return round((growth + _own_bytes(c.model, c.x)) / 2**20, 1), result


def compile_counts() -> tuple[int, int]:
    """Graphs dynamo has compiled and graph breaks it has met so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def compile_counts_since(before: tuple[int, int]) -> tuple[int, int]:
    """Graphs compiled and graph breaks met since :func:`compile_counts` returned ``before``."""
    graphs, breaks = compile_counts()
    return graphs - before[0], breaks - before[1]


def graph_break_note(graphs: int, breaks: int) -> str:
    """What a compiled figure with graph breaks is."""
    return f"torch.compile made {graphs} graphs with {breaks} graph break{'s' if breaks > 1 else ''}; the code between them ran eager"


def _own_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of a model's parameters and buffers and of its input."""
    tensors = [*model.parameters(), *model.buffers(), x]
    return sum(t.numel() * t.element_size() for t in tensors)


def _significant(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant digits: a CPU run's 0.0527 img/s keeps its precision,
    which a fixed number of decimals would round away."""
    return float(f"{value:.{digits}g}")


def _finish_row(c: _Candidate, settings: BenchSettings, device: torch.device) -> None:
    row = c.row
    stats = latency_stats(c.times_ms)
    row["latency_ms"] = stats
    row["iters"] = len(c.times_ms)
    throughput = row["batch"] / (stats["median"] / 1000)
    row["throughput"] = _significant(throughput)
    if row["gmacs"] is not None:
        row["tflops"] = _significant(2 * row["gmacs"] * 1e9 * throughput / 1e12, 4)
    if device.type == "cuda" and not settings.cuda_graph:  # a captured model's peak is its capture's (_capture)
        try:
            row["peak_memory_mb"], _ = _cuda_peak_mb(c, settings, device, lambda: c.model(c.x))
        except Exception as e:
            _fail(row, e)
    if device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device), settings.dtype)
        if peak and row["tflops"] is not None:
            row["mfu"] = round(row["tflops"] / peak, 4)


def _add_ratios(rows: list[dict[str, Any]], baseline: str) -> None:
    """Throughput of each row relative to the baseline model at the same image size and batch."""
    base = {
        (tuple(r["img_size"]), r["requested_batch"]): r["throughput"]
        for r in rows if r["model"] == baseline and r["throughput"]
    }
    for r in rows:
        ref = base.get((tuple(r["img_size"]), r["requested_batch"]))
        r["ratio_to_baseline"] = round(r["throughput"] / ref, 3) if ref and r["throughput"] else None
