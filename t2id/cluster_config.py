"""Config section `cluster`: where Ray runs, and the KubeRay RayJob that runs it on Kubernetes.

`address` / `num_cpus` matter for `t2id run` and `t2id submit --address`; the rest shapes the
RayJob that `t2id k8s render` prints and `t2id submit --k8s` creates (t2id/deploy/manifests.py).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from t2id.configbase import Section

# Ray version baked into the images (docker/Dockerfile.*: ARG RAY_VERSION) and announced to
# KubeRay as spec.rayClusterSpec.rayVersion; tests check it equals the installed ray.
RAY_VERSION = "2.60.0"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        raise ValueError("use a Kubernetes quantity such as '4', '500m', '16Gi'")
    return value


class TolerationConfig(Section):
    key: str = Field(..., description="Taint key to tolerate (e.g. nvidia.com/gpu).")
    operator: str = Field("Exists", pattern="^(Exists|Equal)$", description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value (only with operator Equal).")
    effect: str = Field("NoSchedule", pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$",
                        description="Taint effect to tolerate.")


class PodShape(Section):
    """Resources and placement of one kind of Ray pod (requests = limits: Guaranteed QoS)."""

    cpu: str = Field("4", description="CPU request and limit of each pod (Kubernetes quantity).")
    memory: str = Field("16Gi", description="Memory request and limit of each pod (Kubernetes quantity).")
    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu limit of each pod; 0 = CPU pod.")
    shm: str = Field("4Gi", description="Size of the in-memory /dev/shm (Ray object store, torch loaders).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of the pods.")
    tolerations: list[TolerationConfig] = Field(default_factory=list, description="Tolerations of the pods.")

    @field_validator("cpu", "memory", "shm")
    @classmethod
    def _quantities(cls, value: str) -> str:
        return _quantity(value)


class WorkerGroupConfig(PodShape):
    min_replicas: int = Field(0, ge=0, description="Fewest workers the autoscaler keeps (0 = scale to zero).")
    max_replicas: int = Field(4, ge=0, description="Most workers the autoscaler starts; 0 leaves the group out.")
    replicas: int = Field(0, ge=0, description="Workers at start; the autoscaler moves it within min..max.")

    @model_validator(mode="after")
    def _replica_order(self) -> WorkerGroupConfig:
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"need min_replicas <= replicas <= max_replicas, got {self.min_replicas} <= "
                             f"{self.replicas} <= {self.max_replicas}; fix the worker group's replica counts")
        return self


class HeadConfig(PodShape):
    """The head runs no tasks (num-cpus 0, see deploy/manifests.py), so it is small and on-demand:
    a spot reclaim of the head would kill the whole job."""

    cpu: str = Field("2", description="CPU request and limit of the head pod.")
    memory: str = Field("8Gi", description="Memory request and limit of the head pod.")
    shm: str = Field("1Gi", description="Size of the head's in-memory /dev/shm.")
    node_selector: dict[str, str] = Field(default_factory=lambda: {"t2id.io/pool": "ray-head"},
                                          description="nodeSelector of the head: the on-demand node group.")


class GpuWorkerGroupConfig(WorkerGroupConfig):
    cpu: str = Field("7", description="CPU request and limit of each GPU worker.")
    memory: str = Field("28Gi", description="Memory request and limit of each GPU worker.")
    gpus: int = Field(1, ge=0, le=16, description="nvidia.com/gpu limit of each GPU worker.")
    shm: str = Field("8Gi", description="Size of each GPU worker's in-memory /dev/shm.")
    node_selector: dict[str, str] = Field(default_factory=lambda: {"t2id.io/pool": "gpu"},
                                          description="nodeSelector of the GPU workers: the GPU node group.")
    tolerations: list[TolerationConfig] = Field(
        default_factory=lambda: [TolerationConfig(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="Tolerations of the GPU workers (the GPU nodes are tainted nvidia.com/gpu).")


class CpuWorkerGroupConfig(WorkerGroupConfig):
    cpu: str = Field("4", description="CPU request and limit of each CPU worker.")
    memory: str = Field("16Gi", description="Memory request and limit of each CPU worker.")
    shm: str = Field("2Gi", description="Size of each CPU worker's in-memory /dev/shm.")
    node_selector: dict[str, str] = Field(default_factory=lambda: {"t2id.io/pool": "cpu"},
                                          description="nodeSelector of the CPU workers: the CPU node group.")


class ClusterConfig(Section):
    address: str | None = Field(
        None, description="Ray address to connect to; default RAY_ADDRESS, else start a local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: all of this machine's).")
    namespace: str = Field("t2id", description="Kubernetes namespace for RayJobs.")
    image: str = Field("t2id:gpu", description="Container image for Ray pods.")
    image_pull_policy: str = Field("IfNotPresent", pattern="^(Always|IfNotPresent|Never)$",
                                   description="imagePullPolicy of the Ray containers.")
    ray_version: str = Field(RAY_VERSION, description="Ray version inside the image (RayJob rayVersion).")
    service_account: str = Field("t2id-ray", description="ServiceAccount of the Ray pods; bind cloud "
                                 "credentials to it (EKS Pod Identity / IRSA), never put keys in the config.")
    job_name: str | None = Field(None, description="RayJob name; default t2id-<run.id> (plus -<stage>).")
    head: HeadConfig = Field(default_factory=HeadConfig, description="The Ray head pod (runs no tasks).")
    gpu_workers: GpuWorkerGroupConfig = Field(default_factory=GpuWorkerGroupConfig,
                                              description="GPU worker group (LoRA, generation, detector grid).")
    cpu_workers: CpuWorkerGroupConfig = Field(default_factory=CpuWorkerGroupConfig,
                                              description="CPU worker group (data, split, labelling, report).")
    autoscaling: bool = Field(True, description="enableInTreeAutoscaling: scale worker groups within min..max.")
    idle_timeout_seconds: int = Field(120, ge=0, description="Seconds an idle worker lives before scale-down.")
    shutdown_after_job_finishes: bool = Field(True, description="Delete the Ray cluster when the job ends.")
    ttl_seconds_after_finished: int = Field(600, ge=0, description="Seconds to keep the finished cluster "
                                            "(for log inspection) before deleting it.")
    active_deadline_seconds: int = Field(172800, ge=60, description="Fail the RayJob after this many seconds.")
    backoff_limit: int = Field(1, ge=0, le=10, description="Retries of a failed RayJob (each on a new cluster; "
                               "done stages are skipped, so a retry resumes).")
    submitter_backoff_limit: int = Field(2, ge=0, le=10, description="Retries of the submitter Job.")
    kueue_queue: str | None = Field(None, description="Kueue LocalQueue name; sets the kueue.x-k8s.io/"
                                    "queue-name label and creates the RayJob suspended for Kueue to admit.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables of the Ray "
                                "containers (no secrets: use pod identity).")
    config_mount: str = Field("/etc/t2id", description="Where the run's config ConfigMap is mounted in the pods.")

    @field_validator("namespace", "service_account")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError("must be a DNS-1123 label: lowercase letters, digits and '-', at most 63 chars")
        return value

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, value: str | None) -> str | None:
        # KubeRay derives the RayCluster (+5 chars) and head service (+9) names from it: keep room.
        if value is not None and not re.match(r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$", value):
            raise ValueError("must be lowercase letters, digits and '-', at most 40 chars")
        return value

    @field_validator("ray_version")
    @classmethod
    def _ray_version(cls, value: str) -> str:
        if not re.fullmatch(r"2\.\d+\.\d+", value):
            raise ValueError("must be a Ray 2.x release such as '2.60.0' (pyproject allows ray>=2.40,<3)")
        return value

    @field_validator("env")
    @classmethod
    def _no_credentials(cls, value: dict[str, str]) -> dict[str, str]:
        banned = [k for k in value if k.upper() in {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                    "AWS_SESSION_TOKEN"} or "TOKEN" in k.upper()]
        if banned:
            raise ValueError(f"credentials do not belong in the config ({banned}); bind a role to the "
                             "service account (EKS Pod Identity / IRSA) instead")
        return value

    @model_validator(mode="after")
    def _ttl_needs_shutdown(self) -> ClusterConfig:
        # KubeRay rejects ttlSecondsAfterFinished without shutdownAfterJobFinishes (operator validation).
        if self.ttl_seconds_after_finished and not self.shutdown_after_job_finishes:
            raise ValueError("cluster.ttl_seconds_after_finished needs cluster.shutdown_after_job_finishes: "
                             "true; set the TTL to 0 or enable shutdown")
        return self
