"""``rmt eval``: ImageNet validation accuracy of a zoo or timm model, on one process or under torchrun."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rmt_cli.console import err, out

if TYPE_CHECKING:  # rmt (torch, timm) is imported when the command runs, not for `rmt --help`
    from rmt.eval import EvalReport
    from rmt.eval import Progress as EvalProgress

DEFAULT_TOLERANCE = 0.1
MAX_SKIPPED_SHOWN = 10


def optional_real_labels_file(argv: list[str]) -> list[str]:
    """``--real-labels [FILE]``: a ``.json`` right after the flag is its file (``--real-labels-file``)."""
    out = []
    for i, token in enumerate(argv):
        out.append(token)
        following = argv[i + 1] if i + 1 < len(argv) else ""
        if token == "--real-labels" and following.lower().endswith(".json") and not following.startswith("-"):
            out.append("--real-labels-file")
    return out


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)


def evaluate(
    model: str = typer.Argument(..., help="A zoo name (rmt_b, swin_t) or any timm model name."),
    # paths are strs, not Paths: typer would turn an empty '' into the current directory, and drop
    # the slash of an output path 'reports/' (a file named reports would be written)
    data: str = typer.Option(..., "--data", help="The validation images: wnid folders, a flat folder with labels, or ImageNet-V2."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels of a flat folder: val.txt, LOC_val_solution.csv, the devkit ground truth or devkit folder."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Weights file (any official RMT layout; a state dict for timm models)."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Images per forward pass per process (halved on CUDA out-of-memory)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="DataLoader workers per process (default: this node's CPUs shared, at most 8)."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    amp: str = typer.Option("none", "--amp", help="Autocast: none, bf16 or fp16."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Run the model in channels-last memory format."),
    reparam: bool = typer.Option(False, "--reparam", help="Fold the model for inference first (as rmt bench --reparam; the same logits within float32 rounding)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N images in file-name order."),
    real_labels: bool = typer.Option(False, "--real-labels", help="Also report ImageNet-ReaL top-1 (timm's labels); --real-labels FILE.json takes yours."),
    real_labels_file: Optional[str] = typer.Option(None, "--real-labels-file", help="ReaL top-1 from this real.json instead of timm's copy."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images (counted and reported) instead of failing."),
    json_out: Optional[str] = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    expect_top1: Optional[float] = typer.Option(None, "--expect-top1", help="CI gate: exit 1 unless top-1 is within the tolerance of this value."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", min=0.0, help=f"Gate tolerance in percentage points (default: {DEFAULT_TOLERANCE})."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Evaluate untrained weights (refused otherwise when no weights are found)."),
) -> None:
    """Top-1 / top-5 on ImageNet validation with the model's official preprocessing (torchrun-ready)."""
    from rmt.errors import ConfigError
    from rmt.eval import run_imagenet_eval, top1_gate
    from rmt.eval.imagenet import check_top1_gate
    from rmt.io import check_paths_given, check_writable, write_json_atomic

    check_paths_given({"--data": data, "--labels": labels, "--checkpoint": checkpoint,
                       "--real-labels-file": real_labels_file})
    if tolerance is not None and expect_top1 is None:
        raise ConfigError("--tolerance needs --expect-top1")
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    if expect_top1 is not None:
        check_top1_gate(expect_top1, tolerance)
    if json_out is not None:
        check_writable(json_out)  # (and run_imagenet_eval refuses it if it is a file the evaluation reads)

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.1f} img/s  top-1 {task.fields[top1]:6.2f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,  # logs and CI get the results, not bar redraws and a stray blank line
    )
    task = None

    def on_progress(state: EvalProgress) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(model, total=state.total, rate=0.0, top1=0.0)
        rate = state.images / state.seconds if state.seconds else 0.0
        top1 = 100.0 * state.top1_correct / state.images if state.images else 0.0
        bar.update(task, completed=state.images, rate=rate, top1=top1)

    try:
        report = run_imagenet_eval(
            model,
            data,
            labels=labels,
            checkpoint=checkpoint,
            random_weights=random_weights,
            batch_size=batch_size,
            workers=workers,
            device=device,
            amp=amp,
            channels_last=channels_last,
            reparameterize=reparam,
            limit=limit,
            real_labels=real_labels_file if real_labels_file is not None else real_labels,
            skip_bad=skip_bad,
            report_path=json_out,
            progress=on_progress,
            on_message=lambda message: err.print(f"[yellow]{escape(message)}[/]", highlight=False, soft_wrap=True),
        )
    finally:
        bar.stop()

    gate = top1_gate(report.counts.top1, expect_top1, tolerance) if expect_top1 is not None else None
    if report.is_main:
        if json_out is not None:  # before printing: a closed standard output must not lose it
            write_json_atomic(json_out, report.to_dict())
        out.print(_table(report))
        for error in report.counts.skipped[:MAX_SKIPPED_SHOWN]:
            err.print(f"[yellow]skipped:[/] {escape(error)}", highlight=False, soft_wrap=True)
        if len(report.counts.skipped) > MAX_SKIPPED_SHOWN:
            more = len(report.counts.skipped) - MAX_SKIPPED_SHOWN
            where = "all of them are in the --json file" if json_out is not None else "--json FILE lists them all"
            err.print(f"[yellow]... and {more:,} more unreadable images skipped ({where})[/]", soft_wrap=True)
        if (real_labels or real_labels_file is not None) and report.counts.real_top1 is None:
            err.print("[yellow]note:[/] none of these images has a ReaL label: no ReaL top-1", highlight=False)
        if json_out is not None:
            err.print(f"wrote {escape(str(json_out))}", highlight=False, soft_wrap=True)
        if expect_top1 is not None:
            verdict = f"[bold red]gate failed:[/] {gate}" if gate else f"[green]gate passed:[/] top-1 within {tolerance:g} of {expect_top1:g}"
            err.print(verdict, highlight=False, soft_wrap=True)
    if gate:
        raise typer.Exit(1)


def _table(report: EvalReport) -> Table:
    c = report.counts
    table = Table(title=f"{report.model} on ImageNet val", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("top-1", f"{c.top1:.3f} %")
    table.add_row("top-5", f"{c.top5:.3f} %")
    if c.real_top1 is not None:
        table.add_row("ReaL top-1", f"{c.real_top1:.3f} % ({c.real_images:,} images with ReaL labels)")
    if report.published_top1 is not None:
        # a difference to untrained weights would only look like a (terrible) result
        difference = "" if report.weights == "random" else f" (difference {report.top1_delta:+.3f})"
        table.add_row("published top-1", f"{report.published_top1:.2f} %{difference}")
    table.add_row("images", f"{c.images:,}" + (f" ({len(c.skipped):,} unreadable, skipped)" if c.skipped else ""))
    table.add_row("seconds", f"{c.seconds:.1f}")
    table.add_row("images/s", f"{c.images / c.seconds:.1f}" if c.seconds else "-")
    table.add_row("layout", escape(report.layout_description))  # paths are not markup
    weights = {"cache": "zoo cache", "checkpoint": escape(str(report.checkpoint)), "random": "[bold red]RANDOM (untrained)[/]"}[report.weights]
    table.add_row("weights", weights + (", folded for inference" if report.reparameterized else ""))
    table.add_row("device", f"{report.device} x {report.world_size}" if report.world_size > 1 else report.device)
    return table
