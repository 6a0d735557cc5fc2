"""Stage runner: run folders, `_SUCCESS.json` markers, skip-if-done, --only / --force.

A stage is a module `t2id/<stage>/stage.py` exposing `STAGE: Stage`: a `settings(cfg)` function
that builds the stage's frozen settings model (everything it takes from the config, from any
section), the upstream stages it reads, and `run(ctx, settings)`. Its marker
`<run>/<stage>/_SUCCESS.json` records:
  settings_hash  sha256 of the settings model (and the settings themselves, for reading),
  input_hashes   for each upstream stage, the digest of that stage's marker outputs; plus the
                 external inputs the stage declares (e.g. the source dataset's fingerprint),
  outputs        key -> sha256 of what the stage published,
  timings        start, end, seconds.
A stage is done when its marker exists and its settings_hash and input_hashes equal the current
ones; otherwise it runs again. No stage sees the whole config, so a value changes exactly the
stages whose settings hold it. The marker is written last, atomically, so a stage killed midway
has no marker and is redone (each stage makes its partial work reusable with t2id.resume).
The marker also records each output's size ("sizes"), and a done stage is skipped only when its
outputs are intact (t2id.resume.check_outputs): each exists with its size, small ones (and all of
them with `verify`) with their sha256. A damaged output is deleted, said, and the stage redone.
A run holds the run lock (t2id.runlock) from before its first write until it returns, so two
runs of one run id never work on it together.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from t2id import __version__, layout, runlock
from t2id.cluster_config import ClusterConfig
from t2id.config import STAGES, T2IDConfig, dump_config
from t2id.configbase import StageSettings
from t2id.errors import UserError
from t2id.events import Events, LogEvents, first_line
from t2id.hashing import sha256_json
from t2id.resume import Damage, check_outputs, output_sizes
from t2id.store import Store, store_from_config
from t2id.tracking import Tracking, resolve as resolve_tracking

MARKER = layout.MARKER
S = TypeVar("S", bound=StageSettings)


@dataclass
class StageResult:
    outputs: dict[str, str] = field(default_factory=dict)  # run-relative key -> sha256
    summary: dict[str, Any] = field(default_factory=dict)  # small facts for the log / report


@dataclass
class StageContext:
    """Where and how a stage runs; nothing here changes what it produces (that is its settings)."""

    store: Store  # the run's store: <store>/<run_id>/
    stage: str
    cache_dir: Path  # local scratch and caches (materialized datasets, models)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # how to reach Ray
    endpoint_url: str | None = None  # S3 endpoint for URIs outside the run store (weights, sources)
    events: Events = field(default_factory=LogEvents)
    force: bool = False  # --force covers this stage: ignore its unit memos (t2id.resume)
    tracking: Tracking | None = None  # MLflow / TensorBoard (run.tracking, resolved); None: off

    def marker(self, stage: str) -> dict[str, Any] | None:
        return read_marker(self.store, stage)


@dataclass(frozen=True)
class Stage(Generic[S]):
    name: str
    settings: Callable[[T2IDConfig], S]  # everything the stage takes from the config
    depends_on: tuple[str, ...]  # upstream stages whose outputs this stage reads (when enabled)
    run: Callable[[StageContext, S], StageResult]
    external_inputs: Callable[[StageContext, S], dict[str, str]] | None = None  # e.g. the source dataset


def _module_name(stage: str) -> str:
    return f"t2id.{stage}.stage"


def stage_available(stage: str) -> bool:
    """True when the stage's module exists in this installation."""
    return importlib.util.find_spec(_module_name(stage)) is not None


def load_stages() -> dict[str, Stage]:
    """Every stage this installation provides, in pipeline order."""
    return {name: importlib.import_module(_module_name(name)).STAGE for name in STAGES if stage_available(name)}


def read_marker(store: Store, stage: str) -> dict[str, Any] | None:
    key = layout.marker(stage)
    if not store.exists(key):
        return None
    return json.loads(store.read_text(key))


def outputs_digest(marker: dict[str, Any]) -> str:
    return sha256_json(marker["outputs"])


def settings_hash(settings: StageSettings) -> str:
    return sha256_json(settings.model_dump(mode="json"))


def expected_identity(stage: Stage, settings: StageSettings, ctx: StageContext,
                      enabled: frozenset[str]) -> dict[str, Any]:
    """What the marker must hold for the stage to count as done with the current settings and inputs."""
    inputs: dict[str, str] = {}
    for upstream in stage.depends_on:
        if upstream not in enabled:
            continue
        marker = ctx.marker(upstream)
        if marker is None:
            raise UserError(f"stage '{stage.name}' needs stage '{upstream}' first: run `t2id run CONFIG` "
                            f"or `t2id run CONFIG --only {upstream}`")
        inputs[f"stage:{upstream}"] = outputs_digest(marker)
    if stage.external_inputs is not None:
        inputs.update(stage.external_inputs(ctx, settings))
    return {"settings_hash": settings_hash(settings), "input_hashes": inputs}


def run_store(config: T2IDConfig) -> Store:
    return store_from_config(config.store).child(config.run.id)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def record_failure(store: Store, stage: str, error: BaseException) -> None:
    """`<stage>/_FAILED.json` = {error: its first line, at}, for `t2id status`; never hides the error itself."""
    with contextlib.suppress(Exception):
        store.write_text(layout.failed(stage), json.dumps({"error": first_line(error), "at": _now()}))


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran" | "skipped"
    seconds: float
    summary: dict[str, Any]


def _damage_line(damage: list[Damage]) -> str:
    more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
    return f"{damage[0]}{more}"


def check_marker_outputs(store: Store, marker: dict[str, Any], verify: bool = False) -> list[Damage]:
    """The damaged outputs of a done stage: missing, resized, or (small ones; all with `verify`) rehashed."""
    return check_outputs(store, marker["outputs"], marker.get("sizes"), hash_all=verify, content=verify)


def run_pipeline(config: T2IDConfig, only: str | None = None, force: str | None = None,
                 stages: dict[str, Stage] | None = None, events: Events | None = None,
                 verify: bool = False, steal_lock: bool = False) -> list[StageOutcome]:
    """Run the configured stages in order, skipping those whose marker matches and whose outputs are intact.

    `stages` defaults to every stage module of this installation (tests pass their own);
    `events` defaults to log records (the CLI passes its console); `verify` (`--verify`) hashes every
    output of a done stage before skipping it, not only the small ones; `steal_lock` (`--steal-lock`)
    takes the run lock even from a holder that still renews it.
    """
    stages = load_stages() if stages is None else stages
    events = events or LogEvents()
    enabled = [s for s in config.run.stages if s in stages]
    for name, flag in ((only, "--only"), (force, "--force")):
        if name is not None and name not in STAGES:
            raise UserError(f"{flag} {name!r}: unknown stage; choose from {', '.join(STAGES)}")
        if name is not None and name not in enabled:
            raise UserError(f"{flag} {name!r}: stage is not enabled in run.stages or not available")
    selected = [only] if only else enabled
    forced = set(enabled[enabled.index(force):]) if force else set()

    store = run_store(config)
    tracking = resolve_tracking(config)
    with runlock.acquire(store, config.run.id, steal=steal_lock, events=events) as lock:
        store.write_text(layout.CONFIG, dump_config(config))
        cache_dir = Path(config.store.cache_dir).expanduser()
        outcomes = []
        for name in selected:
            lock.set_stage(name)
            stage = stages[name]
            settings = stage.settings(config)
            ctx = StageContext(store=store, stage=name, cache_dir=cache_dir, cluster=config.cluster,
                               endpoint_url=config.store.endpoint_url, events=events, force=name in forced,
                               tracking=tracking)
            identity = expected_identity(stage, settings, ctx, frozenset(enabled))
            if only:  # the upstream stages are not rerun, so their outputs are checked here
                for upstream in stage.depends_on:
                    if upstream in enabled and (up := ctx.marker(upstream)) is not None:
                        if damage := check_marker_outputs(store, up, verify):
                            raise UserError(f"stage '{name}' reads stage '{upstream}', whose {_damage_line(damage)}: "
                                            f"redo it first with `t2id run CONFIG --only {upstream}`")
            marker = ctx.marker(name)
            if name not in forced and marker is not None and all(marker.get(k) == v for k, v in identity.items()):
                damage = check_marker_outputs(store, marker, verify)
                if not damage:
                    events.stage_skipped(name)
                    outcomes.append(StageOutcome(name, "skipped", 0.0, marker.get("summary", {})))
                    continue
                events.warning(f"{name}: {_damage_line(damage)}; redoing")
                for d in damage:  # so that no unit memo or skip-if-present copy of the stage reuses it
                    store.delete(d.key)
            events.stage_started(name)
            store.delete(layout.marker(name))  # a stage being redone is not done until it says so again
            started, t0 = _now(), time.perf_counter()
            try:
                result = stage.run(ctx, settings)
            except BaseException as exc:  # recorded for `t2id status`, then raised as it was
                record_failure(store, name, exc)
                events.stage_failed(name, time.perf_counter() - t0, exc)
                raise
            seconds = time.perf_counter() - t0
            sizes = output_sizes(store, result.outputs)
            if missing := sorted(set(result.outputs) - sizes.keys()):
                raise RuntimeError(f"stage '{name}' reported outputs that are not in the store: {missing[:5]}")
            lock.check()  # a run whose lock was taken over must not mark the stage done
            new_marker = {
                "stage": name,
                **identity,
                "settings": settings.model_dump(mode="json"),
                "outputs": result.outputs,
                "sizes": sizes,
                "summary": result.summary,
                "timings": {"started_at": started, "finished_at": _now(), "seconds": round(seconds, 3)},
                "t2id_version": __version__,
            }
            store.write_text(layout.marker(name), json.dumps(new_marker, indent=2, sort_keys=True, default=str))
            store.delete(layout.failed(name))  # an earlier attempt's failure record
            events.stage_finished(name, seconds, result.summary)
            outcomes.append(StageOutcome(name, "ran", seconds, result.summary))
        return outcomes
