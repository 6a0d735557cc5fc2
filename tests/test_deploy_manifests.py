"""RayJob manifests: rendered and kustomize-built objects against the KubeRay v1.7 CRD schemas."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from t2id.cli import app
from t2id.cluster_config import RAY_VERSION
from t2id.config import STAGES, load_config, validate_config
from t2id.deploy.manifests import build_rayjob, render
from t2id.deploy.validate import default_crds_dir, load_crd_schemas, load_manifests, operator_rules, validate_objects
from t2id.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = default_crds_dir()
needs_crds = pytest.mark.skipif(CRDS is None, reason="KubeRay CRDs (shared/kuberay/crds) are not beside the repo")


@pytest.fixture(scope="module")
def schemas():
    if CRDS is None:
        pytest.skip("KubeRay CRDs (shared/kuberay/crds) are not beside the repo")
    return load_crd_schemas(CRDS)


@pytest.fixture
def cfg(tmp_path):
    return load_config(REPO / "configs" / "demo.yaml", overrides={"store.uri": "s3://bucket/runs",
                                                                  "cluster.image": "registry.example/t2id:1"})


def _containers(job):
    cluster = job["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"], job["spec"]["submitterPodTemplate"]]
    templates += [g["template"] for g in cluster["workerGroupSpecs"]]
    return templates


def _images_by_pod(job) -> dict[str, str]:
    """head / submitter / <worker group name> -> the image its container runs."""
    cluster = job["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"], "submitter": job["spec"]["submitterPodTemplate"]}
    pods |= {g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}
    return {name: t["spec"]["containers"][0]["image"] for name, t in pods.items()}


@needs_crds
def test_rendered_pipeline_and_stage_jobs_validate(cfg, schemas):
    objects = render(cfg, list(STAGES))
    report = validate_objects(objects, schemas)
    assert report.errors == []
    assert len(report.checked) == len(STAGES)
    assert report.skipped == ["ConfigMap/t2id-demo-config"]
    entrypoints = [o["spec"]["entrypoint"] for o in objects[1:]]
    assert entrypoints == [f"python -m jobs.{s} --config /etc/t2id/config.yaml" for s in STAGES]


def test_rayjob_shape(cfg):
    job = build_rayjob(cfg)
    spec = job["spec"]
    assert job["metadata"] == {"name": "t2id-demo", "namespace": "t2id", "labels": {
        "app.kubernetes.io/name": "t2id", "app.kubernetes.io/part-of": "t2id",
        "t2id.io/app": "t2id", "t2id.io/run": "demo", "t2id.io/job": "pipeline"}}
    assert spec["entrypoint"] == "python -m jobs.pipeline --config /etc/t2id/config.yaml"
    assert (spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"]) == (True, 600)
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["suspend"]) == (1, 172800, False)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION and cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["serviceType"] == "ClusterIP"
    assert head["template"]["spec"]["nodeSelector"] == {"t2id.io/pool": "ray-head"}
    gpu, cpu = cluster["workerGroupSpecs"]
    assert (gpu["groupName"], gpu["minReplicas"], gpu["maxReplicas"]) == ("gpu", 0, 4)
    gpu_pod = gpu["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"] == {"cpu": "7", "memory": "28Gi", "nvidia.com/gpu": 1}
    assert gpu_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert gpu_pod["nodeSelector"] == {"t2id.io/pool": "gpu"}
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    for template in _containers(job):
        pod = template["spec"]
        assert template["metadata"]["labels"]["t2id.io/app"] == "t2id"  # the NetworkPolicy's selector
        assert pod["serviceAccountName"] == "t2id-ray"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    # the config reaches every Ray pod through the ConfigMap, read-only
    head_pod = head["template"]["spec"]
    assert {"name": "t2id-config", "configMap": {"name": "t2id-demo-config"}} in head_pod["volumes"]
    assert {"name": "t2id-config", "mountPath": "/etc/t2id", "readOnly": True} in head_pod["containers"][0]["volumeMounts"]
    # only the head (autoscaler sidecar) mounts an API token
    assert head_pod["automountServiceAccountToken"] is True
    assert gpu_pod["automountServiceAccountToken"] is False
    assert cluster["autoscalerOptions"]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_config_map_carries_the_effective_config(cfg):
    cm = render(cfg)[0]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "t2id-demo-config"
    assert validate_config(yaml.safe_load(cm["data"]["config.yaml"])) == cfg


def test_kueue_queue_label_suspend_and_a_fixed_size_cluster(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides={
        "store.uri": "s3://b/r", "cluster.image": "t2id:cpu", "cluster.kueue_queue": "team-a",
        "cluster.gpu_workers.max_replicas": 0, "cluster.cpu_workers.max_replicas": 3})
    job = build_rayjob(cfg, "lora")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["name"] == "t2id-demo-lora"
    cluster = job["spec"]["rayClusterSpec"]
    # Kueue's webhook rejects a queued RayJob with in-tree autoscaling; without the autoscaler the
    # groups must start at their size, or the head (num-cpus 0) waits alone forever
    assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
    [group] = cluster["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("cpu", 3, 3, 3)
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert operator_rules(job) == []
    with pytest.raises(ConfigError, match=r"kueue_queue with cluster.autoscaling: true is rejected by Kueue"):
        validate_config({"cluster": {"kueue_queue": "q", "autoscaling": True}})
    with pytest.raises(ConfigError, match=r"both are 0, so no stage could run"):
        validate_config({"cluster": {"kueue_queue": "q", "gpu_workers": {"max_replicas": 0},
                                     "cpu_workers": {"max_replicas": 0}}})


def test_operator_rules_catch_kueue_shm_and_auth_mistakes(cfg):
    """What the shipped manifests got wrong before issue 16, each caught offline."""
    job = build_rayjob(cfg)
    assert operator_rules(job) == []
    queued = copy.deepcopy(job)
    queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "t2id"  # autoscaling still on
    assert any("enableInTreeAutoscaling must be false" in e for e in operator_rules(queued))
    queued["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = False  # but every group at replicas 0
    assert any("no worker replicas and no autoscaler" in e for e in operator_rules(queued))
    small = copy.deepcopy(job)
    gpu = small["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    gpu["volumes"][3]["emptyDir"]["sizeLimit"] = "8Gi"  # the old default next to 28Gi of memory
    assert any("/dev/shm sizeLimit 8Gi is smaller than Ray's object store (8.4Gi" in e for e in operator_rules(small))
    open_ray = copy.deepcopy(job)
    del open_ray["spec"]["rayClusterSpec"]["authOptions"]
    assert any("authOptions.mode: set it to token" in e for e in operator_rules(open_ray))
    with pytest.raises(ConfigError, match=r"cluster.gpu_workers: .*shm 8Gi is smaller than Ray's object store"):
        validate_config({"cluster": {"gpu_workers": {"shm": "8Gi", "memory": "28Gi"}}})


def test_rendering_needs_an_image(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides={"store.uri": "s3://b/r"})
    with pytest.raises(UserError, match=r"cluster.image is not set: .*ecr_repository_url"):
        render(cfg)
    with pytest.raises(UserError, match=r"cluster.image is not set"):  # the GPU workers still need one
        render(load_config(REPO / "configs" / "demo.yaml", overrides={"store.uri": "s3://b/r",
                                                                      "cluster.cpu_image": "r/t2id:1-cpu"}))


def test_gpu_workers_run_the_gpu_image_and_every_other_pod_the_cpu_image(cfg):
    """Issue 16 item 11: nodes that never touch a GPU pull the smaller CPU image; without
    cluster.cpu_image every pod runs cluster.image, as before."""
    assert _images_by_pod(build_rayjob(cfg)) == {
        "head": "registry.example/t2id:1", "submitter": "registry.example/t2id:1",
        "gpu": "registry.example/t2id:1", "cpu": "registry.example/t2id:1"}
    two = load_config(REPO / "configs" / "demo.yaml", overrides={
        "store.uri": "s3://bucket/runs", "cluster.image": "registry.example/t2id:1",
        "cluster.cpu_image": "registry.example/t2id:1-cpu"})
    for stage in (None, "lora", "report"):
        assert _images_by_pod(build_rayjob(two, stage)) == {
            "head": "registry.example/t2id:1-cpu", "submitter": "registry.example/t2id:1-cpu",
            "gpu": "registry.example/t2id:1", "cpu": "registry.example/t2id:1-cpu"}


@needs_crds
def test_validator_catches_schema_and_operator_errors(cfg, schemas):
    job = build_rayjob(cfg)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo
    bad["spec"]["backoffLimit"] = "two"
    bad["spec"]["shutdownAfterJobFinishes"] = False  # ttl without shutdown
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["minReplicas"]  # required offline
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContext"][
        "allowPrivilegeEscalation"] = True
    errors = "\n".join(validate_objects([bad], schemas).errors)
    assert "'maxReplica' was unexpected" in errors
    assert "spec.backoffLimit: 'two' is not of type 'integer'" in errors
    assert "'minReplicas' is a required property" in errors
    assert "ttlSecondsAfterFinished requires shutdownAfterJobFinishes" in errors
    assert "allowPrivilegeEscalation must be false" in errors
    wrong_version = copy.deepcopy(job) | {"apiVersion": "ray.io/v9"}
    assert "no schema for apiVersion ray.io/v9" in validate_objects([wrong_version], schemas).errors[0]


def test_cluster_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"cluster.cpu_workers: .*min_replicas <= replicas <= max_replicas"):
        validate_config({"cluster": {"cpu_workers": {"min_replicas": 3, "max_replicas": 2}}})
    with pytest.raises(ConfigError, match=r"cluster.env: .*Pod Identity"):
        validate_config({"cluster": {"env": {"AWS_SECRET_ACCESS_KEY": "x"}}})
    with pytest.raises(ConfigError, match=r"cluster.gpu_workers.memory: use a Kubernetes quantity"):
        validate_config({"cluster": {"gpu_workers": {"memory": "lots"}}})
    with pytest.raises(UserError, match="relative local path"):
        render(load_config(REPO / "configs" / "demo.yaml"))


def test_committed_base_and_stage_files_match_the_renderer():
    """k8s/base and k8s/stages are rendered from k8s/config/config.yaml; they must not drift."""
    cfg = load_config(K8S / "config" / "config.yaml")
    cm, pipeline = render(cfg)
    assert yaml.safe_load((K8S / "base" / "rayjob-pipeline.yaml").read_text()) == pipeline
    for folder in ("config", "components/eks"):
        kustomization = yaml.safe_load((K8S / folder / "kustomization.yaml").read_text())
        assert kustomization["configMapGenerator"][0]["name"] == cm["metadata"]["name"]  # what the pods mount
    # the EKS config is the paper config with the bucket filled in: they may differ in nothing else
    eks = load_config(K8S / "components" / "eks" / "config.yaml")
    assert eks == cfg
    for stage in STAGES:
        assert yaml.safe_load((K8S / "stages" / f"rayjob-{stage}.yaml").read_text()) == build_rayjob(cfg, stage)


@needs_crds
@pytest.mark.parametrize("folder,n_jobs", [("base", 1), ("stages", 8), ("overlays/local", 1),
                                           ("overlays/aws", 1), ("overlays/aws-stages", 8), ("overlays/kueue", 1)])
def test_kustomize_builds_validate(folder, n_jobs, schemas):
    objects = load_manifests([K8S / folder])  # real kustomize (kubectl kustomize)
    report = validate_objects(objects, schemas)  # CRD schema + KubeRay, Kueue, shm and auth rules
    assert report.errors == []
    jobs = [o for o in objects if o["kind"] == "RayJob"]
    assert len(jobs) == n_jobs
    # every namespaced object says its namespace: one without lands in `default`, away from the pods
    assert all(o["metadata"].get("namespace") == "t2id" for o in objects if o["kind"] != "Namespace")
    kinds = {o["kind"] for o in objects}
    for job in jobs:
        assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    images = {c["image"] for job in jobs for t in _containers(job) for c in t["spec"]["containers"]}
    if folder in ("overlays/aws", "overlays/aws-stages", "overlays/kueue"):
        # one ECR repository, two images: the GPU image on GPU workers only, the CPU image elsewhere
        ecr = r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/t2id:"
        for job in jobs:
            by_pod = _images_by_pod(job)
            assert re.fullmatch(ecr + r"[\w.]+-gpu", by_pod.pop("gpu")), job["metadata"]["name"]
            assert all(re.fullmatch(ecr + r"[\w.]+-cpu", i) for i in by_pod.values()), by_pod
        assert len(images) == 2
    elif folder in ("base", "stages"):
        assert {_images_by_pod(job)["gpu"] for job in jobs} == {"t2id-gpu"}
        assert images == {"t2id-gpu", "t2id-cpu"}  # the placeholders the overlays' `images` rewrite
    if folder.endswith("stages"):
        assert all(j["spec"]["suspend"] is True for j in jobs)  # applying the folder starts nothing
        assert "ConfigMap" in kinds  # the config the stage jobs mount comes with them
        return
    assert {"Namespace", "ServiceAccount", "NetworkPolicy", "ConfigMap"} <= kinds
    job = jobs[0]
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    config = load_config_text(next(o for o in objects if o["kind"] == "ConfigMap")["data"]["config.yaml"])
    if folder == "overlays/local":
        assert set(groups) == {"cpu"} and images == {"t2id:cpu"}
        assert "PersistentVolumeClaim" in kinds and config.store.uri == "/data/runs"
        assert config.data.source == "phantom"
    else:
        assert set(groups) == {"gpu", "cpu"} and config.store.uri.startswith("s3://")
    if folder in ("overlays/aws", "overlays/kueue"):
        head_selector = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["nodeSelector"]
        assert head_selector["eks.amazonaws.com/capacityType"] == "ON_DEMAND"
    if folder == "overlays/kueue":
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "t2id" and job["spec"]["suspend"] is True
        cluster = job["spec"]["rayClusterSpec"]
        assert cluster["enableInTreeAutoscaling"] is False
        assert all(g["replicas"] == g["minReplicas"] == g["maxReplicas"] > 0 for g in cluster["workerGroupSpecs"])
    if folder == "overlays/local":
        pvc = next(o for o in objects if o["kind"] == "PersistentVolumeClaim")
        claims = {v["persistentVolumeClaim"]["claimName"] for t in _containers(job)
                  for v in t["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]} and pvc["metadata"]["namespace"] == job["metadata"]["namespace"]
    netpol = next(o for o in objects if o["kind"] == "NetworkPolicy")
    assert netpol["spec"]["ingress"][0] == {"from": [{"podSelector": {}}]}  # namespace only
    namespace = next(o for o in objects if o["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def load_config_text(text: str):
    return validate_config(yaml.safe_load(text))


@needs_crds
def test_cli_render_and_validate(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text((REPO / "configs" / "demo.yaml").read_text().replace("./t2id-demo/store", "s3://b/runs"))
    runner = CliRunner()
    rendered = runner.invoke(app, ["k8s", "render", str(config), "--stage", "data", "--stage", "lora",
                                   "--image", "registry.example/t2id:1", "--cpu-image", "registry.example/t2id:1-cpu"])
    assert rendered.exit_code == 0, rendered.output
    docs = list(yaml.safe_load_all(rendered.output))
    assert [d["metadata"]["name"] for d in docs] == ["t2id-demo-config", "t2id-demo-data", "t2id-demo-lora"]
    cpu_image = "registry.example/t2id:1-cpu"
    assert _images_by_pod(docs[2]) == {"head": cpu_image, "submitter": cpu_image,
                                       "gpu": "registry.example/t2id:1", "cpu": cpu_image}
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered.output)
    ok = runner.invoke(app, ["k8s", "validate", str(out), "--crds", str(CRDS)])
    assert ok.exit_code == 0 and "2 custom resource(s) checked" in ok.output
    out.write_text(rendered.output.replace("maxReplicas:", "maxReplica:", 1))
    bad = runner.invoke(app, ["k8s", "validate", str(out)])
    assert bad.exit_code == 1 and "'maxReplica' was unexpected" in bad.output


def test_image_ray_version_matches_the_installed_ray():
    import ray

    assert RAY_VERSION == ray.__version__
    for dockerfile in ("Dockerfile.gpu", "Dockerfile.cpu"):
        text = (REPO / "docker" / dockerfile).read_text()
        assert f"ARG RAY_VERSION={ray.__version__}" in text, dockerfile
