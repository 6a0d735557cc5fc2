"""`t2id submit`: a real local Ray head (Job Submission SDK), and the Kubernetes path against a
small HTTP server on 127.0.0.1 that answers the ConfigMap/RayJob create + RayJob status subset
of the Kubernetes API (no API server runs here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from t2id.cli import app
from t2id.config import load_config
from t2id.deploy.manifests import build_config_map, build_rayjob
from t2id.runner import stage_available

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    """Our Ray processes: every one carries our unique temp dir on its command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return [p for p in pids if p != os.getpid()]


@pytest.fixture
def ray_head(_ray_head, monkeypatch):
    """The head's dashboard URL; RAY_AUTH_TOKEN set for this test only (what `t2id submit` reads)."""
    address, token = _ray_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    return address


@pytest.fixture(scope="module")
def _ray_head():
    """`ray start --head --block` in its own session and temp dir; torn down by pid, never `ray stop`
    (which would stop every Ray of this machine, including other test runs')."""
    # Short (Ray's socket paths have a length limit) and outside /tmp, which other runs may clean.
    cache = Path.home() / ".cache"
    cache.mkdir(parents=True, exist_ok=True)
    temp_dir = tempfile.mkdtemp(prefix="t2r-", dir=cache)
    port, dash = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "AWS_ENDPOINT_URL")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # job drivers run `python` from our venv
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"  # the default of Ray >= 2.52; a token of our own, not ~/.ray's
    env["RAY_AUTH_TOKEN"] = token = uuid.uuid4().hex
    # This 2-core machine may be heavily loaded by other test runs: tolerate slow health checks
    # instead of letting the GCS declare the raylet dead mid-test.
    env.update(RAY_health_check_timeout_ms="30000", RAY_health_check_failure_threshold="20")
    # Every fixed default port (agent 52365, client 10001, ...) may be taken by another Ray on this
    # machine; a busy agent port leaves the head without a job agent, so pick free ones for all.
    ports = {flag: _free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "metrics-export-port", "runtime-env-agent-port",
                                             "ray-client-server-port", "node-manager-port",
                                             "object-manager-port")}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
           "--include-dashboard=true", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 90
        while True:
            try:
                JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"local Ray head did not come up (exit {proc.poll()}):\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}") from None
                time.sleep(0.5)
        yield address, token
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        for pid in _pids_using(temp_dir):  # anything that left the session (workers, agents)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _small_config(tmp_path: Path, run_id: str) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["run"] = {"id": run_id, "stages": ["data", "split"]}
    raw["store"] = {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")}
    raw["data"]["phantom"].update(subjects=4, frames_per_subject=2, size=64)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.skipif(not stage_available("data"), reason="the data stage is not in this checkout yet")
def test_submit_runs_a_job_on_a_local_ray_head(ray_head, tmp_path):
    config = _small_config(tmp_path, "submit-ok")
    result = CliRunner().invoke(app, ["submit", str(config), "--address", ray_head])
    assert result.exit_code == 0, result.output
    assert "submitted Ray job raysubmit_" in result.output
    # The job's progress, read from the run's store: one line per stage as it finishes, not the raw log.
    assert re.search(r"^✓ data: done", result.output, re.M) and '"stage": "data"' not in result.output
    assert result.output.rstrip().endswith("SUCCEEDED")
    raw = CliRunner().invoke(app, ["submit", str(config), "--address", ray_head, "--logs"])
    assert raw.exit_code == 0 and '"stage": "data", "status": "skipped"' in raw.output  # --logs: the raw log
    run = tmp_path / "store" / "submit-ok"
    assert (run / "config.yaml").is_file()
    marker = json.loads((run / "data" / "_SUCCESS.json").read_text())
    assert marker["stage"] == "data"
    if stage_available("split"):
        assert (run / "split" / "_SUCCESS.json").is_file()


def test_submit_no_wait_then_follow_reports_the_failure(ray_head, tmp_path):
    from t2id.deploy.submit import follow_ray_job, ray_job_client, submit_ray
    from t2id.errors import UserError

    cfg = load_config(_small_config(tmp_path, "submit-fail"))
    lines: list[str] = []
    # grid is not in run.stages: the job itself exits 1 with a user error, which must surface here
    outcome = submit_ray(cfg, ray_head, only="grid", wait=False, echo=lines.append)
    assert outcome.status in ("PENDING", "RUNNING", "FAILED")
    assert lines == [f"submitted Ray job {outcome.job_id} to {ray_head}",
                     f"follow it with: ray job logs --address {ray_head} --follow {outcome.job_id}"]
    with pytest.raises(UserError, match=rf"Ray job {outcome.job_id} failed: .*exit code 1") as failure:
        follow_ray_job(ray_job_client(ray_head), outcome.job_id, echo=lines.append)
    assert "error: --only 'grid': stage is not enabled in run.stages" in "\n".join(lines)  # the job's log
    assert failure.value is not None


def test_submit_follows_progress_and_shows_the_log_tail_of_a_failed_job(ray_head, tmp_path):
    from t2id.deploy.submit import submit_ray
    from t2id.errors import UserError

    cfg = load_config(_small_config(tmp_path, "submit-progress-fail"))
    lines: list[str] = []
    with pytest.raises(UserError, match=r"Ray job raysubmit_\w+ failed"):
        submit_ray(cfg, ray_head, only="grid", echo=lines.append, poll_seconds=0.5)
    # The job's own one-line error arrives in the log tail, under the progress lines.
    assert any(line.startswith("  | error: --only 'grid': stage is not enabled") for line in lines), lines


def test_submit_refuses_a_relative_store(tmp_path):
    result = CliRunner().invoke(app, ["submit", str(REPO / "configs" / "demo.yaml"), "--address",
                                      "http://127.0.0.1:9"])
    from t2id.errors import UserError

    assert result.exit_code == 1 and isinstance(result.exception, UserError)
    assert "store.uri './t2id-demo/store' is relative" in str(result.exception)


# ---------------------------------------------------------------- Kubernetes API (local fake)
class FakeKube(BaseHTTPRequestHandler):
    """The subset of the Kubernetes API that `t2id submit --k8s` uses."""

    requests: list[tuple[str, str, dict | None]] = []
    statuses: list[dict] = []
    existing: set[str] = set()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def do_POST(self):
        body = self._body()
        self.requests.append(("POST", self.path, body))
        name = body["metadata"]["name"]
        if name in self.existing:
            return self._reply(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                     "reason": "AlreadyExists", "code": 409,
                                     "message": f"{name} already exists"})
        self.existing.add(name)
        self._reply(201, body)

    def do_PUT(self):
        body = self._body()
        self.requests.append(("PUT", self.path, body))
        self._reply(200, body)

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        self._reply(200, {"apiVersion": "ray.io/v1", "kind": "RayJob",
                          "metadata": {"name": self.path.rsplit("/", 1)[-1]}, "status": status})


@pytest.fixture
def kube(tmp_path, monkeypatch):
    FakeKube.requests, FakeKube.statuses, FakeKube.existing = [], [], set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeKube)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "nobody"}}],
        "users": [{"name": "nobody", "user": {}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield FakeKube
    server.shutdown()
    server.server_close()


def _s3_config(tmp_path: Path, image: str | None = "registry.example/t2id:1") -> Path:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["store"]["uri"] = "s3://bucket/runs"
    if image:
        raw.setdefault("cluster", {})["image"] = image
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_submit_k8s_needs_an_image_and_takes_it_from_the_command_line(kube, tmp_path):
    """t2id:gpu exists on no EKS node: without cluster.image nothing is created, --image sets it
    (and --cpu-image the image of every pod but the GPU workers)."""
    config = _s3_config(tmp_path, image=None)
    refused = CliRunner().invoke(app, ["submit", str(config), "--k8s", "--no-wait"])
    assert refused.exit_code == 1 and "cluster.image is not set" in str(refused.exception)
    assert [m for m, _, _ in kube.requests if m == "POST"] == []
    kube.statuses = [{}]
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/t2id:0.2.0-gpu"
    ok = CliRunner().invoke(app, ["submit", str(config), "--k8s", "--no-wait", "--image", image])
    assert ok.exit_code == 0, ok.output
    job = next(body for method, path, body in kube.requests if method == "POST" and path.endswith("/rayjobs"))
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], job["spec"]["submitterPodTemplate"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    assert {c["image"] for t in templates for c in t["spec"]["containers"]} == {image}
    # --cpu-image: the head, CPU workers and submitter pull the CPU image, the GPU workers keep --image
    cpu_image = image.replace("-gpu", "-cpu")
    kube.existing.clear()  # as if the first RayJob's TTL had run out
    ok = CliRunner().invoke(app, ["submit", str(config), "--k8s", "--no-wait", "--image", image,
                                  "--cpu-image", cpu_image])
    assert ok.exit_code == 0, ok.output
    job = [body for method, path, body in kube.requests if method == "POST" and path.endswith("/rayjobs")][-1]
    cluster = job["spec"]["rayClusterSpec"]
    assert {g["groupName"]: g["template"]["spec"]["containers"][0]["image"] for g in cluster["workerGroupSpecs"]} == {
        "gpu": image, "cpu": cpu_image}
    for template in (cluster["headGroupSpec"]["template"], job["spec"]["submitterPodTemplate"]):
        assert template["spec"]["containers"][0]["image"] == cpu_image


def test_submit_k8s_creates_exactly_the_rendered_objects_and_follows_to_success(kube, tmp_path):
    config = _s3_config(tmp_path)
    kube.statuses = [{}, {"jobDeploymentStatus": "Initializing"},
                     {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "t2id-demo-x7k2p"},
                     {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "jobId": "t2id-demo-abc"}]
    result = CliRunner().invoke(app, ["submit", str(config), "--k8s", "--namespace", "ml", "--poll", "0.01"])
    assert result.exit_code == 0, result.output
    expected_cfg = load_config(config, overrides={"cluster.namespace": "ml"})
    posts = [(path, body) for method, path, body in kube.requests if method == "POST"]
    assert posts == [("/api/v1/namespaces/ml/configmaps", build_config_map(expected_cfg)),
                     ("/apis/ray.io/v1/namespaces/ml/rayjobs", build_rayjob(expected_cfg))]
    gets = [path for method, path, _ in kube.requests if method == "GET"]
    assert gets and set(gets) == {"/apis/ray.io/v1/namespaces/ml/rayjobs/t2id-demo"}
    assert "created RayJob ml/t2id-demo" in result.output
    assert "deployment=Running job=RUNNING" in result.output
    assert "kubectl -n ml port-forward svc/t2id-demo-x7k2p-head-svc 8265:8265" in result.output
    assert "deployment=Complete job=SUCCEEDED" in result.output


def test_submit_k8s_reports_the_failure_reason(kube, tmp_path):
    config = _s3_config(tmp_path)
    kube.statuses = [{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                     {"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING", "reason": "DeadlineExceeded",
                      "message": "The RayJob has passed the activeDeadlineSeconds."}]
    result = CliRunner().invoke(app, ["submit", str(config), "--k8s", "--only", "lora", "--poll", "0.01"])
    assert result.exit_code == 1
    from t2id.errors import UserError

    assert isinstance(result.exception, UserError)
    assert str(result.exception) == ("RayJob t2id/t2id-demo-lora failed (DeadlineExceeded): "
                                     "The RayJob has passed the activeDeadlineSeconds.")
    created = [body for method, path, body in kube.requests if method == "POST" and path.endswith("/rayjobs")]
    assert created[0]["spec"]["entrypoint"] == "python -m jobs.lora --config /etc/t2id/config.yaml"


def test_submit_k8s_updates_the_config_and_refuses_a_duplicate_job(kube, tmp_path):
    config = _s3_config(tmp_path)
    kube.existing = {"t2id-demo-config", "t2id-demo"}
    kube.statuses = [{}]
    result = CliRunner().invoke(app, ["submit", str(config), "--k8s", "--no-wait"])
    methods = [(m, p) for m, p, _ in kube.requests]
    assert ("PUT", "/api/v1/namespaces/t2id/configmaps/t2id-demo-config") in methods  # config replaced
    assert result.exit_code == 1
    assert "RayJob t2id/t2id-demo already exists" in str(result.exception)


def test_submit_k8s_follows_the_stages_from_the_run_store(kube, s3_server, s3_bucket, tmp_path):
    """Beside the RayJob's status, the pipeline's stages as the run's store shows them (what t2id status reads)."""
    from t2id.config import validate_config
    from t2id.runner import run_pipeline

    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["run"]["stages"] = ["data", "split"]
    raw["run"].pop("tracking", None)
    raw["store"] = {"uri": f"s3://{s3_bucket}/runs", "endpoint_url": s3_server, "cache_dir": str(tmp_path / "cache")}
    raw["data"]["phantom"] = {"subjects": 4, "frames_per_subject": 2, "size": 64}
    raw.setdefault("cluster", {})["image"] = "registry.example/t2id:1"
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_pipeline(validate_config(raw))  # what the job's driver would have written by now
    kube.statuses = [{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                     {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "jobId": "t2id-demo-abc"}]
    result = CliRunner().invoke(app, ["submit", str(path), "--k8s", "--poll", "0.01"])
    assert result.exit_code == 0, result.output
    assert re.search(r"^✓ data: done", result.output, re.M) and re.search(r"^✓ split: done", result.output, re.M)
    assert "stage progress unavailable" not in result.output
