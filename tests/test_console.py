"""The quiet console: one line per stage, output of everything else in per-stage logs in the run's store.

Real parts: the CLI in a subprocess (its own file descriptors, as a user's terminal would be), the real
data/split stages, and for the noisy case a real local Ray with a real tiny LoRA training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from t2id import layout
from t2id.events import first_line, summary_line

REPO = Path(__file__).resolve().parent.parent


def t2id(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2id.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COLUMNS": "120"}, timeout=timeout)


def write_config(tmp_path: Path, stages: list[str], store_uri: str | None = None, **sections: str) -> Path:
    body = {
        "run": f"{{id: quiet, stages: [{', '.join(stages)}]}}",
        "store": f"{{uri: '{store_uri or tmp_path / 'store'}', cache_dir: '{tmp_path / 'cache'}'}}",
        "data": "{source: phantom, phantom: {subjects: 4, frames_per_subject: 6, size: 64}}",
        "split": "{folds: 2}",
        "cluster": "{num_cpus: 2}",
        **sections,
    }
    path = tmp_path / "config.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in body.items()))
    return path


def console_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (res.stdout + res.stderr).splitlines() if line.strip()]


def test_summary_lines_say_what_each_stage_produced():
    generate = {"folds": {"0": {"classes": {"tracheal ring": {"planned": 300, "attempted": 310, "kept": 300},
                                            "vocal fold": {"planned": 300, "attempted": 290, "kept": 271}}}},
                "shortfall": 29, "generated": 600, "reused": 0}
    assert summary_line("generate", generate) == "600 images, 571 kept, 29 rejected, shortfall 29"
    lora = {"folds": {"0": {"images": 10, "steps": 20, "reused": False, "first_loss": 0.5, "last_loss": 0.25},
                      "1": {"images": 11, "steps": 20, "reused": True, "first_loss": 0.4, "last_loss": 0.2}}}
    assert summary_line("lora", lora) == "2 adapter(s), 40 steps, 1 reused, loss 0.5→0.25 (first fold)"
    grid = {"trials": 16, "reused": 2, "skipped": 0, "folds": [0, 1], "strategies": list("abcdefgh"), "seeds": [0]}
    assert summary_line("grid", grid) == "16 trials (2 folds x 8 strategies x 1 seed(s)), 2 reused"
    label = {"method": "inpaint", "folds": {"0": {"rows": 8, "usable": 7, "rejected": {"memorized": 1}},
                                            "1": {"rows": 8, "usable": 8, "rejected": {}}}}
    assert summary_line("label", label) == "inpaint: 16 images, 15 usable with boxes, 1 not (memorized 1)"
    # A summary of an unexpected shape still gives a line, from its scalars.
    assert summary_line("generate", {"generated": 3, "note": "x"}) == "generated 3, note x"
    assert first_line(RuntimeError("\n  boom happened\n  at line 2\n")) == "RuntimeError: boom happened"


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_quiet_run_prints_stage_lines_and_keeps_the_rest_in_stage_logs(tmp_path, backend, request):
    from t2id.store import open_store

    uri = f"s3://{request.getfixturevalue('s3_bucket')}/runs" if backend == "s3" else str(tmp_path / "store")
    res = t2id("run", str(write_config(tmp_path, ["data", "split"], store_uri=uri)))  # AWS_ENDPOINT_URL inherited
    assert res.returncode == 0, res.stderr
    lines = console_lines(res)
    assert "✓ data: 24 images, 4 subjects, 0 rejected" in "\n".join(lines)
    assert any(line.startswith("✓ split: 2 folds") for line in lines)
    assert len(lines) <= 40  # two stage tables (~25 lines) and a few stage lines
    # The stages' info lines went to their logs, uploaded into the run's store.
    run = open_store(f"{uri}/quiet")
    split_log = run.read_text(layout.stage_log("split"))
    assert "subjects in more than one fold" in split_log and "subjects in more than one fold" not in res.stderr
    assert "==== split: done" in split_log
    assert run.exists(layout.stage_log("data"))
    assert any(line.startswith("stage logs: ") and "<stage>/logs/<stage>.log" in line for line in lines)


def test_verbose_run_shows_everything_live(tmp_path):
    res = t2id("run", str(write_config(tmp_path, ["data", "split"])), "-v")
    assert res.returncode == 0, res.stderr
    assert "subjects in more than one fold" in res.stderr
    assert not (tmp_path / "store" / "quiet" / layout.stage_log("split")).exists()


def test_a_failing_stage_is_one_line_with_its_log_and_a_failure_record(tmp_path):
    cfg = write_config(tmp_path, ["data", "split"], split="{folds: 5}")  # 4 subjects cannot fill 5 folds
    res = t2id("run", str(cfg))
    assert res.returncode == 1
    run = tmp_path / "store" / "quiet"
    log_key = layout.stage_log("split")
    lines = console_lines(res)
    failed = [line for line in lines if line.startswith("✗ split: failed after")]
    assert len(failed) == 1 and str(run / log_key) in failed[0]
    assert len([line for line in lines if line.startswith("error:")]) == 1
    assert "Traceback" not in res.stderr
    assert "Traceback" in (run / log_key).read_text()  # the details are in the log
    record = json.loads((run / layout.failed("split")).read_text())
    assert record["error"] and record["at"]
    # Fixed and rerun: the stage is done and its failure record is gone.
    cfg.write_text(cfg.read_text().replace("split: {folds: 5}", "split: {folds: 2}"))
    assert t2id("run", str(cfg)).returncode == 0
    assert not (run / layout.failed("split")).exists() and (run / layout.marker("split")).exists()
    both = (run / log_key).read_text()  # the log keeps the failed attempt above the one that succeeded
    assert both.index("==== split: failed after") < both.index("==== split: done in")


def test_stage_logs_catch_output_below_python(tmp_path):
    """fd-level capture: a child process and a raw os.write land in the log, the console sees neither."""
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from pathlib import Path
        from t2id.console import StageLogs
        from t2id.store import open_store
        logs = StageLogs(open_store({str(tmp_path / 'run')!r}), Path({str(tmp_path / 'local')!r}))
        terminal = logs.open()
        logs.switch("lora")
        os.write(1, b"raw fd write\\n")
        subprocess.run(["echo", "from a child process"], check=True)
        print("python stderr", file=sys.stderr)
        print("to the terminal", file=terminal, flush=True)
        print(logs.upload("lora"), file=terminal, flush=True)
        logs.close()
        print("after close")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 0, res.stderr
    log = (tmp_path / "run" / layout.stage_log("lora")).read_text()
    for text in ("raw fd write", "from a child process", "python stderr"):
        assert text in log and text not in res.stdout + res.stderr
    assert "to the terminal" in res.stderr and "after close" in res.stdout


@pytest.mark.slow
def test_ray_and_training_output_go_to_the_lora_log(lora_cli_run):
    res = lora_cli_run.res  # `t2id run` of data, split and lora in a subprocess (tests/conftest.py)
    assert res.returncode == 0, res.stderr
    lines = console_lines(res)
    assert any(line.startswith("✓ lora: 1 adapter(s), 2 steps") for line in lines), lines
    assert len(lines) <= 45
    console = res.stdout + res.stderr
    for noise in ("Started a local Ray instance", "RayTrainWorker", "TrainController"):
        assert noise in lora_cli_run.lora_log and noise not in console
