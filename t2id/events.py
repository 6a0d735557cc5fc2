"""What stages tell the person running them: messages, tables, progress.

Stage cores never print. They call the `Events` they are handed; the CLI hands them one that
renders with rich (t2id/console.py), tests and library callers get `LogEvents` (the standard
`logging` module, silent unless configured). Keeping output behind this seam is what lets the CLI
decide how loud a run is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

log = logging.getLogger("t2id")

Advance = Callable[[int], None]


class Events(Protocol):
    def info(self, message: str) -> None: ...

    def warning(self, message: str) -> None: ...

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None: ...

    def progress(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Advance]: ...

    def stage_started(self, stage: str) -> None: ...

    def stage_skipped(self, stage: str) -> None: ...

    def stage_finished(self, stage: str, seconds: float, summary: dict) -> None: ...


class LogEvents:
    """Events as log records (logger 't2id'); progress is not reported."""

    def info(self, message: str) -> None:
        log.info(message)

    def warning(self, message: str) -> None:
        log.warning(message)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        lines = [title, " | ".join(map(str, columns))] + [" | ".join(map(str, r)) for r in rows]
        log.info("\n".join(lines))

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Advance]:
        yield lambda n=1: None

    def stage_started(self, stage: str) -> None:
        log.info("%s: running", stage)

    def stage_skipped(self, stage: str) -> None:
        log.info("%s: up to date, skipped", stage)

    def stage_finished(self, stage: str, seconds: float, summary: dict) -> None:
        log.info("%s: done in %.1fs", stage, seconds)
