"""Shared fixtures: a real S3 API server on loopback, a real local Ray, stores on both backends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

# Tests never touch real AWS: dummy credentials for the loopback server only, no hub downloads.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Ray Train's controller polls its workers at most every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a tiny run
# waits that long to be seen started and again to be seen finished. A missed poll is not a failure (Ray Train
# marks a worker dead only after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min), so tests poll faster.
# Set before any Ray starts, so the raylet and every actor inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's ThreadedMotoServer on 127.0.0.1; yields its endpoint URL (also set as AWS_ENDPOINT_URL)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # Ray workers started after this inherit it
    yield endpoint
    if previous is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = previous
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the test server; yields its name."""
    import boto3

    name = f"t2id-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """The same test runs against a local folder and against the S3 test server."""
    from t2id.store import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/prefix", endpoint_url=request.getfixturevalue("s3_server"))


def _cpus_all_free(ray, wait_s: float = 5.0) -> bool:
    """True once every CPU of the local Ray is free again (actors and placement groups release theirs
    asynchronously); False if some stay held for `wait_s`, e.g. by an actor a test left behind."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def ray_local(s3_server) -> Iterator[None]:
    """A real local Ray with 2 CPUs, shared by consecutive test modules: starting one (and its first
    worker processes) costs seconds per module. It is shut down after a module that leaves CPUs held, so
    the next module starts on a clean one, and at the end of the session. The S3 test server starts
    first, so Ray's processes inherit AWS_ENDPOINT_URL."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if ray.is_initialized() and not _cpus_all_free(ray):
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_exit() -> Iterator[None]:
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Tiny models are latency-bound: more torch threads than free cores only adds contention."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def lora_cli_run(tmp_path_factory) -> SimpleNamespace:
    """One `t2id run` of data, split and lora (tiny SDXL, 1 Ray Train worker, 1 epoch, fold 0) in a
    subprocess, as on a user's terminal. Shared because a LoRA run costs ~30 s: tests/test_console.py
    checks its console and stage log, tests/test_verify_outputs.py reruns and damages its store.
    Yields the config path, the finished process, the lora stage log as written then, and the store."""
    from t2id import layout

    root = tmp_path_factory.mktemp("lora-cli")
    config = root / "config.yaml"
    config.write_text(
        "run: {id: quiet, seed: 0, stages: [data, split, lora]}\n"
        f"store: {{uri: '{root / 'store'}', cache_dir: '{root / 'cache'}'}}\n"
        "data: {source: phantom, phantom: {subjects: 4, frames_per_subject: 6, size: 64}}\n"
        "split: {folds: 2}\n"
        "cluster: {num_cpus: 2}\n"
        "lora: {base_model: tiny, rank: 4, alpha: 4, resolution: 64, epochs: 1, batch_size: 2, "
        "mixed_precision: 'no', num_workers: 1, checkpoint_every_steps: 100, validation_images: 0, folds: [0]}\n")
    res = subprocess.run([sys.executable, "-m", "t2id.cli", "run", str(config)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "COLUMNS": "120"}, timeout=600)
    log = root / "store" / "quiet" / layout.stage_log("lora")
    return SimpleNamespace(config=config, res=res, lora_log=log.read_text() if log.exists() else "",
                           store=root / "store" / "quiet")
