"""The CLI's rendering of stage events with rich (the only place stage output meets a terminal).

Two ways to run a pipeline on a console (`run_console`):
  - quiet (default): one line per stage start and finish with what it produced, warnings, the stages'
    tables, and one live progress display per stage (a spinner for the stage, a bar with counts and
    ETA for each long loop). Everything else the process prints while a stage runs (Ray's startup and
    worker output forwarded by log_to_driver, ultralytics, Tune, Python warnings, library loggers, the
    stages' own info lines) goes to that stage's log file, uploaded to `<run>/<stage>/logs/<stage>.log`
    when the stage ends, also when it fails. It works at the file-descriptor level (StageLogs), so output
    from C extensions and Ray's threads lands in the log too.
  - verbose (`-v`): everything live on the terminal, as it is printed.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import traceback
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from t2id import layout
from t2id.events import Advance, summary_line
from t2id.store import Store


class StageLogs:
    """Points this process's stdout and stderr (fds 1 and 2) at the running stage's log file.

    Redirecting the descriptors, not `sys.stdout`, is what catches everything: Ray's log_to_driver thread,
    loggers holding the original stream, C extensions and child processes all write to fd 1/2. The console
    keeps writing to `terminal`, a copy of the original stderr taken in `open()`. A stage's log is a local
    file under `folder`, started from the store's copy (so a resumed stage's log keeps the earlier attempts'
    lines, whichever machine ran them), uploaded to `layout.stage_log(stage)` by `upload()`.
    """

    def __init__(self, store: Store, folder: Path) -> None:
        self.store = store
        self.folder = Path(folder)
        self.terminal: TextIO | None = None
        self.stage: str | None = None
        self._saved: dict[int, int] = {}
        self._file: io.BufferedWriter | None = None
        self._uploaded: dict[str, int] = {}  # stage -> local size at its last upload

    def open(self) -> TextIO:
        """Take a copy of the terminal (stderr) for the console; nothing is redirected until `switch`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _flush()
        for fd in (1, 2):
            self._saved[fd] = os.dup(fd)
        self.terminal = os.fdopen(os.dup(self._saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
        return self.terminal

    def local(self, stage: str) -> Path:
        return self.folder / f"{stage}.log"

    def switch(self, stage: str) -> None:
        """From now on fds 1 and 2 write to `stage`'s log (late output of the previous stage lands here too)."""
        path = self.local(stage)
        path.unlink(missing_ok=True)  # the store's copy is the log (a local one may be of another run)
        with contextlib.suppress(Exception):  # an unreadable earlier log must not stop the run
            if self.store.exists(layout.stage_log(stage)):
                self.store.read_file(layout.stage_log(stage), path)
        _flush()
        new = open(path, "ab", buffering=0)  # noqa: SIM115 - kept open while it backs fds 1 and 2
        started = datetime.now(UTC).isoformat(timespec="seconds")
        new.write(f"==== t2id stage {stage}: started {started} on {socket.gethostname()} "
                  f"(pid {os.getpid()}) ====\n".encode())
        for fd in (1, 2):
            os.dup2(new.fileno(), fd)
        if self._file is not None:
            self._file.close()
        self._file, self.stage = new, stage

    def upload(self, stage: str) -> str:
        """Copy the stage's log to the store; its URI (the local path when the store cannot take it)."""
        _flush()
        path = self.local(stage)
        try:
            self.store.write_file(layout.stage_log(stage), path)
        except Exception:  # the store may be what failed; the local copy still tells the story
            return str(path)
        self._uploaded[stage] = path.stat().st_size
        return self.store.uri(layout.stage_log(stage))

    def close(self) -> None:
        """Give fds 1 and 2 back to the terminal; re-upload logs that grew after their upload (late lines)."""
        _flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        for stage, size in list(self._uploaded.items()):
            path = self.local(stage)
            if path.exists() and path.stat().st_size != size:
                self.upload(stage)
        if self.terminal is not None:
            self.terminal.close()
            self.terminal = None


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class RichEvents:
    """Stage events on a rich console. With `logs` (quiet), info lines go to the running stage's log and the
    console gets one line per stage, warnings, tables and a live progress display; without (verbose), every
    message is printed as it comes."""

    def __init__(self, console: Console | None = None, logs: StageLogs | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.logs = logs
        self._live: Progress | None = None  # quiet mode on a terminal: the running stage's display
        self.stage_logs: dict[str, str] = {}  # stage -> URI of its log (quiet mode)

    # messages --------------------------------------------------------------------------------------
    def info(self, message: str) -> None:
        if self.logs is not None and self.logs.stage is not None:
            print(message, file=sys.stderr, flush=True)  # fd 2 is the stage's log now
            return
        self.console.print(escape(message), highlight=False)

    def warning(self, message: str) -> None:
        if self.logs is not None and self.logs.stage is not None:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        view = Table(title=title, title_justify="left")
        for i, column in enumerate(columns):
            view.add_column(str(column), justify="left" if i == 0 else "right")
        for row in rows:
            view.add_row(*(str(v) for v in row))
        self.console.print(view)

    # progress --------------------------------------------------------------------------------------
    @staticmethod
    def _columns() -> list:
        return [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30), _Count(),
                TimeElapsedColumn(), _Eta(), TextColumn("{task.fields[status]}")]

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Advance]:
        if self.logs is not None:
            if self._live is None:  # not a terminal: no bars (they would only add lines to a captured log)
                yield lambda n=1, status=None: None
                return
            live = self._live
            task = live.add_task(description, total=total, status="")
            try:
                yield _advancer(live, task)
            finally:
                live.remove_task(task)
            return
        # Verbose: a bar of its own; stdout/stderr stay as they are, so live output scrolls above it.
        with Progress(*self._columns(), console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total, status="")
            yield _advancer(progress, task)

    # stages ----------------------------------------------------------------------------------------
    def stage_started(self, stage: str) -> None:
        if self.logs is None:
            self.console.print(f"[bold]▶ {stage}[/]: running")
            return
        self.logs.switch(stage)
        if self.console.is_terminal:
            # Output goes to the log, so a live display cannot be garbled by it; no stdout redirection.
            self._live = Progress(*self._columns(), console=self.console, transient=True,
                                  redirect_stdout=False, redirect_stderr=False)
            self._live.start()
            self._live.add_task(f"[bold]{stage}[/]", total=None, status="running")  # spinner + elapsed
        else:
            self.console.print(f"▶ {stage}: running", highlight=False)

    def _stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def stage_skipped(self, stage: str) -> None:
        self.console.print(f"[green]✓[/] {stage}: up to date, skipped")

    def stage_finished(self, stage: str, seconds: float, summary: dict) -> None:
        self._stop_live()
        produced = summary_line(stage, summary)
        if self.logs is not None:
            print(f"==== {stage}: done in {seconds:.1f}s: {produced}", file=sys.stderr, flush=True)
            self.stage_logs[stage] = self.logs.upload(stage)
        self.console.print(f"[green]✓[/] {stage}: {escape(produced)} [dim]({_duration(seconds)})[/]"
                           if produced else f"[green]✓[/] {stage}: done in {_duration(seconds)}", highlight=False)

    def stage_failed(self, stage: str, seconds: float, error: BaseException) -> None:
        """One line (the CLI prints the error itself); in quiet mode the traceback goes to the stage's log."""
        self._stop_live()
        where = ""
        if self.logs is not None:
            print(f"==== {stage}: failed after {seconds:.1f}s", file=sys.stderr, flush=True)
            traceback.print_exception(error, file=sys.stderr)
            self.stage_logs[stage] = self.logs.upload(stage)
            where = f"; its log: {self.stage_logs[stage]}"
        self.console.print(f"[red]✗[/] {stage}: failed after {_duration(seconds)}{escape(where)}", highlight=False,
                           soft_wrap=True)


class _Count(ProgressColumn):
    """done/total, blank for a task without a total (the stage's own row)."""

    def render(self, task: Task) -> Text:
        return Text("" if task.total is None else f"{int(task.completed)}/{int(task.total)}", style="progress.download")


class _Eta(TimeRemainingColumn):
    """'eta 0:01:23' once a rate is known; blank for a task without a total."""

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return Text.assemble("eta ", super().render(task))


def _advancer(progress: Progress, task: TaskID) -> Advance:
    def advance(n: int = 1, status: str | None = None) -> None:
        if status is None:
            progress.advance(task, n)
        else:
            progress.update(task, advance=n, status=status)
    return advance


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


@contextlib.contextmanager
def run_console(store: Store, log_folder: Path, verbose: bool = False) -> Iterator[RichEvents]:
    """The events for one `t2id run`/`demo` on this terminal (see the module docstring for the two modes).

    Quiet: on the way out, Ray is shut down while output still goes to the logs (its workers' last lines
    land there, not on the terminal), then fds 1 and 2 are restored and grown logs uploaded again.
    """
    if verbose:
        yield RichEvents(Console(stderr=True))
        return
    from t2id.raycluster import shutdown_ray

    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # plain "(pid=...)" prefixes: the log is a file, not a terminal
    logs = StageLogs(store, log_folder)
    terminal = logs.open()
    console = Console(file=terminal, width=_width(terminal))
    events = RichEvents(console, logs)
    try:
        yield events
    finally:
        events._stop_live()
        try:
            if logs.stage is not None:
                shutdown_ray()
        finally:
            logs.close()
    if events.stage_logs:
        Console(stderr=True).print(f"stage logs: {_logs_pattern(store)}", highlight=False, soft_wrap=True)


def _width(stream: TextIO) -> int | None:
    """The terminal's width now: fds 1 and 2 will point at files, where rich cannot measure it."""
    if os.environ.get("COLUMNS"):
        return None  # rich reads it
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except OSError:
        return None


def _logs_pattern(store: Store) -> str:
    return store.uri(layout.stage_log("<stage>"))


# t2id status --------------------------------------------------------------------------------------

_STATE_STYLE = {"done": "[green]✓ done[/]", "running": "[yellow]▶ running[/]", "stale": "[red]■ stale[/]",
                "failed": "[red]✗ failed[/]", "partial": "[magenta]◐ partial[/]", "pending": "[dim]· pending[/]"}


def status_view(status) -> Table:
    """A `t2id.status.RunStatus` as one table, its caption saying who holds the run and for how long."""
    lock = status.lock or {}
    held = {"live": f"running: {lock.get('holder')}, stage {lock.get('stage')}",
            "stale": f"stale lock of {lock.get('holder')} (no heartbeat since {lock.get('heartbeat_at')}); "
                     "rerun to resume",
            "dead": f"lock of {lock.get('holder')}, a process that no longer exists; rerun to resume",
            None: "not running"}[status.lock_state]
    elapsed = f", elapsed {_duration(status.elapsed_seconds)}" if status.elapsed_seconds is not None else ""
    view = Table(title=f"run {status.run_id}: {held}{elapsed}", title_justify="left",
                 caption=f"{status.root} · checked {status.checked_at}", caption_justify="left")
    for column in ("stage", "state", "progress", "time", "eta", "detail"):
        view.add_column(column, justify="right" if column in ("progress", "time", "eta") else "left")
    for st in status.stages:
        progress = f"{st.done}/{st.total} {st.unit}" if st.total is not None and st.state != "done" else ""
        detail = escape(st.detail)
        if st.error and st.state != "done":
            detail = (detail + " · " if detail else "") + f"[red]{escape(st.error)}[/]"
        view.add_row(st.stage, _STATE_STYLE.get(st.state, st.state), progress,
                     _duration(st.seconds) if st.seconds is not None else "",
                     _duration(st.eta_seconds) if st.eta_seconds is not None else "", detail)
    return view


# t2id plan ----------------------------------------------------------------------------------------

def _hm(hours: float) -> str:
    return _duration(hours * 3600) if hours * 3600 >= 0.05 else "-"


def plan_views(plan) -> list:
    """A `t2id.plan.Plan` as printable parts: header lines, the per-stage table, cost, the throughput table."""
    d = plan.dataset
    parts: list = [
        f"[bold]plan[/] for {escape(plan.config)} (run {escape(plan.run_id)}): {plan.folds} folds, target classes "
        f"{escape(', '.join(plan.target_classes))}",
        f"dataset: {d.images:,} images, {d.rare_images:,} holding a target class; from {escape(d.source)}",
        f"GPUs: {plan.gpus} x {plan.gpu_type} ({escape(plan.gpus_source)})",
    ]
    if plan.tiny:
        parts.append("[yellow]note:[/] lora.base_model is 'tiny' (random tiny models): the figures are what these "
                     "settings would take with a full-size SDXL; the tiny run itself takes minutes on a CPU")
    view = Table(title_justify="left", show_footer=True)
    view.add_column("stage", footer="total")
    view.add_column("what it will do", ratio=1)
    view.add_column("GPUs", justify="right")
    view.add_column("GPU-hours", justify="right", footer=f"{plan.gpu_hours:,.1f}")
    view.add_column("wall", justify="right", footer=_hm(plan.wall_hours))
    for st in plan.stages:
        work = escape(st.work) + ("" if st.on_gpu or st.basis == "CPU" else " [yellow](CPU in this config)[/]")
        view.add_row(st.stage, work, f"{st.gpus:g}" if st.gpus else "-",
                     f"{st.gpu_hours:,.2f}" if st.gpu_hours else "-", _hm(st.wall_hours))
    parts.append(view)
    if plan.price_per_gpu_hour is None:
        parts.append("cost: pass --price-per-gpu-hour X to see it")
    else:
        parts.append(f"cost at ${plan.price_per_gpu_hour:g}/GPU-hour: [bold]${plan.cost:,.0f}[/] for "
                     f"{plan.gpu_hours:,.1f} busy GPU-hours (autoscaling releases idle GPUs); "
                     f"${plan.cost_held:,.0f} if all {plan.gpus} GPUs are held for the {_hm(plan.wall_hours)} wall time")
    rates = Table(title="per-GPU throughputs used (t2id/plan_throughput.py; docs/plan.md)", title_justify="left")
    for column in ("work", "variant", "at", "img/s per GPU", "source"):
        rates.add_column(column, justify="right" if column == "img/s per GPU" else "left")
    for t in plan.throughputs:
        at = f"{t.resolution} px" + (f", {t.steps} steps" if t.steps else "") + f", {t.conditions}"
        rates.add_row(t.work, t.variant, escape(at), f"{t.images_per_second:g}", escape(t.source))
    parts.append(rates)
    parts.append("not modelled: model loading and Ray start-up per stage, S3 transfers, quality-gate top-ups "
                 "beyond the first round")
    return parts
