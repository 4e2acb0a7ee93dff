"""``rmt list``, ``rmt info``, ``rmt download``: the model zoo and its weights cache."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

if TYPE_CHECKING:
    from rmt.zoo import ZooEntry

from rmt_cli.console import err, out, stdout


def register(app: typer.Typer) -> None:
    app.command("list")(list_models)
    app.command("info")(info)
    app.command("download")(download)


def _number(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_json(payload: object) -> None:
    stdout.write(json.dumps(payload, indent=2) + "\n")


def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON for programs instead of a table."),
) -> None:
    """List the zoo's models: figures, and whether their weights are cached."""
    from rmt import zoo

    rows = [(entry, zoo.cache_report(entry)) for entry in zoo.list_entries()]
    if as_json:
        _print_json([_entry_json(entry) | {"cache": report} for entry, report in rows])
        return
    table = Table(
        title="rmt model zoo", title_justify="left", caption_justify="left",
        caption=(
            "params: exact count. GMACs at 224x224: fvcore on the official RMT code, rmt flops for the baselines. GFLOPs, top-1: as published.\n"
            f"Entries from {zoo.zoo_file()}; any timm model name works too (rmt info NAME)."
        ),
    )
    for column, justify in (
        ("name", "left"), ("family", "left"), ("params M", "right"), ("GMACs", "right"),
        ("GFLOPs", "right"), ("top-1", "right"), ("weights", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=True)
    for entry, report in rows:
        params = entry.measured.get("params")
        table.add_row(
            entry.name,
            entry.family,
            _number(params / 1e6 if params else entry.published.get("params_m"), 2),
            _number(entry.measured.get("gmacs"), 3),
            _number(entry.published.get("gflops"), 2),
            _number(entry.published_top1, 1),
            _status_text(report["status"], entry.manual_only),
        )
    out.print(table)


def _status_text(status: str, manual: bool) -> str:
    if status == "cached":
        return "[green]cached[/]"
    if status == "changed":
        return "[bold red]changed[/]"  # `rmt info NAME` says what and what to do
    return "by hand (Baidu)" if manual else "not cached"


def info(
    name: str = typer.Argument(..., help="A zoo name (rmt list) or any timm model name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for programs."),
) -> None:
    """Everything about one model: figures, preprocessing, where its weights come from and how to get them."""
    from rmt import zoo

    entry = zoo.get_entry(name)
    report = zoo.cache_report(entry, verify=True)
    how = zoo.how_to_get(entry)
    if as_json:
        _print_json(_entry_json(entry) | {"cache": report, "how_to_get": how})
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("name", entry.name)
    table.add_row("family", entry.family)
    table.add_row("timm name", entry.timm_name)
    published = entry.published
    if published:
        table.add_row(
            "published",
            f"{_number(published.get('params_m'), 1)} M params, {_number(published.get('gflops'), 2)} GFLOPs, "
            f"top-1 {_number(published.get('top1'), 1)} %",
        )
    measured = entry.measured
    if measured:
        parts = []
        if measured.get("params") is not None:
            parts.append(f"{measured['params']:,} params")
        if measured.get("gmacs") is not None:
            counter = "fvcore on the official code" if entry.is_rmt else "rmt flops"
            parts.append(f"{measured['gmacs']:.3f} GMACs ({counter}, 224x224)")
        table.add_row("measured", ", ".join(parts))
    pre = entry.preprocessing
    crop_mode = pre.get("crop_mode", "center")
    table.add_row(
        "preprocessing",
        f"input {pre['input_size'][1]}x{pre['input_size'][2]}, {pre['interpolation']}, crop_pct {pre['crop_pct']}, "
        + (f"crop_mode {crop_mode}, " if crop_mode != "center" else "")
        + f"mean {tuple(pre['mean'])}, std {tuple(pre['std'])}",
    )
    weights = entry.weights
    if weights:
        source = {
            "baidu": f"Baidu pan {weights.get('url')} (extraction code {weights.get('code')})",
            "hf-hub": f"Hugging Face hub {weights.get('hf_hub_id')} ({weights.get('filename')})",
            "url": weights.get("url"),
        }[weights["source"]]
        table.add_row("weights source", source)
        if weights.get("state_dict"):
            table.add_row("state dict used", weights["state_dict"])
        table.add_row("sha256", weights.get("sha256") or "unknown: recorded on first download, then enforced")
    table.add_row("cache", _cache_line(report))
    table.add_row("how to get them", how["message"] if report["status"] != "verified" else f"cached: {report['path']}")
    out.print(table)


def _cache_line(report: dict) -> str:
    status = report["status"]
    if status == "verified":
        record = report["record"]
        return f"[green]verified[/] {report['path']} ({record['size']:,} bytes, sha256 {record['sha256']}, from {record['source']})"
    if status == "changed":
        return f"[bold red]changed, not used[/]: {report['detail'] or report['path']}"
    if status == "none":
        return "no pretrained weights"
    return f"not cached (would be {report['path']})"


def _entry_json(entry: ZooEntry) -> dict:
    return {
        "name": entry.name,
        "family": entry.family,
        "timm_name": entry.timm_name,
        "published": entry.published,
        "measured": entry.measured,
        "preprocessing": {k: list(v) if isinstance(v, tuple) else v for k, v in entry.preprocessing.items()},
        "weights": entry.weights,
    }


def download(
    name: str = typer.Argument(..., help="A zoo name (rmt list) or any timm model name."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch from this http(s):// or file:// URL instead."),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="The file's expected sha256 (64 hex digits)."),
    # a str, not a Path: typer would turn an empty --from '' into the current directory
    source_file: Optional[str] = typer.Option(
        None, "--from", help="Import a local file (e.g. fetched by hand from Baidu pan) after checking it."
    ),
    force: bool = typer.Option(False, "--force", help="Fetch again even if a verified file is cached."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fetch or import a model's weights into the verified cache (sha256 and architecture checked)."""
    from rmt import zoo
    from rmt.errors import WeightsNotCachedError

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err, transient=True,
        disable=not err.is_terminal,  # logs and CI get the result lines, not bar redraws
    ) as progress:
        task = progress.add_task(name, total=None)

        def on_progress(done: int, total: Optional[int]) -> None:
            progress.update(task, completed=done, total=total)

        try:
            fetched = zoo.download(
                name, url=url, sha256=sha256, source_file=source_file, force=force,
                progress=on_progress, notify=lambda line: err.print(f"[dim]{escape(line)}[/]", highlight=False),
            )
        except WeightsNotCachedError as e:
            how = e.instructions
            progress.stop()
            if as_json:
                _print_json({"model": name, "action": "manual"} | how)
            elif "code" in how:
                out.print(f"The weights of [bold]{name}[/] are only on Baidu pan; no program can download them.")
                out.print(f"  1. open        {escape(how['url'])}")
                out.print(f"  2. enter code  {escape(how['code'])}  and download the file")
                out.print(f"  3. import it   {escape(how['command'])}")
                out.print("Or set RMT_ZOO_MIRROR to a mirror that has the file.")
            else:
                out.print(how["message"])
            raise typer.Exit(2)  # nothing was downloaded, as for bad input (1 is CI's "regression")
    if as_json:
        _print_json(fetched.to_json())
        return
    verb = {"cached": "already cached", "downloaded": "downloaded", "imported": "imported"}[fetched.action]
    checked = f", {fetched.params:,} parameters" if fetched.params else ""
    which = f", using '{fetched.state_dict}'" if fetched.state_dict else ""
    out.print(escape(f"{name}: {verb} {fetched.path} ({fetched.size:,} bytes{checked}{which})"))
    out.print(f"sha256 {fetched.sha256}")
    if fetched.trusted_on_first_use:
        out.print("no sha256 was known: this one is recorded (trust on first use) and every later use is checked against it")
