"""Stage runner: run folders, `_SUCCESS.json` markers, skip-if-done, --only / --force.

A stage is a module `t2id/<stage>/stage.py` exposing `STAGE: Stage`. Its marker
`<run>/<stage>/_SUCCESS.json` records:
  config_hash   sha256 of the config sections the stage reads (plus run.seed),
  input_hashes  for each upstream stage, the digest of that stage's marker outputs; plus any
                external inputs the stage fingerprints (e.g. the source dataset),
  outputs       key -> sha256 of what the stage published,
  timings       start, end, seconds.
A stage is done when its marker exists and its config_hash and input_hashes equal the
current ones; otherwise it runs again. The marker is written last, atomically, so a stage
killed midway has no marker and is redone (each stage makes its own partial work reusable).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from t2id import __version__
from t2id.config import STAGES, T2IDConfig, dump_config, sha256_json
from t2id.errors import UserError
from t2id.store import Store, store_from_config

MARKER = "_SUCCESS.json"
console = Console(stderr=True)


@dataclass
class StageResult:
    outputs: dict[str, str] = field(default_factory=dict)  # run-relative key -> sha256
    summary: dict[str, Any] = field(default_factory=dict)  # small facts for the log / report


@dataclass
class StageContext:
    config: T2IDConfig
    store: Store  # the run's store: <store>/<run_id>/
    stage: str
    cache_dir: Path  # local scratch and caches (materialized datasets, models)
    enabled: frozenset[str] = frozenset()  # stages this run executes (configured and available)

    def marker(self, stage: str) -> dict[str, Any] | None:
        return read_marker(self.store, stage)

    def stage_enabled(self, stage: str) -> bool:
        return stage in self.enabled


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections whose values change the outputs
    depends_on: tuple[str, ...]  # upstream stages whose outputs this stage reads (when enabled)
    run: Callable[[StageContext], StageResult]
    fingerprint: Callable[[StageContext], dict[str, str]] | None = None  # external inputs


def _module_name(stage: str) -> str:
    return f"t2id.{stage}.stage"


def stage_available(stage: str) -> bool:
    """True when the stage's module exists in this installation."""
    return importlib.util.find_spec(_module_name(stage)) is not None


def load_stages() -> dict[str, Stage]:
    """Every stage this installation provides, in pipeline order."""
    return {name: importlib.import_module(_module_name(name)).STAGE for name in STAGES if stage_available(name)}


def read_marker(store: Store, stage: str) -> dict[str, Any] | None:
    key = f"{stage}/{MARKER}"
    if not store.exists(key):
        return None
    return json.loads(store.read_text(key))


def outputs_digest(marker: dict[str, Any]) -> str:
    return sha256_json(marker["outputs"])


def expected_identity(stage: Stage, ctx: StageContext) -> dict[str, Any]:
    """What the marker must hold for the stage to count as done with the current config and inputs."""
    inputs: dict[str, str] = {}
    for upstream in stage.depends_on:
        if not ctx.stage_enabled(upstream):
            continue
        marker = ctx.marker(upstream)
        if marker is None:
            raise UserError(f"stage '{stage.name}' needs stage '{upstream}' first: run `t2id run CONFIG` "
                            f"or `t2id run CONFIG --only {upstream}`")
        inputs[f"stage:{upstream}"] = outputs_digest(marker)
    if stage.fingerprint is not None:
        inputs.update(stage.fingerprint(ctx))
    return {"config_hash": ctx.config.section_hash(*stage.sections), "input_hashes": inputs}


def run_store(config: T2IDConfig) -> Store:
    return store_from_config(config.store).child(config.run.id)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran" | "skipped"
    seconds: float
    summary: dict[str, Any]


def run_pipeline(config: T2IDConfig, only: str | None = None, force: str | None = None,
                 stages: dict[str, Stage] | None = None) -> list[StageOutcome]:
    """Run the configured stages in order, skipping those whose marker matches.

    `stages` defaults to every stage module of this installation (tests pass their own).
    """
    stages = load_stages() if stages is None else stages
    enabled = [s for s in config.run.stages if s in stages]
    for name, flag in ((only, "--only"), (force, "--force")):
        if name is not None and name not in STAGES:
            raise UserError(f"{flag} {name!r}: unknown stage; choose from {', '.join(STAGES)}")
        if name is not None and name not in enabled:
            raise UserError(f"{flag} {name!r}: stage is not enabled in run.stages or not available")
    selected = [only] if only else enabled
    forced = set(enabled[enabled.index(force):]) if force else set()

    store = run_store(config)
    store.write_text("config.yaml", dump_config(config))
    cache_dir = Path(config.store.cache_dir).expanduser()
    outcomes = []
    for name in selected:
        stage = stages[name]
        ctx = StageContext(config=config, store=store, stage=name, cache_dir=cache_dir, enabled=frozenset(enabled))
        identity = expected_identity(stage, ctx)
        marker = ctx.marker(name)
        if name not in forced and marker is not None and all(marker.get(k) == v for k, v in identity.items()):
            console.print(f"[green]✓[/] {name}: up to date, skipped")
            outcomes.append(StageOutcome(name, "skipped", 0.0, marker.get("summary", {})))
            continue
        console.print(f"[bold]▶ {name}[/]: running")
        store.delete(f"{name}/{MARKER}")  # a stage being redone is not done until it says so again
        started, t0 = _now(), time.perf_counter()
        result = stage.run(ctx)
        seconds = time.perf_counter() - t0
        new_marker = {
            "stage": name,
            **identity,
            "outputs": result.outputs,
            "summary": result.summary,
            "timings": {"started_at": started, "finished_at": _now(), "seconds": round(seconds, 3)},
            "t2id_version": __version__,
        }
        store.write_text(f"{name}/{MARKER}", json.dumps(new_marker, indent=2, sort_keys=True))
        console.print(f"[green]✓[/] {name}: done in {seconds:.1f}s")
        outcomes.append(StageOutcome(name, "ran", seconds, result.summary))
    return outcomes
