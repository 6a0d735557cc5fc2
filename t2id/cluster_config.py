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
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40}
# Ray's default object store is 30% of the memory the raylet sees (the pod's limit); it needs a
# /dev/shm at least that large, else it falls back to disk (ray/_private/ray_constants.py).
OBJECT_STORE_FRACTION = 0.3
# Token auth (KubeRay authOptions) needs Ray >= 2.52.
MIN_RAY_FOR_AUTH = (2, 52)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _quantity(value: str) -> str:
    if not _QUANTITY.match(value):
        raise ValueError("use a Kubernetes quantity such as '4', '500m', '16Gi'")
    return value


def quantity_bytes(value: str) -> float:
    """A Kubernetes quantity ('16Gi', '500M', '4') as a number (bytes for memory)."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", str(value))
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


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
    shm: str | None = Field(None, description="Size of the in-memory /dev/shm (Ray object store, torch loaders); "
                            "default: the pod's memory, as KubeRay sizes it. Ray's object store takes 30% of "
                            "memory, so a smaller value must still be >= 30% of `memory`.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of the pods.")
    tolerations: list[TolerationConfig] = Field(default_factory=list, description="Tolerations of the pods.")

    @field_validator("cpu", "memory", "shm")
    @classmethod
    def _quantities(cls, value: str | None) -> str | None:
        return None if value is None else _quantity(value)

    @model_validator(mode="after")
    def _shm_holds_the_object_store(self) -> PodShape:
        if self.shm is not None:
            store = OBJECT_STORE_FRACTION * quantity_bytes(self.memory)
            if quantity_bytes(self.shm) < store:
                raise ValueError(f"shm {self.shm} is smaller than Ray's object store (30% of memory {self.memory} "
                                 f"= {store / 2**30:.1f}Gi), so Ray would spill to disk; leave shm unset (= memory) "
                                 "or raise it")
        return self

    @property
    def shm_size(self) -> str:
        """The /dev/shm sizeLimit: shm, or the pod's memory (tmpfs pages count against the limit anyway)."""
        return self.shm or self.memory


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
    node_selector: dict[str, str] = Field(default_factory=lambda: {"t2id.io/pool": "ray-head"},
                                          description="nodeSelector of the head: the on-demand node group.")


class GpuWorkerGroupConfig(WorkerGroupConfig):
    cpu: str = Field("7", description="CPU request and limit of each GPU worker.")
    memory: str = Field("28Gi", description="Memory request and limit of each GPU worker.")
    gpus: int = Field(1, ge=0, le=16, description="nvidia.com/gpu limit of each GPU worker.")
    node_selector: dict[str, str] = Field(default_factory=lambda: {"t2id.io/pool": "gpu"},
                                          description="nodeSelector of the GPU workers: the GPU node group.")
    tolerations: list[TolerationConfig] = Field(
        default_factory=lambda: [TolerationConfig(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="Tolerations of the GPU workers (the GPU nodes are tainted nvidia.com/gpu).")


class CpuWorkerGroupConfig(WorkerGroupConfig):
    cpu: str = Field("4", description="CPU request and limit of each CPU worker.")
    memory: str = Field("16Gi", description="Memory request and limit of each CPU worker.")
    node_selector: dict[str, str] = Field(default_factory=lambda: {"t2id.io/pool": "cpu"},
                                          description="nodeSelector of the CPU workers: the CPU node group.")


class ClusterConfig(Section):
    address: str | None = Field(
        None, description="Ray address to connect to; default RAY_ADDRESS, else start a local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: all of this machine's).")
    namespace: str = Field("t2id", description="Kubernetes namespace for RayJobs.")
    image: str | None = Field(None, description="Container image of the GPU workers (docker/Dockerfile.gpu), and "
                              "of every Ray pod unless cpu_image is set, e.g. <terraform output ecr_repository_url>:"
                              "<tag> on EKS, t2id:cpu after `kind load`. Needed to render or submit a RayJob "
                              "(`--image` sets it on the command line).")
    cpu_image: str | None = Field(None, description="Container image of the head, the CPU workers and the job "
                                  "submitter (docker/Dockerfile.cpu: no triton or other CUDA-only packages torch "
                                  "never loads on a CPU). Default: image. Must hold the same Ray, Python and t2id "
                                  "as image (Ray refuses a node whose versions differ from the head's); "
                                  "`--cpu-image` sets it.")
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
    autoscaling: bool | None = Field(None, description="enableInTreeAutoscaling: scale worker groups within "
                                     "min..max. Default: on, off with kueue_queue (Kueue admits fixed-size "
                                     "clusters only). Off: every worker group runs max_replicas workers throughout.")
    ray_auth: bool = Field(True, description="Ray token auth (KubeRay authOptions mode token, Ray >= 2.52): "
                           "KubeRay puts a random token in a Secret named like the RayCluster and gives it to "
                           "every Ray container; the dashboard/job API and client port refuse requests without it.")
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

    @property
    def autoscale(self) -> bool:
        """enableInTreeAutoscaling as rendered: the explicit setting, else on unless Kueue queues the job."""
        return self.autoscaling if self.autoscaling is not None else not self.kueue_queue

    @model_validator(mode="after")
    def _kueue_rules(self) -> ClusterConfig:
        # Kueue's RayJob webhook rejects a queued RayJob with enableInTreeAutoscaling (without its
        # elastic-jobs feature gate): it reserves quota for a fixed-size cluster.
        if self.kueue_queue and self.autoscaling:
            raise ValueError("cluster.kueue_queue with cluster.autoscaling: true is rejected by Kueue's RayJob "
                             "webhook; remove `autoscaling` (Kueue jobs run max_replicas workers per group)")
        if self.kueue_queue and not self.shutdown_after_job_finishes:
            raise ValueError("cluster.kueue_queue needs cluster.shutdown_after_job_finishes: true (Kueue's RayJob "
                             "webhook rejects a queued RayJob that keeps its cluster)")
        if not self.autoscale and self.gpu_workers.max_replicas + self.cpu_workers.max_replicas == 0:
            raise ValueError("without autoscaling the worker groups run max_replicas workers; both are 0, so no "
                             "stage could run: set gpu_workers/cpu_workers.max_replicas")
        return self

    @model_validator(mode="after")
    def _auth_needs_ray_2_52(self) -> ClusterConfig:
        if self.ray_auth and tuple(int(x) for x in self.ray_version.split(".")[:2]) < MIN_RAY_FOR_AUTH:
            raise ValueError(f"cluster.ray_auth needs Ray >= 2.52 (ray_version is {self.ray_version}); use a newer "
                             "image or set ray_auth: false on a private network")
        return self

    @model_validator(mode="after")
    def _ttl_needs_shutdown(self) -> ClusterConfig:
        # KubeRay rejects ttlSecondsAfterFinished without shutdownAfterJobFinishes (operator validation).
        if self.ttl_seconds_after_finished and not self.shutdown_after_job_finishes:
            raise ValueError("cluster.ttl_seconds_after_finished needs cluster.shutdown_after_job_finishes: "
                             "true; set the TTL to 0 or enable shutdown")
        return self
