"""``rmt``: the command-line entry point. Commands parse arguments and print; rmt does the work."""

from __future__ import annotations

import errno
import os
import sys
import traceback
from types import ModuleType
from typing import NoReturn, Optional

import typer
from rich.markup import escape

# No rmt import here: rmt imports torch and timm (seconds), which `rmt --help`, `rmt --version`
# and a mistyped option do not need. Each command imports what it runs.

app = typer.Typer(
    name="rmt",
    help="RMT vision backbones: exact official models, a verified model zoo, evaluation and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
from rmt_cli.console import StdoutError, err, stdout


def _version_string() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rmt")
    except PackageNotFoundError:  # a source tree that is not installed (as rmt.__version__ says)
        return "0.0.0+unknown"


def _version(value: bool) -> None:
    if value:
        stdout.write(f"rmt {_version_string()}\n")  # a full disk is then StdoutError's one line
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


def _click_exceptions() -> ModuleType:
    """click's exception classes as this typer raises them (typer 0.16+ ships its own click)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _error(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Run the app; user errors become one line on stderr and a non-zero exit, never a traceback."""
    click_errors = _click_exceptions()
    # click 8.2 added NoArgsIsHelpError; an absent class matches nothing
    no_args_is_help = getattr(click_errors, "NoArgsIsHelpError", ())
    try:
        # two options whose value is optional, which click cannot express: normalised first
        args = _evaluate.optional_real_labels_file(_bench.optional_compile_mode(sys.argv[1:]))
        code = app(args=args, prog_name="rmt", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into a returned 130 (no command returns it otherwise)
            raise KeyboardInterrupt
        stdout.flush()
    except no_args_is_help as e:  # bare `rmt` or `rmt COMMAND`: the help was printed
        sys.exit(e.exit_code)
    except click_errors.UsageError as e:  # a missing, unknown or malformed argument
        where = e.ctx.command_path if e.ctx is not None else "rmt"
        _error(f"{e.format_message()} (see '{where} --help')", e.exit_code)
    except click_errors.ClickException as e:
        _error(e.format_message(), e.exit_code)
    except StdoutError as e:  # standard output itself, not any other file
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        if e.errno == errno.EPIPE:  # `rmt list | head`: the reader is gone, so is the rest
            sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a tool a closed pipe ended
        _error(f"cannot write the output: {e}", 2)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 (user errors, then the last resort: never exit 1, CI's "regression")
        _failure(e)
    sys.exit(code if isinstance(code, int) else 0)


def _failure(error: Exception) -> NoReturn:
    """A user error (an RMTError) is one line, exit 2. An error no command turned into one: the
    machine's limits and the paths it was given are still the user's to change (one line, exit
    2); anything else is a bug in rmt (its traceback, then exit 3, so that CI never reads it as a
    regression or a missed gate, exit 1)."""
    try:  # imported here, not for `rmt --help`: rmt imports torch and timm
        from rmt.errors import RMTError, first_line, is_out_of_memory
    except Exception as broken:  # noqa: BLE001 (a broken torch or timm install: the command failed on it too)
        reason = next(iter(str(broken).splitlines()), "") or type(broken).__name__
        _error(f"cannot load rmt ({reason}): check the torch and timm installs", 2)
    if isinstance(error, RMTError):
        _error(str(error), 2)
    if isinstance(error, ImportError) and error.name and error.name.partition(".")[0] != "rmt":
        # a dependency that cannot load (torch without its CUDA libraries, say): the install needs fixing
        _error(f"cannot load {error.name} ({first_line(error)}): check the torch and timm installs", 2)
    if is_out_of_memory(error):
        _error(f"out of memory ({first_line(error)}): try a smaller batch or image size", 2)
    if isinstance(error, RuntimeError) and "DataLoader worker" in str(error):  # killed: memory, a small /dev/shm
        _error(f"{first_line(error)}: try fewer --workers, or --workers 0", 2)
    if isinstance(error, OverflowError):
        _error(f"a number is too large: {first_line(error)}", 2)
    if isinstance(error, OSError) and error.filename is not None:  # a path the command was given
        _error(f"{error.filename}: {error.strerror or first_line(error)}", 2)
    traceback.print_exception(error, file=sys.stderr)
    _error(f"internal error, a bug in rmt {_version_string()} ({type(error).__name__}: {first_line(error)}); "
           "please report it with the traceback above", 3)


if __name__ == "__main__":
    main()
