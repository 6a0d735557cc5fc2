"""Run a config on a cluster: as a Ray job (Job Submission SDK) or as a KubeRay RayJob (Kubernetes API).

Ray path: the job's working_dir is a small staging folder holding the effective config and the
`jobs/` entrypoints (t2id itself comes from the cluster's image, or with `upload_code` from this
checkout as a py_module). Kubernetes path: create the run's ConfigMap and the RayJob, then poll
the RayJob's status until KubeRay reports Complete or Failed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2id.config import T2IDConfig, dump_config
from t2id.deploy.manifests import build_config_map, build_rayjob, check_deployable
from t2id.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
Echo = Callable[[str], None]
TERMINAL_RAY = {"SUCCEEDED", "FAILED", "STOPPED"}
# RayJob .status.jobDeploymentStatus values after which nothing more happens (KubeRay >= 1.1).
TERMINAL_DEPLOYMENT = {"Complete", "Failed"}


# ---------------------------------------------------------------- Ray Job Submission SDK
@dataclass
class JobOutcome:
    job_id: str
    status: str  # Ray JobStatus value, or RayJob jobDeploymentStatus on Kubernetes
    message: str = ""


def job_command(config_file: str, only: str | None = None, force: str | None = None) -> str:
    cmd = f"python -m jobs.pipeline --config {config_file}"
    if only:
        cmd += f" --only {only}"
    if force:
        cmd += f" --force {force}"
    return cmd


def stage_working_dir(cfg: T2IDConfig, dest: Path) -> Path:
    """The job's working_dir: config.yaml (effective config) + jobs/ (the entrypoints)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    jobs_src = REPO_ROOT / "jobs"
    if jobs_src.is_dir():  # in a checkout; in the image jobs/ is on PYTHONPATH already
        shutil.copytree(jobs_src, dest / "jobs", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        dirs_exist_ok=True)
    return dest


def _submit_when_ready(client: Any, wait_seconds: float = 60.0, **job: Any) -> str:
    """submit_job, retried while a just-started head has no job agent registered yet."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise UserError(f"the Ray cluster refused the job: {str(exc)[:300]}") from exc
            time.sleep(1.0)


def submit_ray(cfg: T2IDConfig, address: str, only: str | None = None, force: str | None = None,
               wait: bool = True, upload_code: bool = False, echo: Echo = print,
               poll_seconds: float = 1.0, logs: bool = False) -> JobOutcome:
    """Submit the pipeline (or one stage) to the Ray cluster at `address` (its dashboard URL) and follow it:
    its progress read from the run's store (default), or its raw log (`logs`)."""
    uri = cfg.store.uri
    if "://" not in uri and not Path(uri).is_absolute():
        raise UserError(f"store.uri '{uri}' is relative; a Ray job runs in its own working directory, so "
                        "set an absolute path the cluster can write or s3://bucket/prefix")
    client = ray_job_client(address)
    with tempfile.TemporaryDirectory(prefix="t2id-submit-") as tmp:
        runtime_env: dict[str, Any] = {"working_dir": str(stage_working_dir(cfg, Path(tmp)))}
        if upload_code:
            runtime_env["py_modules"] = [str(REPO_ROOT / "t2id")]
        job_id = _submit_when_ready(client, entrypoint=job_command("config.yaml", only, force),
                                    runtime_env=runtime_env,
                                    metadata={"t2id.run": cfg.run.id, "t2id.job": only or "pipeline"})
    echo(f"submitted Ray job {job_id} to {address}")
    if not wait:
        echo(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return JobOutcome(job_id, str(client.get_job_status(job_id).value))
    if logs:
        return follow_ray_job(client, job_id, echo=echo, poll_seconds=poll_seconds)
    from t2id.runner import run_store

    return follow_ray_progress(client, job_id, run_store(cfg), echo=echo, poll_seconds=poll_seconds)


def ray_job_client(address: str) -> Any:
    """A JobSubmissionClient for the dashboard at `address`."""
    from ray.job_submission import JobSubmissionClient

    # Ray >= 2.52 clusters use token auth by default: pass the cluster's token (RAY_AUTH_TOKEN) as a
    # bearer header; without it, the SDK's own lookup (~/.ray/auth_token with RAY_AUTH_MODE=token) applies.
    token = os.environ.get("RAY_AUTH_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # ConnectionError, or a RuntimeError naming the address
        raise UserError(f"--address {address}: cannot use the Ray job API there ({str(exc)[:300]}); start the "
                        "cluster or port-forward its dashboard (port 8265); a token-auth cluster needs "
                        "RAY_AUTH_TOKEN") from exc


def follow_ray_job(client: Any, job_id: str, echo: Echo = print, poll_seconds: float = 1.0) -> JobOutcome:
    """Stream the job's logs until it ends; raise UserError (with Ray's message) unless it succeeded."""

    async def _follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            echo(chunk.rstrip("\n"))

    asyncio.run(_follow())  # returns when the job ends and its log stream closes
    status = client.get_job_status(job_id)
    while status.value not in TERMINAL_RAY:  # the stream can close a moment before the status flips
        time.sleep(poll_seconds)
        status = client.get_job_status(job_id)
    info = client.get_job_info(job_id)
    outcome = JobOutcome(job_id, status.value, info.message or "")
    if status.value != "SUCCEEDED":
        raise UserError(f"Ray job {job_id} {status.value.lower()}: {outcome.message or 'see its logs above'}")
    return outcome


def stage_line(st: Any) -> str:
    """One line for a stage of t2id.status.run_status: its state, progress and what it produced or why it failed."""
    mark = {"done": "✓", "running": "▶", "failed": "✗", "stale": "?", "partial": "…"}.get(st.state, "·")
    parts = [f"{mark} {st.stage}: {st.state}"]
    if st.total and st.state != "done":
        parts.append(f"{st.done or 0}/{st.total} {st.unit}".rstrip())
    if st.detail:
        parts.append(st.detail)
    if st.error:
        parts.append(f"error: {st.error}")
    return ", ".join(parts)


class StageProgress:
    """Prints a job's progress from its run's store (what `t2id status` reads): a line whenever a stage
    changes state or moves. Best effort: a store this machine cannot read (yet) prints one note, then
    nothing, and the job is still followed through its own status."""

    def __init__(self, store: Any, echo: Echo) -> None:
        self.store, self.echo = store, echo
        self.shown: dict[str, str] = {}
        self.noted = False

    def __call__(self) -> None:
        from t2id.status import run_status

        if self.noted:  # the store could not be read: do not retry it on every poll
            return
        try:
            stages = run_status(self.store).stages
        except (UserError, OSError, ValueError):  # the job has not written the run's config yet
            return
        except Exception as exc:  # e.g. no credentials for the run's S3 store on this machine
            if not self.noted:
                self.echo(f"(stage progress unavailable: cannot read {self.store.root}: {str(exc)[:200]})")
                self.noted = True
            return
        for st in stages:
            line = stage_line(st)
            if st.state != "pending" and self.shown.get(st.stage) != line:
                self.echo(line)
                self.shown[st.stage] = line


def follow_ray_progress(client: Any, job_id: str, store: Any, echo: Echo = print, poll_seconds: float = 2.0,
                        tail_lines: int = 20) -> JobOutcome:
    """Follow the job through its run's store (StageProgress); when the job fails, its last log lines and
    Ray's message. The store must be reachable from here (S3, or a shared path), as `t2id submit` already
    requires of store.uri."""
    report = StageProgress(store, echo)
    status = client.get_job_status(job_id)
    while status.value not in TERMINAL_RAY:
        report()
        time.sleep(poll_seconds)
        status = client.get_job_status(job_id)
    report()
    info = client.get_job_info(job_id)
    outcome = JobOutcome(job_id, status.value, info.message or "")
    if status.value != "SUCCEEDED":
        lines = (client.get_job_logs(job_id) or "").rstrip("\n").splitlines()[-tail_lines:]
        for line in lines:
            echo(f"  | {line}")
        raise UserError(f"Ray job {job_id} {status.value.lower()}: {outcome.message or 'see its log above'} "
                        f"(whole log: ray job logs --address ... {job_id})")
    return outcome


# ---------------------------------------------------------------- Kubernetes (KubeRay RayJob)
def k8s_api_client(context: str | None = None) -> Any:
    """An ApiClient from the kubeconfig (KUBECONFIG / ~/.kube/config), else the in-cluster service account."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    try:
        # KUBECONFIG is read now, not at import time (the kubernetes package's default is frozen then).
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG", "~/.kube/config"), context=context,
                                client_configuration=configuration)
    except (ConfigException, FileNotFoundError) as kube_exc:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException as exc:
            raise UserError(f"no Kubernetes credentials: kubeconfig ({kube_exc}) and in-cluster ({exc}) both "
                            "failed; run `aws eks update-kubeconfig --name CLUSTER` or set KUBECONFIG") from exc
    return client.ApiClient(configuration)


def _api_error(exc: Any, what: str) -> UserError:
    body = getattr(exc, "body", "") or ""
    return UserError(f"{what}: Kubernetes API answered {exc.status} {exc.reason} {str(body)[:300]}".rstrip())


def create_objects(api_client: Any, cfg: T2IDConfig, stage: str | None = None) -> dict[str, Any]:
    """Create (or update) the config ConfigMap, then create the RayJob; returns the RayJob as sent."""
    import urllib3

    try:
        return _create_objects(api_client, cfg, stage)
    except urllib3.exceptions.HTTPError as exc:
        raise UserError(f"cannot reach the Kubernetes API at {api_client.configuration.host} ({exc}); "
                        "check KUBECONFIG / the current context") from exc


def _create_objects(api_client: Any, cfg: T2IDConfig, stage: str | None) -> dict[str, Any]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    check_deployable(cfg)
    ns = cfg.cluster.namespace
    cm, job = build_config_map(cfg), build_rayjob(cfg, stage)
    core = client.CoreV1Api(api_client)
    try:
        core.create_namespaced_config_map(ns, cm)
    except ApiException as exc:
        if exc.status != 409:
            raise _api_error(exc, f"creating ConfigMap {ns}/{cm['metadata']['name']}") from exc
        core.replace_namespaced_config_map(cm["metadata"]["name"], ns, cm)  # same run, newer config
    custom = client.CustomObjectsApi(api_client)
    try:
        custom.create_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", job)
    except ApiException as exc:
        if exc.status == 409:
            raise UserError(f"RayJob {ns}/{job['metadata']['name']} already exists; wait for its TTL, delete it "
                            f"(kubectl -n {ns} delete rayjob {job['metadata']['name']}) or set cluster.job_name")
        raise _api_error(exc, f"creating RayJob {ns}/{job['metadata']['name']}") from exc
    return job


def port_forward_hint(namespace: str, cluster_name: str | None) -> str:
    svc = f"{cluster_name}-head-svc" if cluster_name else "<status.rayClusterName>-head-svc"
    return f"dashboard: kubectl -n {namespace} port-forward svc/{svc} 8265:8265  (then http://127.0.0.1:8265)"


def follow_rayjob(api_client: Any, namespace: str, name: str, echo: Echo = print, poll_seconds: float = 5.0,
                  timeout_seconds: float | None = None, progress: Callable[[], None] | None = None) -> JobOutcome:
    """Poll the RayJob's status until KubeRay marks it Complete or Failed; print each change, and with
    `progress` (a StageProgress) the pipeline's stages as they move."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api_client)
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    last: tuple[str, str] | None = None
    hinted = False
    while True:
        try:
            obj = custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name)
        except ApiException as exc:
            raise _api_error(exc, f"reading RayJob {namespace}/{name}") from exc
        status = obj.get("status") or {}
        deployment, job_status = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
        if (deployment, job_status) != last:
            echo(f"RayJob {namespace}/{name}: deployment={deployment or '-'} job={job_status or '-'}")
            last = (deployment, job_status)
        if status.get("rayClusterName") and not hinted:
            echo(port_forward_hint(namespace, status["rayClusterName"]))
            hinted = True
        if progress is not None:
            progress()
        if deployment in TERMINAL_DEPLOYMENT:
            outcome = JobOutcome(status.get("jobId", name), deployment, status.get("message", ""))
            if deployment == "Failed" or job_status not in ("", "SUCCEEDED"):
                reason = status.get("reason") or job_status or "unknown reason"
                raise UserError(f"RayJob {namespace}/{name} failed ({reason}): "
                                f"{outcome.message or 'see kubectl -n ' + namespace + ' describe rayjob ' + name}")
            return outcome
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"RayJob {namespace}/{name} still {deployment or 'pending'} after {timeout_seconds:.0f}s; "
                            f"it keeps running: kubectl -n {namespace} get rayjob {name} -w")
        time.sleep(poll_seconds)


def submit_k8s(cfg: T2IDConfig, stage: str | None = None, wait: bool = True, context: str | None = None,
               echo: Echo = print, poll_seconds: float = 5.0, timeout_seconds: float | None = None,
               api_client: Any = None) -> JobOutcome:
    api_client = api_client or k8s_api_client(context)
    job = create_objects(api_client, cfg, stage)
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    echo(f"created RayJob {ns}/{name}" + (f" (queued in Kueue queue {cfg.cluster.kueue_queue})"
                                          if cfg.cluster.kueue_queue else ""))
    echo(port_forward_hint(ns, None))
    if not wait:
        echo(f"watch it with: kubectl -n {ns} get rayjob {name} -w")
        return JobOutcome(name, "Created")
    from t2id.runner import run_store

    return follow_rayjob(api_client, ns, name, echo=echo, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds,
                         progress=StageProgress(run_store(cfg), echo))
