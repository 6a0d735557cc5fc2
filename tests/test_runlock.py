"""The run lock (issue 18, item 1): two runs of one run id never work on it together.

Every test runs on a local folder and on the S3 test server (moto on loopback), through the real
store; pipelines are the real runner with tiny stage bodies (`run_pipeline(..., stages=...)`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from t2id import layout, runlock
from t2id.config import validate_config
from t2id.configbase import StageSettings
from t2id.data.phantom import write_phantom
from t2id.errors import UserError
from t2id.events import LogEvents
from t2id.runner import Stage, StageResult, read_marker, run_pipeline, run_store

LOCKED = r"run 'r1' is locked by .+ since .+ \(stage .+, last heartbeat .+\); if that run is dead, rerun with --steal-lock"


class Settings(StageSettings):
    value: str


class Warnings(LogEvents):
    """Events that keep the warnings."""

    def __init__(self):
        self.warnings: list[str] = []

    def warning(self, message):
        self.warnings.append(message)


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs"  # s3_server sets AWS_ENDPOINT_URL


def config(store_uri, tmp_path, value="a"):
    # the generate section's value is the fake stage's only setting: two "different settings" runs
    return validate_config({"run": {"id": "r1", "stages": ["generate"]},
                            "store": {"uri": store_uri, "cache_dir": str(tmp_path / "cache")},
                            "generate": {"images_per_class": {"a": 3, "b": 4}[value]}})


def generate_stage(body):
    """A `generate` stage that writes one image per requested index and deletes the ones it did not ask
    for (as the real generate stage removes stale images), with `body(ctx)` run half-way."""

    def run(ctx, s: Settings) -> StageResult:
        n = int(s.value)
        outputs = {}
        for i in range(n):
            key = f"generate/images/{s.value}-{i}.png"
            outputs[key] = ctx.store.write_bytes(key, f"image {i} of run {s.value}".encode())
        body(ctx)
        for key in ctx.store.list("generate/images"):
            if key not in outputs:
                ctx.store.delete(key)
        return StageResult(outputs=outputs)

    return {"generate": Stage("generate", lambda cfg: Settings(value=str(cfg.generate.images_per_class)), (), run)}


def write_lock(store, holder: str, heartbeat: datetime, stage="lora", lease=300.0, boot_id=None):
    """A lock as another run left it (e.g. one killed with -9 on another machine: its heartbeat stops)."""
    store.write_text(layout.RUN_LOCK, json.dumps({
        "holder": holder, "run_id": "r1", "token": "theirs", "started_at": (heartbeat - timedelta(hours=1)).isoformat(),
        "heartbeat_at": heartbeat.isoformat(timespec="seconds"), "stage": stage, "lease_seconds": lease,
        "boot_id": boot_id}))


def test_second_acquire_fails_at_once_naming_the_holder(store_uri, tmp_path):
    store = run_store(config(store_uri, tmp_path))
    with runlock.acquire(store, "r1") as held:
        held.set_stage("lora")
        record = json.loads(store.read_text(layout.RUN_LOCK))
        assert {"holder", "run_id", "started_at", "heartbeat_at", "stage", "lease_seconds"} <= record.keys()
        assert record["stage"] == "lora" and record["run_id"] == "r1" and record["holder"] == runlock.holder_name()
        t0 = time.monotonic()
        with pytest.raises(UserError, match=LOCKED) as err:
            runlock.acquire(store, "r1")
        assert time.monotonic() - t0 < 2
        assert f"locked by {record['holder']} since {record['started_at']} (stage lora," in str(err.value)
        assert len(str(err.value).splitlines()) == 1
    assert not store.exists(layout.RUN_LOCK)  # released
    runlock.acquire(store, "r1").release()  # and free again


def test_two_concurrent_runs_exactly_one_works(store_uri, tmp_path):
    """Started together: one runs, the other fails at once with the lock line, and never writes."""
    barrier = threading.Barrier(2)
    loser_done = threading.Event()
    calls = []

    def body(ctx):
        calls.append(threading.current_thread().name)
        loser_done.wait(timeout=30)  # hold the lock until the other run has tried

    results: dict[str, object] = {}

    def attempt(value):
        cfg = config(store_uri, tmp_path, value)
        barrier.wait()
        try:
            results[value] = run_pipeline(cfg, stages=generate_stage(body))
        except UserError as exc:
            results[value] = exc
            loser_done.set()

    threads = [threading.Thread(target=attempt, args=(v,), name=v) for v in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    errors = [r for r in results.values() if isinstance(r, UserError)]
    assert len(errors) == 1 and len(calls) == 1, results
    assert "is locked by" in str(errors[0]) and "--steal-lock" in str(errors[0])
    winner = calls[0]
    store = run_store(config(store_uri, tmp_path))
    marker = read_marker(store, "generate")
    # the outcome (the marker pointing at images the other run deleted) cannot happen
    assert all(store.exists(k) for k in marker["outputs"])
    assert sorted(store.list("generate/images")) == sorted(marker["outputs"])
    assert len(marker["outputs"]) == {"a": 3, "b": 4}[winner]
    assert run_pipeline(config(store_uri, tmp_path, winner), stages=generate_stage(lambda ctx: None))[0].status == "skipped"
    assert not store.exists(layout.RUN_LOCK)


def test_a_run_with_other_settings_cannot_touch_a_running_one(store_uri, tmp_path):
    """The issue's scenario, step by step: run A is mid-stage; run B (other generate settings) fails
    before writing anything; A finishes with a marker whose every output exists."""
    inside, release = threading.Event(), threading.Event()
    outcome = {}

    def body(ctx):
        inside.set()
        release.wait(timeout=30)

    def run_a():
        outcome["a"] = run_pipeline(config(store_uri, tmp_path, "a"), stages=generate_stage(body))

    thread = threading.Thread(target=run_a)
    thread.start()
    assert inside.wait(timeout=30)
    store = run_store(config(store_uri, tmp_path))
    before = {k: store.sha256(k) for k in store.list()}
    with pytest.raises(UserError, match=LOCKED.replace(r"\(stage .+,", r"\(stage generate,")):
        run_pipeline(config(store_uri, tmp_path, "b"), stages=generate_stage(lambda ctx: None))
    assert {k: store.sha256(k) for k in store.list()} == before  # B wrote nothing, deleted nothing
    release.set()
    thread.join(timeout=30)
    assert [o.status for o in outcome["a"]] == ["ran"]
    marker = read_marker(store, "generate")
    assert len(marker["outputs"]) == 3 and all(store.exists(k) for k in marker["outputs"])


def test_stage_field_follows_the_runner_and_failure_releases(store_uri, tmp_path):
    seen = []

    def body(ctx):
        seen.append(json.loads(ctx.store.read_text(layout.RUN_LOCK))["stage"])
        raise RuntimeError("stage crashed")

    cfg = config(store_uri, tmp_path)
    with pytest.raises(RuntimeError, match="stage crashed"):
        run_pipeline(cfg, stages=generate_stage(body))
    assert seen == ["generate"]
    assert not run_store(cfg).exists(layout.RUN_LOCK)  # released in `finally`


def test_stale_lock_is_taken_over_with_a_warning(store_uri, tmp_path):
    cfg = config(store_uri, tmp_path)
    store = run_store(cfg)
    write_lock(store, "bob@node-7:4242", datetime.now(UTC) - timedelta(minutes=30))
    events = Warnings()
    assert [o.status for o in run_pipeline(cfg, stages=generate_stage(lambda ctx: None), events=events)] == ["ran"]
    assert len(events.warnings) == 1
    assert "taking over the stale run lock of bob@node-7:4242" in events.warnings[0]
    assert "lease 300.0 s" in events.warnings[0]
    assert not store.exists(layout.RUN_LOCK)


def test_live_lock_needs_steal_lock_which_says_what_it_stole(store_uri, tmp_path):
    cfg = config(store_uri, tmp_path)
    store = run_store(cfg)
    write_lock(store, "alice@gpu-3:99", datetime.now(UTC))
    with pytest.raises(UserError, match=r"locked by alice@gpu-3:99 since .+ \(stage lora, last heartbeat"):
        run_pipeline(cfg, stages=generate_stage(lambda ctx: None))
    assert not store.exists(layout.marker("generate"))
    events = Warnings()
    run_pipeline(cfg, stages=generate_stage(lambda ctx: None), events=events, steal_lock=True)
    assert events.warnings == [events.warnings[0]] and "stealing the run lock of alice@gpu-3:99" in events.warnings[0]
    assert "stage lora" in events.warnings[0]
    assert store.exists(layout.marker("generate")) and not store.exists(layout.RUN_LOCK)


def test_unreadable_lock_counts_as_stale(store_uri, tmp_path):
    cfg = config(store_uri, tmp_path)
    store = run_store(cfg)
    store.write_text(layout.RUN_LOCK, "{ not json")
    events = Warnings()
    run_pipeline(cfg, stages=generate_stage(lambda ctx: None), events=events)
    assert "stale run lock of unknown (unreadable" in events.warnings[0]


def test_heartbeat_renews_and_a_run_whose_lock_was_stolen_stops_unmarked(store_uri, tmp_path):
    store = run_store(config(store_uri, tmp_path))
    lock = runlock.acquire(store, "r1", lease_seconds=0.5)  # heartbeat every 0.05 s
    first = json.loads(store.read_text(layout.RUN_LOCK))["heartbeat_at"]
    deadline = time.monotonic() + 5
    while json.loads(store.read_text(layout.RUN_LOCK))["heartbeat_at"] == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(store.read_text(layout.RUN_LOCK))["heartbeat_at"] > first  # renewed while held
    lock.release()

    thief = {}

    def body(ctx):  # another run steals the lock while this stage works
        thief["lock"] = runlock.acquire(ctx.store, "r1", steal=True)

    cfg = config(store_uri, tmp_path)
    with pytest.raises(UserError, match=r"run 'r1' lost its lock to .+ while on stage generate; stopping without"):
        run_pipeline(cfg, stages=generate_stage(body))
    assert read_marker(store, "generate") is None  # the stage it was on is not marked done
    held = json.loads(store.read_text(layout.RUN_LOCK))
    assert held["token"] == thief["lock"].record["token"]  # and the thief's lock was left alone
    thief["lock"].release()
    assert not store.exists(layout.RUN_LOCK)


# Through the CLI: one line, exit 1; --steal-lock and --verify are accepted.

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "t2id.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "300"}, timeout=300)


def test_cli_locked_run_is_one_line_and_steal_lock_runs(tmp_path):
    src = write_phantom(tmp_path / "ph", subjects=2, frames_per_subject=2, size=48)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps({"run": {"id": "r1", "stages": ["data"]},
                                    "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
                                    "data": {"source": str(src)}}))
    store = run_store(validate_config(json.loads(cfg_path.read_text())))
    write_lock(store, "carol@laptop:7", datetime.now(UTC), stage="data")
    locked = _cli("run", str(cfg_path), cwd=tmp_path)
    assert locked.returncode == 1, locked.stderr
    lines = [line for line in locked.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: run 'r1' is locked by carol@laptop:7 since"), lines
    assert "rerun with --steal-lock" in lines[0] and "Traceback" not in locked.stderr
    stolen = _cli("run", str(cfg_path), "--steal-lock", "--verify", cwd=tmp_path)
    assert stolen.returncode == 0, stolen.stderr
    assert "stealing the run lock of carol@laptop:7" in stolen.stderr
    assert read_marker(store, "data") is not None and not store.exists(layout.RUN_LOCK)


def test_lock_of_a_process_gone_from_this_machine_is_taken_over(store_uri, tmp_path):
    """kill -9 of a run on this machine: its lock still looks fresh, but its process is gone, so the
    next run takes over at once; a lock whose process is alive (here: a sleeping child) is left alone."""
    cfg = config(store_uri, tmp_path)
    store = run_store(cfg)
    me = runlock.holder_name().rpartition(":")[0]  # user@host of this machine
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(store, f"{me}:{alive.pid}", datetime.now(UTC), boot_id=runlock.boot_id())
        with pytest.raises(UserError, match=LOCKED):
            run_pipeline(cfg, stages=generate_stage(lambda ctx: None))
        alive.kill()  # SIGKILL: no chance to release anything
        alive.wait()
        events = Warnings()
        assert [o.status for o in run_pipeline(cfg, stages=generate_stage(lambda ctx: None), events=events)] == ["ran"]
        assert len(events.warnings) == 1
        assert events.warnings[0].startswith(f"run 'r1': taking over the run lock of {me}:{alive.pid} since ")
        assert "(stage lora, last heartbeat " in events.warnings[0]
        assert events.warnings[0].endswith("): that process is no longer running on this machine")
    finally:
        alive.kill()
        alive.wait()
