"""``rmt convert``: check a checkpoint and rewrite it in the official or rmt layout."""

from __future__ import annotations

from typing import Optional

import typer

from rmt_cli.console import out


def register(app: typer.Typer) -> None:
    app.command()(convert)


def convert(
    model: str = typer.Argument(..., help="RMT variant the checkpoint belongs to, e.g. rmt_s."),
    source: str = typer.Argument(..., help="Checkpoint in any official layout (or ours)."),  # a str: Path reads '' as '.'
    destination: str = typer.Argument(..., help="Where to write the converted checkpoint."),  # a str: Path drops a trailing slash
    to: str = typer.Option("official", "--to", help="Layout to write: official ({'model': state dict}, for the official code) or rmt (a bare state dict)."),
    ema: Optional[bool] = typer.Option(
        None, "--ema/--no-ema", help="Take the EMA or the plain weights (default: of a file holding both, the published ones: plain for rmt_t, EMA for the others)."
    ),
) -> None:
    """Check a checkpoint tensor by tensor and rewrite it in the official or rmt layout."""
    from rmt.io import check_paths_given
    from rmt.models.checkpoint import convert_checkpoint_file

    check_paths_given({"the source checkpoint": source})
    summary = convert_checkpoint_file(model, source, destination, layout=to, ema=ema)
    out.print(
        f"wrote {destination} ({summary['layout']} layout, {summary['tensors']} tensors, "
        f"{summary['params']:,} parameters, from '{summary['source_entry']}')",
        markup=False, soft_wrap=True,  # a path is not markup, nor broken across lines
    )
