"""KubeRay manifests from a config: a ConfigMap holding the run's config and a RayJob per job.

Pure functions from `T2IDConfig` to plain dicts (what `kubectl apply` and the kubernetes client
take). The shape follows KubeRay v1.7 `ray.io/v1` RayJob (shared/kuberay/crds):
  - head: `num-cpus: 0` so no task lands on it, on on-demand capacity (cluster.head.node_selector);
  - a GPU worker group (nvidia.com/gpu limits, toleration of the GPU taint) and a CPU group, both
    with explicit minReplicas/maxReplicas (the API server would default them, an offline
    validator does not) and in-tree autoscaling; with Kueue (which admits fixed-size clusters only)
    autoscaling is off and every group runs maxReplicas workers;
  - images: the GPU group runs cluster.image (docker/Dockerfile.gpu), the head, CPU group and
    submitter cluster.cpu_image (docker/Dockerfile.cpu), which defaults to cluster.image;
  - /dev/shm as large as Ray's object store needs (the pod's memory unless cluster.*.shm says less);
  - Ray token auth (authOptions mode token): the job API and client port refuse unauthenticated calls;
  - shutdownAfterJobFinishes + ttlSecondsAfterFinished, backoffLimit, activeDeadlineSeconds;
  - `suspend: true` plus the `kueue.x-k8s.io/queue-name` label when cluster.kueue_queue is set;
  - restricted pod security on every container KubeRay runs from our templates (head, workers,
    autoscaler sidecar, submitter): non-root, no privilege escalation, drop ALL, RuntimeDefault.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from t2id.cluster_config import ClusterConfig, PodShape, WorkerGroupConfig
from t2id.config import STAGES, T2IDConfig, dump_config
from t2id.errors import UserError

API_VERSION = "ray.io/v1"
CONFIG_FILE = "config.yaml"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PIPELINE = "pipeline"
RUN_AS = 10001  # the image's non-root user (docker/Dockerfile.*: USER 10001), above host uids
DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
GCS_PORT = 6379


def job_name(cfg: T2IDConfig, stage: str | None = None) -> str:
    """RayJob name: cluster.job_name or t2id-<run.id>, plus -<stage> for a stage job; <= 47 chars."""
    run = re.sub(r"[^a-z0-9-]+", "-", cfg.run.id.lower()).strip("-")
    base = cfg.cluster.job_name or (run if run.startswith("t2id") else f"t2id-{run}")
    name = f"{base}-{stage}" if stage else base
    # KubeRay appends 6 chars for the RayCluster and '-head-svc' for the service (<= 63).
    return name[:47].rstrip("-")


def config_map_name(cfg: T2IDConfig) -> str:
    return f"{job_name(cfg)[:40].rstrip('-')}-config"


def entrypoint(cfg: T2IDConfig, stage: str | None = None) -> str:
    """The Ray job's driver command; jobs/ is on PYTHONPATH in the image."""
    module = stage or PIPELINE
    return f"python -m jobs.{module} --config {cfg.cluster.config_mount}/{CONFIG_FILE}"


def _labels(cfg: T2IDConfig, stage: str | None) -> dict[str, str]:
    # Only t2id.io/* on pod templates: KubeRay owns app.kubernetes.io/* and ray.io/* on its pods.
    # t2id.io/app selects every pod of ours in k8s/namespace/networkpolicy.yaml.
    return {"t2id.io/app": "t2id", "t2id.io/run": cfg.run.id[:63].rstrip("-._"), "t2id.io/job": stage or PIPELINE}


# checkov skips, inline on the pod templates they concern (checkov reads checkov.io/skipN annotations).
_SKIP_PROBES = ("CKV_K8S_8=KubeRay injects its own liveness probe into Ray containers",
                "CKV_K8S_9=KubeRay injects its own readiness probe into Ray containers")
_SKIP_DIGEST = "CKV_K8S_43=Tags are immutable in the ECR repository of terraform/; pin a digest with kustomize images if wanted"
_SKIP_TOKEN = "CKV_K8S_38=The head's autoscaler sidecar patches the RayCluster through the API"
_SKIP_SUBMITTER = ("CKV_K8S_8=Run-to-completion submitter Job: nothing to probe",
                   "CKV_K8S_9=Run-to-completion submitter Job: nothing to probe")


def _checkov_skips(*reasons: str) -> dict[str, str]:
    return {f"checkov.io/skip{i}": reason for i, reason in enumerate(reasons, 1)}


def _object_labels(cfg: T2IDConfig, stage: str | None) -> dict[str, str]:
    return {"app.kubernetes.io/name": "t2id", "app.kubernetes.io/part-of": "t2id"} | _labels(cfg, stage)


def container_security_context() -> dict[str, Any]:
    """Restricted Pod Security Standard, container level."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,  # writes go to the emptyDir volumes below
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env(cfg: T2IDConfig) -> list[dict[str, str]]:
    env = {
        "T2ID_CONFIG": f"{cfg.cluster.config_mount}/{CONFIG_FILE}",
        "PYTHONPATH": "/app",
        # read-only root filesystem: every tool that writes settings or caches gets a writable place
        "HOME": "/home/t2id",
        "XDG_CACHE_HOME": "/home/t2id/.cache",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "YOLO_CONFIG_DIR": "/tmp/ultralytics",
        "HF_HUB_OFFLINE": "1",
        "RAY_DEDUP_LOGS": "0",
    }
    env.update(cfg.cluster.env)
    return [{"name": k, "value": v} for k, v in env.items()]


def _resources(shape: PodShape) -> dict[str, Any]:
    # requests == limits: Guaranteed QoS, so a busy neighbour cannot starve a training worker.
    quantities: dict[str, Any] = {"cpu": shape.cpu, "memory": shape.memory}
    limits = dict(quantities)
    if shape.gpus:
        limits["nvidia.com/gpu"] = shape.gpus
    requests = dict(quantities)
    if shape.gpus:
        requests["nvidia.com/gpu"] = shape.gpus
    return {"requests": requests, "limits": limits}


def image(cfg: T2IDConfig) -> str:
    """cluster.image (the GPU workers' image), which has no usable default: a cluster pulls from a
    registry only it knows."""
    if not cfg.cluster.image:
        raise UserError("cluster.image is not set: set it to the image your nodes pull, e.g. "
                        "<terraform output ecr_repository_url>:<tag> on EKS or t2id:cpu after `kind load "
                        "docker-image` (or pass --image)")
    return cfg.cluster.image


def cpu_image(cfg: T2IDConfig) -> str:
    """The head's, CPU workers' and submitter's image: cluster.cpu_image, else cluster.image. Nodes
    that never touch a GPU then pull the CPU image, 1.1 GB smaller (docker/Dockerfile.cpu)."""
    return cfg.cluster.cpu_image or image(cfg)


def _volumes(cfg: T2IDConfig, shape: PodShape) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes = [
        {"name": "t2id-config", "configMap": {"name": config_map_name(cfg)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        # KubeRay adds its own /dev/shm (sized to the memory limit) only when the template mounts
        # none; we mount ours so its size is explicit and validated (>= Ray's 30% object store).
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shape.shm_size}},
    ]
    mounts = [
        {"name": "t2id-config", "mountPath": cfg.cluster.config_mount, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/home/t2id/.cache"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes, mounts


def _pod_template(cfg: T2IDConfig, stage: str | None, shape: PodShape, container: str, pod_image: str,
                  ports: list[dict[str, Any]] | None, automount_token: bool) -> dict[str, Any]:
    volumes, mounts = _volumes(cfg, shape)
    main: dict[str, Any] = {
        "name": container,
        "image": pod_image,
        "imagePullPolicy": cfg.cluster.image_pull_policy,
        "env": _env(cfg),
        "resources": _resources(shape),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }
    if ports:
        main["ports"] = ports
    spec: dict[str, Any] = {
        "serviceAccountName": cfg.cluster.service_account,
        # Only the head needs a Kubernetes API token (its autoscaler sidecar scales the cluster);
        # pod identity / IRSA inject their own projected token regardless.
        "automountServiceAccountToken": automount_token,
        "securityContext": pod_security_context(),
        "containers": [main],
        "volumes": volumes,
    }
    if shape.node_selector:
        spec["nodeSelector"] = dict(shape.node_selector)
    if shape.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in shape.tolerations]
    labels = _labels(cfg, stage) | {"t2id.io/role": container}
    skips = (*_SKIP_PROBES, _SKIP_DIGEST) + ((_SKIP_TOKEN,) if automount_token else ())
    return {"metadata": {"labels": labels, "annotations": _checkov_skips(*skips)}, "spec": spec}


def _worker_group(cfg: T2IDConfig, stage: str | None, name: str, group: WorkerGroupConfig,
                  pod_image: str) -> dict[str, Any]:
    # Without the autoscaler nothing moves replicas: the group is fixed at max_replicas (what Kueue
    # reserves quota for); replicas 0 would leave a head that runs no tasks alone.
    fixed = not cfg.cluster.autoscale
    return {
        "groupName": name,
        "replicas": group.max_replicas if fixed else group.replicas,
        "minReplicas": group.max_replicas if fixed else group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {},
        "template": _pod_template(cfg, stage, group, "ray-worker", pod_image, None, automount_token=False),
    }


def _submitter_template(cfg: T2IDConfig, stage: str | None) -> dict[str, Any]:
    """The K8s Job pod running `ray job submit`; KubeRay fills in its command (no command here)."""
    return {
        "metadata": {"labels": _labels(cfg, stage) | {"t2id.io/role": "ray-job-submitter"},
                     "annotations": _checkov_skips(*_SKIP_SUBMITTER, _SKIP_DIGEST)},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": cfg.cluster.service_account,
            "automountServiceAccountToken": False,
            "securityContext": pod_security_context(),
            "containers": [{
                "name": "ray-job-submitter",
                "image": cpu_image(cfg),
                "imagePullPolicy": cfg.cluster.image_pull_policy,
                "env": [{"name": "HOME", "value": "/tmp"}],
                "resources": {"requests": {"cpu": "200m", "memory": "512Mi"},
                              "limits": {"cpu": "1", "memory": "1Gi"}},
                "securityContext": container_security_context(),
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def build_config_map(cfg: T2IDConfig) -> dict[str, Any]:
    """The effective config, mounted read-only at cluster.config_mount in every Ray pod."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name(cfg), "namespace": cfg.cluster.namespace,
                     "labels": _object_labels(cfg, None)},
        "data": {CONFIG_FILE: dump_config(cfg)},
    }


def check_deployable(cfg: T2IDConfig) -> None:
    """Refuse configs whose outputs would vanish with the pods."""
    uri = cfg.store.uri
    if "://" not in uri and not uri.startswith("/"):
        raise UserError(f"store.uri '{uri}' is a relative local path: on Kubernetes the run would be lost "
                        "with the pods; set store.uri to s3://bucket/prefix (or an absolute path on a "
                        "mounted volume)")


def build_rayjob(cfg: T2IDConfig, stage: str | None = None) -> dict[str, Any]:
    """One RayJob running the whole pipeline (stage=None) or one stage."""
    if stage is not None and stage not in STAGES:
        raise UserError(f"unknown stage '{stage}'; choose from {', '.join(STAGES)}")
    c: ClusterConfig = cfg.cluster
    head_ports = [{"containerPort": GCS_PORT, "name": "gcs-server"},
                  {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
                  {"containerPort": CLIENT_PORT, "name": "client"}]
    # GPU workers run the CUDA image; the head (no tasks), CPU workers and submitter the CPU image.
    groups = (("gpu", c.gpu_workers, image(cfg)), ("cpu", c.cpu_workers, cpu_image(cfg)))
    workers = [_worker_group(cfg, stage, name, group, pod_image)
               for name, group, pod_image in groups if group.max_replicas > 0]
    labels = _object_labels(cfg, stage)
    if c.kueue_queue:
        labels[KUEUE_LABEL] = c.kueue_queue
    cluster_spec: dict[str, Any] = {"rayVersion": c.ray_version}
    if c.ray_auth:
        # KubeRay generates the token Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN on every Ray
        # container (head, workers, submitter); the operator itself authenticates its status calls.
        cluster_spec["authOptions"] = {"mode": "token"}
    cluster_spec["enableInTreeAutoscaling"] = c.autoscale
    if c.autoscale:
        cluster_spec["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": c.idle_timeout_seconds,
            "imagePullPolicy": c.image_pull_policy,
            "resources": {"requests": {"cpu": "200m", "memory": "512Mi"},
                          "limits": {"cpu": "500m", "memory": "1Gi"}},
            "securityContext": container_security_context(),
        }
    cluster_spec["headGroupSpec"] = {
        "serviceType": "ClusterIP",  # never exposed: reach the dashboard by port-forward
        # num-cpus 0: the head schedules no tasks, so losing a worker never loses the GCS.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        # Only the autoscaler sidecar needs a Kubernetes API token.
        "template": _pod_template(cfg, stage, c.head, "ray-head", cpu_image(cfg), head_ports,
                                  automount_token=c.autoscale),
    }
    cluster_spec["workerGroupSpecs"] = workers
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(cfg, stage),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": c.shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": c.ttl_seconds_after_finished,
        "activeDeadlineSeconds": c.active_deadline_seconds,
        "backoffLimit": c.backoff_limit,
        # Kueue admits a queued RayJob by flipping suspend to false.
        "suspend": bool(c.kueue_queue),
        "submitterConfig": {"backoffLimit": c.submitter_backoff_limit},
        "submitterPodTemplate": _submitter_template(cfg, stage),
        "rayClusterSpec": cluster_spec,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": job_name(cfg, stage), "namespace": c.namespace, "labels": labels},
        "spec": spec,
    }


def render(cfg: T2IDConfig, stages: list[str] | None = None) -> list[dict[str, Any]]:
    """ConfigMap + RayJob for the pipeline (stages None/empty) or one RayJob per named stage."""
    check_deployable(cfg)
    jobs = [build_rayjob(cfg, s) for s in stages] if stages else [build_rayjob(cfg)]
    return [build_config_map(cfg), *jobs]


class _Dumper(yaml.SafeDumper):
    """Safe dumper that writes multi-line strings (the embedded config) as readable | blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def write_files(objects: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One YAML file per object: configmap.yaml, rayjob-<job>.yaml (what k8s/base holds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for obj in objects:
        stem = "configmap" if obj["kind"] == "ConfigMap" else f"rayjob-{obj['metadata']['labels']['t2id.io/job']}"
        path = out_dir / f"{stem}.yaml"
        path.write_text(to_yaml([obj]), encoding="utf-8")
        paths.append(path)
    return paths


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=120)
