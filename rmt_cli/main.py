"""``rmt``: the command-line entry point. Commands parse arguments and print; rmt does the work."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

import rmt
from rmt.errors import RMTError

app = typer.Typer(
    name="rmt",
    help="RMT vision backbones: exact official models, a verified model zoo, evaluation and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rmt {rmt.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """RMT (Fan et al., CVPR 2024) from the command line."""


@app.command()
def convert(
    model: str = typer.Argument(..., help="RMT variant the checkpoint belongs to, e.g. rmt_s."),
    source: Path = typer.Argument(..., help="Checkpoint in any official layout (or ours)."),
    destination: Path = typer.Argument(..., help="Where to write the converted state dict."),
    to: str = typer.Option("official", "--to", help="Layout to write: official (for the official code) or rmt."),
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Take the EMA or the plain weights (default: EMA when present)."),
) -> None:
    """Check a checkpoint tensor by tensor and rewrite it in the official or rmt layout."""
    from rmt.models.checkpoint import convert_checkpoint_file

    summary = convert_checkpoint_file(model, source, destination, layout=to, ema=ema)
    out.print(
        f"wrote {destination} ({summary['layout']} layout, {summary['tensors']} tensors, "
        f"{summary['params']:,} parameters, from '{summary['source_entry']}')"
    )


def main() -> None:
    """Run the app; user errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        app()
    except RMTError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
