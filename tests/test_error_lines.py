"""One clear line, exit 1, no traceback (issue 18, item 5): storage faults through the real CLI, and user errors
raised inside Ray tasks, actors, Ray Data, Ray Train workers and Tune trials, which are not retried either."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from t2id.errors import UserError, one_line
from t2id.store import TMP_PREFIX, open_store

ROOT = Path(__file__).resolve().parent.parent


def t2id(*args: str, env: dict[str, str] | None = None, prefix: list[str] | None = None,
         timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    """The real entry point in a fresh process; returns the result and its wall time in seconds."""
    start = time.perf_counter()
    res = subprocess.run([*(prefix or []), sys.executable, "-m", "t2id.cli", *args], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "COLUMNS": "300", **(env or {})}, timeout=timeout)
    return res, time.perf_counter() - start


def one_error_line(res: subprocess.CompletedProcess) -> str:
    """The process failed with exactly one `error:` line and no traceback; returns that line."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def write_config(path: Path, store: dict, **sections) -> Path:
    doc = {"run": {"id": "faults", "stages": ["data"]}, "store": store,
           "data": {"source": "phantom", "phantom": {"subjects": 2, "frames_per_subject": 2, "size": 64}}, **sections}
    path.write_text(yaml.safe_dump(doc))
    return path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def _unshare(*flags: str) -> list[str] | None:
    """`unshare` with these flags when this machine allows it (user namespaces), else None."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True)
    return ["unshare", *flags] if probe.returncode == 0 else None


# --- the store -----------------------------------------------------------------------------------

def test_missing_bucket_is_one_line_within_seconds(s3_server, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {"uri": "s3://no-such-bucket-t2id/runs", "endpoint_url": s3_server,
                                              "cache_dir": str(tmp_path / "cache")})
    res, seconds = t2id("run", str(cfg))
    line = one_error_line(res)
    assert "store.uri 's3://no-such-bucket-t2id/runs': bucket 'no-such-bucket-t2id' does not exist" in line
    assert seconds < 10


def test_unreachable_endpoint_is_one_line_within_seconds(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    cfg = write_config(tmp_path / "c.yaml", {"uri": "s3://bucket/runs", "endpoint_url": endpoint,
                                              "cache_dir": str(tmp_path / "cache")})
    res, seconds = t2id("run", str(cfg))
    line = one_error_line(res)
    assert f"cannot reach the S3 endpoint {endpoint}" in line and "store.endpoint_url" in line
    assert seconds < 10  # the store's own client retries store.max_attempts (8) times: ~20 s


def test_missing_credentials_is_one_line(s3_server, s3_bucket, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {"uri": f"s3://{s3_bucket}/runs", "endpoint_url": s3_server,
                                              "cache_dir": str(tmp_path / "cache")})
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "t2id.cli", "run", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    line = one_error_line(res)
    assert "no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line
    assert time.perf_counter() - start < 10


def test_store_path_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    cfg = write_config(tmp_path / "c.yaml", {"uri": str(tmp_path / "notes.txt" / "store"),
                                              "cache_dir": str(tmp_path / "cache")})
    line = one_error_line(t2id("run", str(cfg))[0])
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder; point store.uri at a folder" in line


def test_read_only_store_folder_is_one_line(tmp_path):
    store = tmp_path / "shared"
    store.mkdir()
    store.chmod(0o555)
    cfg = write_config(tmp_path / "c.yaml", {"uri": str(store / "runs"), "cache_dir": str(tmp_path / "cache")})
    prefix = None
    if os.geteuid() == 0:  # root writes anywhere: run as an unprivileged user that owns the folder
        prefix = _unshare("--user", "--map-user=1000", "--map-group=1000")
        if prefix is None:
            pytest.skip("running as root and `unshare --user` is not available here")
    line = one_error_line(t2id("run", str(cfg), prefix=prefix)[0])
    assert "store.uri" in line and "permission denied" in line


def test_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path):
    """A real full file system: a 128 KiB tmpfs mounted (in a user namespace, no root needed) as the store."""
    prefix = _unshare("--user", "--map-root-user", "--mount")
    if prefix is None:
        pytest.skip("`unshare --user --mount` (to mount a small tmpfs) is not available here")
    store = tmp_path / "small-disk"
    store.mkdir()
    cfg = write_config(tmp_path / "c.yaml", {"uri": str(store), "cache_dir": str(tmp_path / "cache")},
                       data={"source": "phantom", "phantom": {"subjects": 4, "frames_per_subject": 12, "size": 128}})
    script = (f"mount -t tmpfs -o size=128k tmpfs {store} || exit 99\n"
              f"{sys.executable} -m t2id.cli run {cfg} --only data; rc=$?\n"
              f"echo LEFT-BEHIND: $(find {store} -name '{TMP_PREFIX}*' | wc -l) >&2\n"
              "exit $rc\n")
    res = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "COLUMNS": "300"})
    if res.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {res.stderr.strip()}")
    line = one_error_line(res)
    assert "no space left on the device" in line and str(store) in line
    assert "LEFT-BEHIND: 0" in res.stderr


def test_corrupt_parquet_names_the_file(tmp_path):
    store = open_store(str(tmp_path / "store"))
    store.write_bytes("split/folds.parquet", b"PAR1 not really parquet")
    with pytest.raises(UserError, match=r"store/split/folds\.parquet: not a readable parquet file \(Parquet magic"):
        store.read_table("split/folds.parquet")
    # Through the CLI: the split stage reads a damaged manifest of a done data stage.
    cfg = write_config(tmp_path / "c.yaml", {"uri": str(tmp_path / "runs"), "cache_dir": str(tmp_path / "cache")},
                       run={"id": "faults", "stages": ["data", "split"]}, split={"folds": 2})
    res, _ = t2id("run", str(cfg), "--only", "data")
    assert res.returncode == 0, res.stderr
    manifest = tmp_path / "runs" / "faults" / "data" / "manifest.parquet"
    manifest.write_bytes(b"\0" * manifest.stat().st_size)  # same size: only its content is damaged
    line = one_error_line(t2id("run", str(cfg), "--only", "split")[0])
    assert "data/manifest.parquet" in line


def test_a_bug_keeps_its_traceback():
    assert one_line(KeyError("x")) is None
    assert one_line(OSError(2, "No such file or directory", "/x")) is None  # only faults the user fixes
    assert one_line(OSError(28, "No space left on device", "/store/x")).startswith("/store/x: no space left")


# --- user errors inside Ray ----------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _raise_user_error(*_args):
    raise UserError("lora.base_model 'x': not found")


class _FailingUdf:
    def __call__(self, batch):
        raise UserError("data.source: bad rows")


def test_user_errors_from_ray_tasks_actors_and_data_unwrap_to_their_line(ray_local):
    import ray
    import ray.data

    task = ray.remote(_raise_user_error)
    actor = ray.remote(type("Actor", (), {"go": lambda self: _raise_user_error()}))
    for run in (lambda: ray.get(task.remote()), lambda: ray.get(actor.remote().go.remote())):
        with pytest.raises(Exception) as caught:
            run()
        assert len(str(caught.value).splitlines()) > 3  # Ray's wrapper: a traceback as its message
        assert one_line(caught.value) == "lora.base_model 'x': not found"
    with pytest.raises(Exception) as caught:
        ray.data.from_items([{"x": 1}]).map_batches(_FailingUdf, concurrency=1).materialize()
    assert one_line(caught.value) == "data.source: bad rows"


def _train_loop(config):
    with open(config["attempts"], "a") as fh:
        fh.write("attempt\n")
    raise config["error"]


@pytest.mark.parametrize("error, attempts", [(UserError("lora.base_model 'x': not found"), 1),
                                             (RuntimeError("a bug, or a worker that died"), 2)])
def test_ray_train_does_not_retry_a_user_error(ray_local, tmp_path, error, attempts):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from t2id.lora.ray_layer import no_retry_of_user_errors

    counter = tmp_path / "attempts"
    trainer = TorchTrainer(_train_loop, train_loop_config={"attempts": str(counter), "error": error},
                           scaling_config=ScalingConfig(num_workers=1),
                           run_config=RunConfig(name="t", storage_path=str(tmp_path / "ray"),
                                                failure_config=FailureConfig(max_failures=1),
                                                callbacks=[no_retry_of_user_errors()]))
    with pytest.raises(Exception) as caught:
        trainer.fit()
    assert len(counter.read_text().splitlines()) == attempts  # a user error once; anything else retried
    assert one_line(caught.value) == (str(error) if isinstance(error, UserError) else None)


def _trial_fn(trial, settings, store, cache_dir):
    with open(Path(cache_dir) / f"{trial['name']}.attempts", "a") as fh:
        fh.write("attempt\n")
    raise UserError("grid.detector.model 'nosuch.yaml' is neither a local model yaml nor a built-in one")


def test_a_tune_trial_does_not_retry_a_user_error(ray_local, tmp_path):
    from t2id.config import validate_config
    from t2id.grid.ray_layer import raise_on_errors, run_trials
    from t2id.grid.settings import settings

    trial = {"name": "fold=0-baseline", "fold": 0, "strategy": "baseline", "seed": 0, "identity": {"v": 1}}
    cache = tmp_path / "cache"
    cache.mkdir()
    outcome = run_trials([trial], _trial_fn, open_store(str(tmp_path / "run")),
                         settings(validate_config({"grid": {"max_retries": 2}})), str(cache), verbose=0)
    assert len((cache / "fold=0-baseline.attempts").read_text().splitlines()) == 1  # not retried (max_retries 2)
    with pytest.raises(UserError) as caught:
        raise_on_errors(outcome, 2)
    assert str(caught.value).startswith("grid.detector.model 'nosuch.yaml' is neither a local model yaml")
    assert "\n" not in str(caught.value)
