"""``rmt bench``, ``rmt flops``, ``rmt profile`` and ``rmt compare``: parsing and printing only."""

from __future__ import annotations

from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rmt_cli.console import err, out


def register(app: typer.Typer) -> None:
    app.command()(bench)
    app.command()(flops)
    app.command()(profile)
    app.command()(compare)


def optional_compile_mode(argv: list[str]) -> list[str]:
    """``--compile`` takes an optional mode: a bare ``--compile`` (followed by an option, a model
    name or nothing) means ``--compile default``. No model is named like a mode, so this is exact."""
    if "--compile" not in argv:  # every command line passes here: rmt (torch) is imported only when needed
        return list(argv)
    import difflib

    from rmt.bench.runner import COMPILE_MODES
    from rmt.errors import RMTError

    out = []
    for i, token in enumerate(argv):
        out.append(token)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if token == "--compile" and following not in COMPILE_MODES:
            # a misspelt mode would otherwise be read as a model name
            if following and difflib.get_close_matches(following.replace("_", "-"), COMPILE_MODES, n=1, cutoff=0.8):
                raise RMTError(f"unknown compile mode {following!r}: choose one of {', '.join(COMPILE_MODES)}")
            out.append("default")
    return out


def _split(values: Optional[List[str]]) -> list[str]:
    """Repeated options and comma-separated lists both work: --img-size 224,512 --img-size 768x1024."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def bench(
    models: Optional[List[str]] = typer.Argument(None, help="Zoo names or timm names (default: rmt_t/s/b/l and swin_t/s/b)."),
    batch: List[str] = typer.Option(["64"], "--batch", "-b", help="Batch size(s); repeat or comma-separate to sweep."),
    img_size: List[str] = typer.Option(["224"], "--img-size", help="N or HxW; repeat or comma-separate to sweep."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cuda, cuda:N or cpu."),
    dtype: Optional[str] = typer.Option(None, help="fp32, tf32, bf16 or fp16 (bf16/fp16: autocast); default bf16 on CUDA, fp32 on CPU."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Channels-last model and input."),
    compile: Optional[str] = typer.Option(
        None, "--compile", help="torch.compile the models; optional MODE: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs.",
    ),
    freeze: bool = typer.Option(False, "--freeze", help="With --compile: inductor's freezing, weights as graph constants (cast and packed once)."),
    cuda_graph: bool = typer.Option(
        False, "--cuda-graph", help="CUDA only, eager: capture each warm model's pass in a CUDA graph and time its replays (no launch cost, no compiling).",
    ),
    compile_workers: int = typer.Option(
        1, "--compile-workers", help="With --compile: first compile every model and setting in up to N processes at once; the run then loads them from inductor's caches.",
    ),
    attn_kernel: Optional[str] = typer.Option(None, "--attn-kernel", help="RMT attention kernel: auto, sdpa, reference, flex or triton (see docs/models.md)."),
    reparam: bool = typer.Option(False, "--reparam", help="Fold each model for inference first (norms, batch norms, conv biases, layer scales; same outputs)."),
    warmup: Optional[int] = typer.Option(None, help="Warmup passes (default 10 on CUDA, 1 on CPU)."),
    iters: Optional[int] = typer.Option(None, help="Timed iterations (default 50 on CUDA; on CPU 1-5 to fit the time budget)."),
    time_budget: float = typer.Option(150.0, "--time-budget", help="CPU only: seconds the default iteration count aims at."),
    retry_oom: bool = typer.Option(False, "--retry-oom", help="On out-of-memory, retry that model with half the batch."),
    baseline: Optional[str] = typer.Option(None, help="Ratios are to this model (default: the first one; swin_t for the default set)."),
    # output paths are strs, not Paths: typer would drop the slash of 'reports/' and write a file named reports
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the schema-1 JSON report here."),
    csv_out: Optional[str] = typer.Option(None, "--csv", help="Write one CSV row per model and setting."),
    plot_out: Optional[str] = typer.Option(None, "--plot", help="PNG: published top-1 vs throughput (needs rmt\\[plot])."),
) -> None:
    """Throughput, latency spread, peak memory, GMACs and MFU of RMT against its peers."""
    from rmt.bench.report import plot, require_matplotlib, to_csv
    from rmt.errors import RMTError
    from rmt.io import check_writable, same_file, write_json_atomic, write_text_atomic
    from rmt.bench.runner import DEFAULT_MODELS, BenchSettings, parse_img_size, run_benchmark

    try:
        batches = [int(b) for b in _split(batch)]
    except ValueError:
        raise RMTError(f"--batch takes integers, got {', '.join(batch)}") from None
    names = list(models) if models else list(DEFAULT_MODELS)
    if not models and baseline is None:
        baseline = "swin_t"  # the default run is RMT against Swin, as in the paper
    settings = BenchSettings(
        models=names,
        batches=batches,
        img_sizes=[parse_img_size(s) for s in _split(img_size)],
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        compile_mode=compile,
        freeze=freeze,
        cuda_graph=cuda_graph,
        warmup=warmup,
        iters=iters,
        attn_kernel=attn_kernel,
        reparameterize=reparam,
        time_budget_s=time_budget,
        retry_oom=retry_oom,
        baseline=baseline,
        compile_workers=compile_workers,
    )
    settings.validate()
    outputs = [path for path in (json_out, csv_out, plot_out) if path is not None]
    for path in outputs:  # a typo must not throw away a long run
        check_writable(path)
    if any(same_file(a, b) for i, a in enumerate(outputs) for b in outputs[i + 1:]):
        raise RMTError("--json, --csv and --plot must name different files")
    if plot_out is not None:
        require_matplotlib()
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=True,
        disable=not err.is_terminal,  # logs and CI get the results, not bar redraws and a stray blank line
    ) as bar:
        task = bar.add_task("starting", total=1)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        report = run_benchmark(settings, progress=progress)
    # the files first: a closed or full standard output must not lose a long run's report
    wrote = []
    if json_out is not None:
        write_json_atomic(json_out, report)
        wrote.append(f"wrote {json_out}")
    if csv_out is not None:
        write_text_atomic(csv_out, to_csv(report))
        wrote.append(f"wrote {csv_out}")
    if plot_out is not None:
        from rmt import zoo

        drawn = plot(report, plot_out, top1=lambda name: zoo.get_entry(name).published_top1)
        wrote.append(f"wrote {plot_out} ({drawn} models)")
    _print_bench(report)
    for line in wrote:
        out.print(line, markup=False)


# left out, in this order of need, when the table would not fit the terminal (--json has them all)
_OPTIONAL_COLUMNS = ("p99", "p90", "IQR", "params M", "GMACs", "TFLOP/s")


def _print_bench(report: dict[str, Any]) -> None:
    env, settings = report["env"], report["settings"]
    title = (
        f"{env.get('device_name')} | {settings['dtype']}"
        f"{' | compile=' + settings['compile_mode'] if settings.get('compile_mode') else ''}"
        f"{', frozen' if settings.get('freeze') else ''}"
        f"{' | eager, replayed from CUDA graphs' if settings.get('cuda_graph') else ''}"
        f"{' | channels_last' if settings.get('channels_last') else ''} | torch {env['torch']} | "
        f"ratios to {settings['baseline']}"
    )
    on_cuda = env.get("device_type") == "cuda"
    memory_label = "peak MB" if on_cuda else "RSS+ MB"
    rows = []
    for r in report["results"]:
        latency = r["latency_ms"] or {}
        row = {
            "model": r["model"] + (" (folded)" if r.get("reparameterized") else ""), "batch": str(r["batch"]),
            "size": f"{r['img_size'][0]}x{r['img_size'][1]}", "img/s": _fmt(r["throughput"]),
            "ratio": _fmt(r.get("ratio_to_baseline"), 2), "median ms": _fmt(latency.get("median"), 2),
            "p90": _fmt(latency.get("p90"), 2), "p99": _fmt(latency.get("p99"), 2), "IQR": _fmt(latency.get("iqr"), 2),
            memory_label: _fmt(r["peak_memory_mb"]), "params M": _fmt(r["params"] / 1e6 if r["params"] else None),
            "GMACs": _fmt(r["gmacs"], 3),
        }
        if on_cuda:
            row.update({"TFLOP/s": _fmt(r["tflops"], 1), "MFU": f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"})
        row["status"] = r["status"] if r["status"] == "ok" else f"[red]{r['status']}[/]: {escape(str(r['error']))}"
        rows.append(row)
    columns = ["model", "batch", "size", "img/s", "ratio", "median ms", "p90", "p99", "IQR", memory_label,
               "params M", "GMACs"] + (["TFLOP/s", "MFU"] if on_cuda else []) + ["status"]
    # too wide for the terminal: leave out secondary columns, then move a batch or size shared by
    # every row into the title, rather than let rich shrink numbers into ellipses
    shared = [column for column in ("size", "batch") if len({row[column] for row in rows}) == 1]
    left_out = []
    table = _bench_table(title, columns, rows)
    for column in [c for c in _OPTIONAL_COLUMNS if c in columns] + shared:
        # the width the table takes unconstrained (measured against the terminal, it is clamped to it)
        if Measurement.get(out, out.options.update_width(2**16), table).maximum <= out.width:
            break
        columns.remove(column)
        if column in shared:
            title += f" | {'batch ' if column == 'batch' else ''}{rows[0][column]}"
        else:
            left_out.append(column)
        table = _bench_table(title, columns, rows)
    out.print(table)
    if left_out:
        out.print(f"[yellow]note:[/] left out for {out.width} columns: {', '.join(left_out)}")
    sizes = sorted({tuple(r["img_size"]) for r in report["results"]}, key=lambda s: s[0] * s[1])
    if len(sizes) > 1:
        _print_sweep(report, sizes, memory_label)
    for note in report["notes"]:
        out.print(f"[yellow]note:[/] {escape(note)}")


def _bench_table(title: str, columns: list[str], rows: list[dict[str, str]]) -> Table:
    table = Table(title=title, title_style="bold")
    for column in columns:
        # numbers never wrap or shrink into an ellipsis; the model and status columns wrap instead
        text = column in ("model", "status")
        table.add_column(column, justify="left" if text else "right", no_wrap=not text, overflow="fold")
    for row in rows:
        table.add_row(*(row[column] for column in columns))
    return table


def _print_sweep(report: dict[str, Any], sizes: list[tuple[int, int]], memory_label: str) -> None:
    """How latency and memory grow with resolution, relative to the smallest size."""
    table = Table(title="resolution sweep: median latency ms / memory MB (growth vs smallest)", title_style="bold")
    table.add_column("model")
    table.add_column("batch", justify="right")
    for h, w in sizes:
        table.add_column(f"{h}x{w}", justify="right")
    keys = sorted({(r["model"], r["requested_batch"]) for r in report["results"]},
                  key=lambda k: (report["settings"]["models"].index(k[0]) if k[0] in report["settings"]["models"] else 0, k[1]))
    for model, batch in keys:
        by_size = {tuple(r["img_size"]): r for r in report["results"] if r["model"] == model and r["requested_batch"] == batch}
        first = by_size.get(sizes[0])
        cells = []
        for size in sizes:
            r = by_size.get(size)
            if r is None or r["status"] != "ok":
                cells.append(r["status"] if r else "-")
                continue
            ms, mb = r["latency_ms"]["median"], r["peak_memory_mb"]
            growth = ""
            if first and first["status"] == "ok" and size != sizes[0]:
                growth = f" (x{ms / first['latency_ms']['median']:.1f}"
                if mb and first["peak_memory_mb"]:
                    growth += f", x{mb / first['peak_memory_mb']:.1f}"
                growth += ")"
            cells.append(f"{ms:,.1f} / {_fmt(mb)}{growth}")
        table.add_row(model, str(batch), *cells)
    out.print(table)


def flops(
    model: str = typer.Argument(..., help="Zoo name or timm name."),
    img_size: str = typer.Option("224", "--img-size", help="N or HxW."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write {model, img_size, gmacs, params, ...} here."),
) -> None:
    """Multiply-adds of one image (the papers' 'FLOPs'), by operator and by module."""
    from rmt import zoo
    from rmt.bench.flops import count_flops
    from rmt.io import check_writable, write_json_atomic
    from rmt.bench.runner import build_model, parse_img_size

    if json_out is not None:
        check_writable(json_out)
    size = parse_img_size(img_size)
    entry = zoo.get_entry(model)
    report = count_flops(build_model(model, size), size, name=model)
    if json_out is not None:  # before printing: a closed standard output must not lose it
        write_json_atomic(json_out, report.to_dict())
    out.print(
        f"[bold]{model}[/] at {size[0]}x{size[1]}: [bold]{report.gmacs:.3f} GMACs[/], {report.params:,} parameters"
    )
    published = entry.measured.get("gmacs") if entry.measured else None
    if published and size == (224, 224):
        # RMT's figures were measured on the official code; the baselines' are this counter's own
        source = "official code measured with fvcore" if entry.is_rmt else "zoo figure"
        # the zoo keeps 3 decimals: a count equal to that precision is equal, not -0.01% off
        change = "equal" if round(report.gmacs, 3) == round(published, 3) else f"{(report.gmacs - published) / published:+.2%}"
        out.print(f"{source}: {published:.3f} GMACs ({change})")
    ops = Table(title="by operator", title_style="bold")
    ops.add_column("operator")
    ops.add_column("GMACs", justify="right")
    ops.add_column("share", justify="right")
    for op, macs in report.by_operator.items():
        ops.add_row(op, f"{macs / 1e9:.4f}", f"{macs / max(report.macs, 1):.1%}")
    out.print(ops)
    modules = Table(title="by module", title_style="bold")
    modules.add_column("module")
    modules.add_column("GMACs", justify="right")
    for name, macs in report.by_module:
        modules.add_row(("  " * name.count(".")) + name, f"{macs / 1e9:.4f}")
    out.print(modules)
    if json_out is not None:
        out.print(f"wrote {json_out}", markup=False)


def profile(
    model: str = typer.Argument(..., help="Zoo name or timm name."),
    batch: int = typer.Option(8, "--batch", "-b", min=1),
    img_size: str = typer.Option("224", "--img-size", help="N or HxW."),
    device: str = typer.Option("auto", help="auto, cuda, cuda:N or cpu."),
    dtype: str = typer.Option("fp32", help="fp32, tf32, bf16 or fp16."),
    out_dir: str = typer.Option("runs/profile", "--out", help="Trace directory (TensorBoard logdir)."),  # a str: Path reads '' as '.'
    memory: bool = typer.Option(False, "--memory", help="Also record memory per operator."),
    active: int = typer.Option(3, min=1, help="Profiled steps (after 1 wait and 1 warmup step)."),
    top: int = typer.Option(15, min=1, help="Operators to list."),
    reparam: bool = typer.Option(False, "--reparam", help="Fold the model for inference first (as rmt bench --reparam)."),
    compile_mode: Optional[str] = typer.Option(
        None, "--compile", help="Profile the model compiled (as rmt bench --compile); optional MODE: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs.",
    ),
    freeze: bool = typer.Option(False, "--freeze", help="With --compile: inductor's freezing (as rmt bench --freeze)."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the summary here."),
) -> None:
    """Profile forward passes with torch.profiler; traces open in TensorBoard and Perfetto."""
    from rmt.bench.profile import profile_model
    from rmt.errors import RMTError
    from rmt.io import check_writable, same_file, write_json_atomic
    from rmt.bench.runner import graph_break_note, parse_img_size

    if json_out is not None:
        check_writable(json_out)
        if same_file(json_out, out_dir):  # the trace folder would be made where the summary goes
            raise RMTError(f"--json {json_out} is the --out folder: write it elsewhere")
    summary = profile_model(model, out_dir, batch=batch, img_size=parse_img_size(img_size), device=device,
                            dtype=dtype, memory=memory, active=active, top=top, reparameterize=reparam,
                            compile_mode=compile_mode, freeze=freeze)
    if json_out is not None:  # before printing: a closed standard output must not lose it
        write_json_atomic(json_out, summary)
    folded = ", folded for inference" if summary["reparameterized"] else ""
    folded += f", compiled ({compile_mode}{', frozen' if freeze else ''})" if compile_mode else ""
    table = Table(title=f"{model}: top operators by {summary['time']} per step (batch {batch}, {dtype}{folded})", title_style="bold")
    for column in ("operator", "ms/step", "share", "calls/step") + (("self MB",) if memory else ()):
        table.add_column(column, justify="left" if column == "operator" else "right")
    for op in summary["top_ops"]:
        cells = [escape(op["op"]), f"{op['self_ms']:.3f}", f"{op['share']:.1%}", str(op["calls_per_step"])]
        if memory:
            cells.append(f"{op['self_memory_mb']:.1f}")
        table.add_row(*cells)
    out.print(table)
    for trace in summary["trace_files"]:
        out.print(f"trace: {trace}", markup=False)
    out.print(f"TensorBoard: {summary['open']['tensorboard']}", markup=False)  # "rmt[tensorboard]" is no markup
    out.print(f"Perfetto: {summary['open']['perfetto']}", markup=False)
    if summary["graph_breaks"]:
        out.print(f"[yellow]note:[/] {graph_break_note(summary['compiled_graphs'], summary['graph_breaks'])}")
    if json_out is not None:
        out.print(f"wrote {json_out}", markup=False)


def compare(
    base: str = typer.Argument(..., help="Baseline report (rmt bench --json)."),  # strs: Path reads '' as '.'
    new: str = typer.Argument(..., help="New report."),
    threshold: float = typer.Option(5.0, help="Allowed change in percent."),
    metric: str = typer.Option("throughput,latency,memory", help="Metrics to gate on, comma-separated."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the comparison here."),
) -> None:
    """Exit 1 when a model got slower, hungrier, failed or went missing beyond the threshold."""
    from rmt.bench.compare import compare_reports, parse_metrics
    from rmt.bench.report import read_report
    from rmt.io import check_not_an_input, check_paths_given, check_writable, write_json_atomic

    check_paths_given({"the baseline report": base, "the new report": new})
    if json_out is not None:
        check_writable(json_out)
        check_not_an_input(json_out, "--json", {"baseline": base, "new report": new})
    result = compare_reports(read_report(base), read_report(new), threshold, parse_metrics(metric))
    if json_out is not None:  # before printing: a closed standard output must not lose it
        write_json_atomic(json_out, result.to_dict())
    for warning in result.env_warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    table = Table(title=escape(f"{new} vs {base} (threshold {threshold:g}%)"), title_style="bold")
    table.add_column("model")
    table.add_column("setting")
    for m in result.metrics:
        table.add_column(f"{m} %", justify="right")
    table.add_column("verdict")
    colours = {"ok": "green", "fixed": "green", "new": "cyan"}
    for d in result.deltas:
        changes = [f"{d.changes[m]:+.1f}" if d.changes.get(m) is not None else "-" for m in result.metrics]
        verdict = f"[{colours.get(d.status, 'red')}]{d.status}[/]" + (f": {escape('; '.join(d.reasons))}" if d.reasons else "")
        table.add_row(escape(d.model), escape(d.setting), *changes, verdict)
    out.print(table)
    if result.regressed:
        err.print("[bold red]regression[/]: see the rows marked regressed, missing or failed")
        raise typer.Exit(1)
    out.print("[green]no regression[/]")
