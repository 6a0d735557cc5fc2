"""The CLI's rendering of stage events with rich (the only place stage output meets a terminal)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from t2id.events import Advance


class RichEvents:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    def info(self, message: str) -> None:
        self.console.print(escape(message), highlight=False)

    def warning(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        view = Table(title=title, title_justify="left")
        for i, column in enumerate(columns):
            view.add_column(str(column), justify="left" if i == 0 else "right")
        for row in rows:
            view.add_row(*(str(v) for v in row))
        self.console.print(view)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Advance]:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)

    def stage_started(self, stage: str) -> None:
        self.console.print(f"[bold]▶ {stage}[/]: running")

    def stage_skipped(self, stage: str) -> None:
        self.console.print(f"[green]✓[/] {stage}: up to date, skipped")

    def stage_finished(self, stage: str, seconds: float, summary: dict) -> None:
        self.console.print(f"[green]✓[/] {stage}: done in {seconds:.1f}s")
