"""What stages tell the person running them: messages, tables, progress.

Stage cores never print. They call the `Events` they are handed; the CLI hands them one that
renders with rich (t2id/console.py), tests and library callers get `LogEvents` (the standard
`logging` module, silent unless configured). Keeping output behind this seam is what lets the CLI
decide how loud a run is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger("t2id")


class Advance(Protocol):
    """What `Events.progress` yields: `advance(n)` counts n more units done; `status` (optional) is a short
    note shown beside the bar, e.g. "2 running, 1 failed, best mAP50-95 0.41"."""

    def __call__(self, n: int = 1, status: str | None = None) -> None: ...


class Events(Protocol):
    def info(self, message: str) -> None: ...

    def warning(self, message: str) -> None: ...

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None: ...

    def progress(self, description: str, total: int | None) -> contextlib.AbstractContextManager[Advance]: ...

    def stage_started(self, stage: str) -> None: ...

    def stage_skipped(self, stage: str) -> None: ...

    def stage_finished(self, stage: str, seconds: float, summary: dict) -> None: ...

    def stage_failed(self, stage: str, seconds: float, error: BaseException) -> None: ...


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error (Ray wraps errors in many lines), at most `limit` characters."""
    text = error if isinstance(error, str) else (str(error).strip() or type(error).__name__)
    if not isinstance(error, str) and type(error).__name__ not in text.split(":", 1)[0]:
        text = f"{type(error).__name__}: {text}"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _sum(values: Any) -> int:
    return int(sum(v or 0 for v in values))


def summary_line(stage: str, summary: Mapping[str, Any]) -> str:
    """What a finished stage produced, in a few counts ("generate: 600 images, 571 kept, 29 rejected"),
    from the summary dict the stage returned. Unknown shapes fall back to its scalar entries."""
    s = summary or {}
    try:
        if stage == "data":
            text = f"{s['images']} images, {s['subjects']} subjects, {s['rejected']} rejected"
            return text + (f", imbalance {s['imbalance_ratio']:g}x" if s.get("imbalance_ratio") else "")
        if stage == "split":
            return f"{s['folds']} folds, images per fold {s['images_per_fold']}"
        if stage == "lora":
            folds = s["folds"]
            steps = _sum(f.get("steps") for f in folds.values())
            reused = sum(bool(f.get("reused")) for f in folds.values())
            losses = [f"{f['first_loss']:.3g}→{f['last_loss']:.3g}" for f in folds.values()
                      if f.get("first_loss") is not None and f.get("last_loss") is not None]
            text = f"{len(folds)} adapter(s), {steps} steps"
            text += f", {reused} reused" if reused else ""
            return text + (f", loss {losses[0]}" + (" (first fold)" if len(losses) > 1 else "") if losses else "")
        if stage == "generate":
            classes = [c for f in s["folds"].values() for c in f["classes"].values()]
            attempted, kept = _sum(c["attempted"] for c in classes), _sum(c["kept"] for c in classes)
            text = f"{attempted} images, {kept} kept, {attempted - kept} rejected"
            text += f", shortfall {s['shortfall']}" if s.get("shortfall") else ""
            return text + (f" ({s['reused']} reused)" if s.get("reused") else "")
        if stage == "label":
            folds = s["folds"].values()
            rows, usable = _sum(f["rows"] for f in folds), _sum(f["usable"] for f in folds)
            reasons: dict[str, int] = {}
            for f in folds:
                for reason, n in (f.get("rejected") or {}).items():
                    reasons[reason] = reasons.get(reason, 0) + n
            why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
            return f"{s['method']}: {rows} images, {usable} usable with boxes, {rows - usable} not" + (
                f" ({why})" if why else "")
        if stage == "evaluate":
            return (f"{s['rows']} (fold, class) sets scored, {s['extracted_images']} images featurized"
                    + (f", cached folds {s['cache_hits']}" if s.get("cache_hits") else ""))
        if stage == "grid":
            text = (f"{s['trials']} trials ({len(s['folds'])} folds x {len(s['strategies'])} strategies x "
                    f"{len(s['seeds'])} seed(s))")
            extra = [f"{s[k]} {k}" for k in ("reused", "skipped") if s.get(k)]
            return text + (f", {', '.join(extra)}" if extra else "")
        if stage == "report":
            return f"{s['figures']} figures, {s['tables']} tables"
    except (KeyError, TypeError, ValueError, AttributeError):
        pass  # a summary of another shape: the generic form below
    scalars = [f"{k} {v}" for k, v in s.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    return ", ".join(scalars[:4])


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
        yield lambda n=1, status=None: None

    def stage_started(self, stage: str) -> None:
        log.info("%s: running", stage)

    def stage_skipped(self, stage: str) -> None:
        log.info("%s: up to date, skipped", stage)

    def stage_finished(self, stage: str, seconds: float, summary: dict) -> None:
        log.info("%s: done in %.1fs: %s", stage, seconds, summary_line(stage, summary))

    def stage_failed(self, stage: str, seconds: float, error: BaseException) -> None:
        log.error("%s: failed after %.1fs: %s", stage, seconds, first_line(error))
