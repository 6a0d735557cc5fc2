"""`t2id status`: stage states read from the store alone, for a finished run (local and S3), a failed stage,
and a run killed half way (a real `t2id run` in a subprocess, kill -9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from t2id import layout
from t2id.config import load_config
from t2id.errors import UserError
from t2id.runner import run_pipeline, run_store
from t2id.status import open_run, run_status

REPO = Path(__file__).resolve().parent.parent


def t2id(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2id.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COLUMNS": "160", **(env or {})}, timeout=120)


def write_config(tmp_path: Path, store_uri: str, stages: list[str], folds: int = 2, extra: str = "") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"run: {{id: st, stages: [{', '.join(stages)}]}}\n"
        f"store: {{uri: '{store_uri}', cache_dir: '{tmp_path / 'cache'}'}}\n"
        "data: {source: phantom, phantom: {subjects: 4, frames_per_subject: 6, size: 64}}\n"
        f"split: {{folds: {folds}}}\n"
        "cluster: {num_cpus: 2}\n" + extra)
    return path


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_finished_run(tmp_path, backend, request):
    if backend == "s3":
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/runs"
    else:
        uri = str(tmp_path / "store")
    cfg_path = write_config(tmp_path, uri, ["data", "split"])
    cfg = load_config(cfg_path)
    run_pipeline(cfg)
    root = run_store(cfg).root

    status = run_status(open_run(root))
    assert [(s.stage, s.state) for s in status.stages] == [("data", "done"), ("split", "done")]
    assert status.stages[0].detail.startswith("24 images, 4 subjects") and status.stages[0].seconds is not None
    assert status.lock_state is None and status.elapsed_seconds is not None

    # Through the CLI, by CONFIG and by run root: one JSON object, and the table.
    res = t2id("status", root, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["run_id"] == "st" and [s["state"] for s in data["stages"]] == ["done", "done"]
    shown = t2id("status", str(cfg_path))
    assert shown.returncode == 0 and "✓ done" in shown.stdout and "not running" in shown.stdout


def test_not_a_run_is_one_clear_line(tmp_path):
    res = t2id("status", str(tmp_path))
    assert res.returncode == 1 and "not a t2id run" in res.stderr and "Traceback" not in res.stderr
    res = t2id("status", str(tmp_path / "nope"))
    assert res.returncode == 1 and "no such config file or run folder" in res.stderr


def test_failed_stage_shows_its_error_and_pending_stages(tmp_path):
    cfg = load_config(write_config(tmp_path, str(tmp_path / "store"), ["data", "split", "lora"], folds=5))
    with pytest.raises(UserError):
        run_pipeline(cfg)  # 4 subjects cannot fill 5 folds
    status = run_status(open_run(run_store(cfg).root))
    states = {s.stage: s for s in status.stages}
    assert states["data"].state == "done"
    assert states["split"].state == "failed" and "fold" in states["split"].error
    assert states["lora"].state == "pending"


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_run_killed_half_way(tmp_path):
    """A real run, killed with SIGKILL while its lora stage runs: done / stale / pending, and a resume."""
    lora = ("lora: {base_model: tiny, rank: 4, alpha: 4, resolution: 64, epochs: 50, batch_size: 2, "
            "mixed_precision: 'no', num_workers: 1, validation_images: 0, folds: [0]}\n")
    cfg_path = write_config(tmp_path, str(tmp_path / "store"), ["data", "split", "lora", "generate"], extra=lora)
    run = tmp_path / "store" / "st"
    lock = run / layout.RUN_LOCK

    def lock_stage() -> str | None:
        try:
            return json.loads(lock.read_text()).get("stage")
        except (OSError, ValueError):
            return None

    proc = subprocess.Popen([sys.executable, "-m", "t2id.cli", "run", str(cfg_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: (run / layout.marker("split")).exists() and lock_stage() == "lora", 120,
                  "the lora stage started", proc)
        live = run_status(open_run(str(run)))
        assert live.lock_state == "live" and live.active
        assert [(s.stage, s.state) for s in live.stages] == [("data", "done"), ("split", "done"),
                                                             ("lora", "running"), ("generate", "pending")]
        assert live.stages[2].total == 1 and live.stages[2].unit == "folds"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        # Ray's processes that the killed driver started (same session): ours to end.
        for pid in _session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    res = t2id("status", str(cfg_path), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["lock_state"] == "dead"  # the holder was a process of this machine that no longer exists
    assert [(s["stage"], s["state"]) for s in data["stages"]] == [("data", "done"), ("split", "done"),
                                                                  ("lora", "stale"), ("generate", "pending")]
    shown = t2id("status", str(run))
    assert "no longer exists" in shown.stdout and "stale" in shown.stdout


def _session_pids(session_id: int) -> list[int]:
    """Processes of the session the killed run led (start_new_session=True): the Ray processes it started."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.info["pid"]) == session_id:
                found.append(p.info["pid"])
        except (ProcessLookupError, PermissionError):
            continue
    return found
