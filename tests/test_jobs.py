"""The RayJob entrypoints (`python -m jobs.<stage>`): the run lock, preflight and one-line errors, as on a head pod."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from t2id import layout
from t2id.runlock import acquire
from t2id.store import open_store

REPO = Path(__file__).resolve().parents[1]


def job(stage: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"jobs.{stage}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)


def write_config(tmp: Path, store_uri: str) -> Path:
    config = {"run": {"id": "jobs", "stages": ["data", "split"]},
              "store": {"uri": store_uri, "cache_dir": str(tmp / "cache")},
              "data": {"source": "phantom", "phantom": {"subjects": 4, "frames_per_subject": 3, "size": 64}},
              "split": {"folds": 2}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_job_fails_at_once_on_a_live_lock_and_steals_it_when_asked(tmp_path):
    config = write_config(tmp_path, str(tmp_path / "store"))
    store = open_store(str(tmp_path / "store")).child("jobs")
    lock = acquire(store, "jobs")  # a live holder: this test process
    try:
        locked = job("split", "--config", str(config))
        assert locked.returncode == 1
        errors = [line for line in locked.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "is locked by" in errors[0] and "--steal-lock" in errors[0]
        assert "Traceback" not in locked.stderr and not store.exists(layout.marker("split"))
        stolen = job("pipeline", "--config", str(config), "--steal-lock")
        assert stolen.returncode == 0, stolen.stderr[-3000:]
        assert [json.loads(line)["stage"] for line in stolen.stdout.splitlines() if '"stage"' in line] == ["data", "split"]
        assert store.exists(layout.marker("split")) and not store.exists(layout.RUN_LOCK)  # released at the end
    finally:
        lock.release()  # after the steal it is no longer ours: release stops the heartbeat, deletes nothing


def test_a_job_on_a_store_it_cannot_write_fails_in_preflight_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path, str(blocker / "store"))
    failed = job("pipeline", "--config", str(config))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(blocker) in errors[0]
