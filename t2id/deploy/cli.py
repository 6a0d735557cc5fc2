"""`t2id submit` and `t2id k8s ...` commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the deployment commands to the root app."""
