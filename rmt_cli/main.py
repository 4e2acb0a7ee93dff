"""``rmt``: the command-line entry point. Commands parse arguments and print; rmt does the work."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.markup import escape

import rmt
from rmt.errors import RMTError

app = typer.Typer(
    name="rmt",
    help="RMT vision backbones: exact official models, a verified model zoo, evaluation and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
from rmt_cli.console import err


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


# Command modules: each defines register(app); the order is the order of `rmt --help`.
from rmt_cli import bench as _bench  # noqa: E402
from rmt_cli import convert as _convert  # noqa: E402
from rmt_cli import evaluate as _evaluate  # noqa: E402
from rmt_cli import zoo as _zoo  # noqa: E402

for _module in (_zoo, _evaluate, _bench, _convert):
    _module.register(app)


def main() -> None:
    """Run the app; user errors become one line on stderr and a non-zero exit, never a traceback."""
    try:
        # two options whose value is optional, which click cannot express: normalised first
        args = _evaluate.optional_real_labels_file(_bench.optional_compile_mode(sys.argv[1:]))
        app(args=args, prog_name="rmt")
    except RMTError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
