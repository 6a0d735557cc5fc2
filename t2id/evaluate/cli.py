"""`t2id models ...` commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="Model weights for air-gapped clusters.", no_args_is_help=True)
