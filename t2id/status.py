"""`t2id status`: where a run stands, from its store alone.

No Ray and no config beyond the run's own: it reads `<run>/config.yaml`, the stage markers, the run
lock (t2id.runlock), the failure records and what the stages have published so far, so it works on
a laptop against an S3 run that a cluster is writing, while it runs. Each stage of run.stages is:

  done      its marker `<stage>/_SUCCESS.json` exists: seconds and what it produced;
  running   the run lock names it and its holder renews the lock (heartbeat within the lease);
  stale     the lock names it but its holder stopped renewing it, or is a process of this machine
            that no longer exists (killed): rerunning resumes it;
  failed    `<stage>/_FAILED.json` (written by the runner when the stage raised): its error line;
  partial   some of its outputs are in the store but nothing is running it (an interrupted run);
  pending   nothing yet.

Progress within a stage is counted from what the stage publishes: LoRA folds with a memo (trained
adapters), generated images from the per-image records, labelled folds, grid trials with a published
result (plus Tune's running/errored trials); the ETA is the rate so far.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from t2id import layout
from t2id.errors import UserError
from t2id.events import summary_line
from t2id.store import Store, open_store


@dataclass
class StageStatus:
    stage: str
    state: str  # done | running | stale | failed | partial | pending
    detail: str = ""  # done: what it produced; otherwise progress in words
    done: int | None = None  # units finished (folds, images, trials)
    total: int | None = None
    unit: str = ""
    seconds: float | None = None  # done: the stage's time; running/stale: elapsed so far
    eta_seconds: float | None = None
    error: str | None = None  # the last error line (failed record)
    finished_at: str | None = None


@dataclass
class RunStatus:
    run_id: str
    root: str
    checked_at: str
    lock: dict[str, Any] | None
    lock_state: str | None  # live | stale | dead (holder process gone) | None (not locked)
    elapsed_seconds: float | None
    stages: list[StageStatus] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """A run is going on: someone holds a live lock."""
        return self.lock_state == "live"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["lock"]:
            data["lock"].pop("token", None)  # the holder's secret for renewing; nobody else needs it
        return data


def open_run(target: str, endpoint_url: str | None = None) -> Store:
    """The run's store from a CONFIG file (store.uri + run.id) or a run root (local folder or s3:// URI)."""
    path = Path(target).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from t2id.config import load_config
        from t2id.runner import run_store

        return run_store(load_config(path))
    if "://" not in target and not path.is_dir():
        raise UserError(f"{target}: no such config file or run folder; pass CONFIG (a .yaml) or the run root "
                        "<store.uri>/<run.id> (a folder or s3://bucket/prefix/run-id)")
    store = open_store(target if "://" in target else str(path.resolve()), endpoint_url=endpoint_url)
    if not store.exists(layout.CONFIG):
        raise UserError(f"{store.root}: not a t2id run (no {layout.CONFIG}); pass the run root "
                        "<store.uri>/<run.id>, or the CONFIG file")
    return store


def _parse(ts: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(ts) if ts else None
    except ValueError:
        return None


def _holder_alive(holder: str) -> bool | None:
    """Whether the lock holder's process exists; None when it runs on another machine (cannot tell)."""
    try:
        host, pid = holder.rsplit("@", 1)[1].rsplit(":", 1)
        pid_number = int(pid)
    except (IndexError, ValueError):
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def lock_state(record: dict[str, Any] | None, now: datetime) -> str | None:
    from t2id.runlock import is_stale

    if record is None:
        return None
    if _holder_alive(str(record.get("holder", ""))) is False:
        return "dead"
    return "stale" if is_stale(record, now) else "live"


def _read_json(store: Store, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(store.read_text(key)) if store.exists(key) else None
    except (ValueError, UserError):
        return None


def _config(store: Store) -> tuple[dict[str, Any], Any]:
    """(the stored config as a dict, as a validated T2IDConfig or None when this t2id cannot read it)."""
    raw = yaml.safe_load(store.read_text(layout.CONFIG)) or {}
    try:
        from t2id.config import validate_config

        return raw, validate_config(raw, source=store.uri(layout.CONFIG))
    except UserError:  # written by another t2id version: stage names still tell a lot
        return raw, None


def _folds(store: Store, markers: dict[str, dict], wanted: list[int] | None) -> list[int] | None:
    if wanted is not None:
        return sorted(wanted)
    k = (markers.get("split") or {}).get("summary", {}).get("folds")
    return list(range(int(k))) if isinstance(k, int) else None


def _count(keys: list[str], suffix: str) -> int:
    return sum(1 for k in keys if k.endswith(suffix))


def stage_progress(store: Store, stage: str, cfg: Any, markers: dict[str, dict]) -> tuple[int | None, int | None, str, str]:
    """(done, total, unit, words) of a stage that is not done, from what it has published so far."""
    if cfg is None:
        return None, None, "", ""
    if stage == "lora":
        folds = _folds(store, markers, cfg.lora.folds)
        if folds is None:
            return None, None, "", ""
        trained = [f for f in folds if store.exists(layout.memo(layout.lora.fold(f)))]
        return len(trained), len(folds), "folds", f"adapters trained for folds {trained}" if trained else ""
    if stage == "generate":
        folds = _folds(store, markers, cfg.generate.folds)
        if folds is None:
            return None, None, "", ""
        per_fold = cfg.generate.images_per_class * len(cfg.lora.target_classes)
        made = sum(_count(store.list(layout.generate.records(f)), ".json") for f in folds)
        finished = [f for f in folds if store.exists(layout.memo(layout.generate.fold(f)))]
        words = f"folds {finished} finished" if finished else ""
        return made, per_fold * len(folds), "images", words
    if stage == "label":
        folds = _folds(store, markers, cfg.label.folds)
        if folds is None:
            return None, None, "", ""
        labelled = [f for f in folds if store.exists(layout.label.labels(f))]
        made = sum(_count(store.list(layout.label.inpaint_records(f)), ".json") for f in folds)
        return len(labelled), len(folds), "folds", f"{made} inpainted images" if made else ""
    if stage == "grid":
        from t2id.grid.ray_layer import experiment_status
        from t2id.grid.settings import settings as grid_settings

        folds = _folds(store, markers, cfg.grid.folds)
        if folds is None:
            return None, None, "", ""
        seeds = grid_settings(cfg).seeds
        total = len(folds) * len(cfg.grid.strategies) * len(seeds)
        results = [k for k in store.list(layout.grid.root) if k.endswith("/result.json")
                   and not k.startswith(layout.grid.tune + "/")]
        best = None
        for key in results:
            value = (_read_json(store, key) or {}).get("overall", {}).get("map50_95")
            if isinstance(value, int | float) and (best is None or value > best):
                best = float(value)
        tune = list(experiment_status(store).values())
        words = [f"{tune.count(s)} {s.lower()}" for s in ("RUNNING", "ERROR") if tune.count(s)]
        if best is not None:
            words.append(f"best mAP50-95 {best:.3f}")
        return len(results), total, "trials", ", ".join(words)
    return None, None, "", ""


def run_status(store: Store, now: datetime | None = None) -> RunStatus:
    """Where the run in `store` (its root) stands now."""
    from t2id.runlock import read_lock

    now = now or datetime.now(UTC)
    raw, cfg = _config(store)
    stages = list((raw.get("run") or {}).get("stages") or [])
    lock = read_lock(store)
    held = lock_state(lock, now)
    markers = {s: m for s in stages if (m := _read_json(store, layout.marker(s))) is not None}
    status = RunStatus(run_id=str((raw.get("run") or {}).get("id", Path(store.root).name)), root=store.root,
                       checked_at=now.isoformat(timespec="seconds"), lock=lock, lock_state=held,
                       elapsed_seconds=None)

    finished = [t for m in markers.values() if (t := _parse(m.get("timings", {}).get("finished_at")))]
    lock_start = _parse((lock or {}).get("started_at"))
    for name in stages:
        marker = markers.get(name)
        if marker is not None:
            timings = marker.get("timings", {})
            status.stages.append(StageStatus(name, "done", summary_line(name, marker.get("summary", {})),
                                             seconds=timings.get("seconds"), finished_at=timings.get("finished_at")))
            continue
        failure = _read_json(store, layout.failed(name))
        done, total, unit, words = stage_progress(store, name, cfg, markers)
        st = StageStatus(name, "pending", words, done, total, unit, error=(failure or {}).get("error"))
        if lock is not None and lock.get("stage") == name:
            st.state = "running" if held == "live" else "stale"
            # The stage started when the previous one finished, or when this run took the lock.
            since = max([t for t in (*finished, lock_start) if t is not None], default=None)
            if since is not None:
                st.seconds = (now - since).total_seconds()
            if st.state == "running" and st.seconds and done and total and done < total:
                st.eta_seconds = st.seconds * (total - done) / done
        elif failure is not None:
            st.state = "failed"
        elif done or any(not k.startswith(f"{name}/logs/") for k in store.list(name)):
            st.state = "partial"
        status.stages.append(st)

    starts = [t for m in markers.values() if (t := _parse(m.get("timings", {}).get("started_at")))]
    if held == "live" and lock_start is not None:
        status.elapsed_seconds = (now - lock_start).total_seconds()
    elif starts and finished:
        status.elapsed_seconds = (max(finished) - min(starts)).total_seconds()
    return status
