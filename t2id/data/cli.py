"""`t2id data ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="Phantom data, dataset checks.", no_args_is_help=True)
