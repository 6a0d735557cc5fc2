"""The shipped cluster configs and docs/deploy.md against what the cluster allows (issue 16): paths
inside the bucket role's prefixes, evaluation weights on the bucket, pod shapes that fit the stages,
and a walk-through that starts nothing by accident."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from t2id.cluster_config import quantity_bytes
from t2id.config import load_config
from t2id.deploy.validate import load_manifests

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "t2id-cas.yaml"
CLUSTER_CONFIGS = [REPO / "k8s" / "config" / "config.yaml", REPO / "k8s" / "components" / "eks" / "config.yaml"]
DEPLOY = REPO / "docs" / "deploy.md"


def _terraform_default(name: str):
    text = (REPO / "terraform" / "variables.tf").read_text()
    block = re.search(rf'variable "{name}" {{(.*?)\n}}', text, re.S).group(1)
    return yaml.safe_load(re.search(r"default\s+=\s+(.*)", block).group(1))


def _s3_key(uri: str) -> str:
    assert uri.startswith("s3://"), uri
    return uri[len("s3://"):].split("/", 1)[1]


@pytest.mark.parametrize("path", [PAPER, *CLUSTER_CONFIGS], ids=lambda p: str(p.relative_to(REPO)))
def test_cluster_config_paths_are_inside_the_pod_roles_prefixes(path):
    """store.uri must be under run_prefix (read/write), inputs under read_prefixes (read-only):
    anything else is ACCESS_DENIED on the cluster; weights for Table I must be there too."""
    cfg = load_config(path)
    run_prefix, read_prefixes = _terraform_default("run_prefix"), _terraform_default("read_prefixes")
    assert _s3_key(cfg.store.uri).split("/")[0] == run_prefix
    for uri in (cfg.data.source, cfg.lora.base_model, cfg.evaluate.inception_weights, cfg.evaluate.clip_weights):
        assert uri, f"{path.name}: evaluation weights / inputs must be named (the cluster has no internet)"
        assert _s3_key(uri).split("/")[0] in read_prefixes, uri


def test_cluster_configs_are_the_paper_config():
    """k8s/config and the EKS component carry the paper's settings; only URIs, the grid's CPU split and
    the cluster section differ (they had drifted: grid on CPU, unbatched generation)."""
    paper = load_config(PAPER).model_dump(mode="json")
    for path in CLUSTER_CONFIGS:
        cfg = load_config(path).model_dump(mode="json")
        for section, keys in {"store": ["uri"], "data": ["source"], "lora": ["base_model"],
                              "evaluate": ["inception_weights", "clip_weights"],
                              "grid": ["cpus_per_trial", "workers"]}.items():
            for key in keys:
                cfg[section].pop(key), paper[section].pop(key, None)
        cfg.pop("cluster"), paper.pop("cluster", None)
        assert cfg == paper, path


@pytest.mark.parametrize("path", CLUSTER_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_stage_resources_fit_the_worker_pods(path):
    cfg = load_config(path)
    gpu_pod = cfg.cluster.gpu_workers
    cpus = quantity_bytes(gpu_pod.cpu)
    assert cfg.grid.gpus_per_trial > 0 and cfg.lora.use_gpu  # the GPU stages use the GPUs
    per_pod = round(1 / cfg.grid.gpus_per_trial)  # trials sharing one GPU pod
    assert per_pod * cfg.grid.cpus_per_trial <= cpus, "grid trials sharing a GPU do not fit the pod's CPUs"
    assert cfg.grid.workers < cfg.grid.cpus_per_trial
    assert cfg.lora.cpus_per_worker <= cpus and cfg.lora.num_workers <= gpu_pod.max_replicas * gpu_pod.gpus
    assert cfg.generate.batched_pipeline


def test_the_namespace_folder_starts_nothing():
    objects = load_manifests([REPO / "k8s" / "namespace"])
    assert {o["kind"] for o in objects} == {"Namespace", "ServiceAccount", "NetworkPolicy"}


def _commands(text: str) -> list[str]:
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]


def test_deploy_walkthrough_covers_the_gaps():
    text = DEPLOY.read_text()
    commands = _commands(text)
    # the once-only step must not start the pipeline (k8s/overlays/aws does)
    once = [c for c in commands if "once" in c.split("#", 1)[-1] and c.startswith("kubectl apply")]
    assert once and all("k8s/namespace" in c for c in once), once
    assert any(c.startswith("pip install") for c in commands)  # the t2id CLI on the workstation
    assert any("docker build" in c and "--platform linux/amd64" in c for c in commands)
    assert any(c.startswith("mkdir -p") for c in commands)
    assert any("t2id models cache" in c and "--upload" in c for c in commands)  # Table I weights
    assert any("k8s validate" in c and "--from-cluster" in c for c in commands)
    assert "subjects.csv" in text and "PATH" in text and "force_destroy_bucket=true" in text
    assert "authOptions" in text and "auth_token" in text  # how to reach the token-protected dashboard
    # the cost table: one row per stage that needs GPUs
    table = text[text.index("## What it costs"):]
    for stage in ("lora", "generate", "grid"):
        assert re.search(rf"^\| `?{stage}`? \|", table, re.M), stage
