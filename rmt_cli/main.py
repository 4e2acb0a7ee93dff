"""``rmt``: the command-line entry point. Commands parse arguments and print; rmt does the work."""

from __future__ import annotations

import sys
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


# Command modules: each defines register(app). One import and one call per module.
from rmt_cli import convert as _convert  # noqa: E402

_convert.register(app)


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
