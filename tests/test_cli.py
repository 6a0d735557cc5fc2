"""CLI contract: --help, exit codes (0 ok, 1 user error, 2 usage), one-line errors, --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def t2id(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2id.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, "COLUMNS": "200"}, timeout=120)


def test_help_lists_the_verbs():
    res = t2id("--help")
    assert res.returncode == 0
    for verb in ("run", "demo", "config", "data"):
        assert verb in res.stdout


@pytest.mark.parametrize("group", ["config", "data", "run", "demo"])
def test_subcommand_help(group):
    assert t2id(group, "--help").returncode == 0


def test_usage_errors_exit_2():
    assert t2id("no-such-verb").returncode == 2
    assert t2id("config", "show").returncode == 2  # missing argument
    assert t2id("run", "--bogus-option", "x.yaml").returncode == 2


def test_config_validate_ok_and_show(tmp_path):
    res = t2id("config", "validate", "configs/demo.yaml")
    assert res.returncode == 0 and "ok" in res.stdout
    shown = t2id("config", "show", "configs/demo.yaml")
    assert shown.returncode == 0 and "rank: 4" in shown.stdout and "max_attempts: 8" in shown.stdout


def test_user_error_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 0\n")
    res = t2id("config", "validate", str(bad))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {bad}: lora.rank: must be > 0, got 0"]


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 0\n")
    res = t2id("config", "validate", str(bad), "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr


def test_missing_config_file(tmp_path):
    res = t2id("run", str(tmp_path / "nope.yaml"))
    assert res.returncode == 1 and "config file not found" in res.stderr


def test_run_with_unknown_stage_is_a_user_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{id: x}}\nstore: {{uri: {tmp_path / 'store'}}}\n")
    res = t2id("run", str(cfg), "--only", "trian")
    assert res.returncode == 1 and "unknown stage" in res.stderr
