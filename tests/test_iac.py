"""Offline checks of docker/, k8s/ and terraform/ with the linters of .venv-iac (`make lint-iac`).

`make test` runs `lint-iac` first (hadolint, checkov on terraform/ and k8s/, kubernetes-validate on
every kustomize build); these tests repeat the fast ones so a plain pytest run sees them, and add
what no linter knows: the pod templates inside each RayJob validate as core v1 PodTemplates, the
terraform matches the RayJob's node selectors / taints / service account, variables and outputs
are documented, and the files are laid out the way `terraform fmt` writes them (no terraform
binary is installable here: it is neither on PyPI nor in Debian).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from t2id.cluster_config import ClusterConfig
from t2id.deploy.validate import load_manifests

REPO = Path(__file__).resolve().parents[1]
IAC_BIN = REPO / ".venv-iac" / "bin"
K8S_VERSION = "1.33.0"
KUSTOMIZE_DIRS = ["namespace", "base", "stages", "overlays/local", "overlays/aws", "overlays/aws-stages",
                  "overlays/kueue"]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


@pytest.fixture(scope="module")
def iac_bin() -> Path:
    if not (IAC_BIN / "python").exists():
        pytest.skip("IaC linters not installed: run `make lint-iac` (creates .venv-iac)")
    return IAC_BIN


# ---------------------------------------------------------------- docker
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile, iac_bin):
    proc = subprocess.run([str(iac_bin / "hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multistage_nonroot_and_pinned(dockerfile):
    text = dockerfile.read_text()
    assert len(DOCKERFILES) == 2
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2  # build stage + slim runtime stage
    bases = re.findall(r"^ARG (?:PYTHON|CUDA)_IMAGE=(\S+)$", text, re.M)
    assert bases and all(re.search(r":\d+(\.\d+)+", b) and "latest" not in b for b in bases)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users[-1] == "10001:10001"  # matches runAsUser of the RayJob pods
    assert "PYTHONPATH=/app" in text and "COPY --chown=10001:10001 jobs /app/jobs" in text


def test_dockerignore_keeps_the_build_context_small():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("*")] == "*"  # everything excluded, then the few inputs re-included
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "requirements.lock", "requirements-cpu.lock", ".ci/cpu_lock.py",
                        "README.md", "t2id", "jobs", "configs", "docker/entrypoint.sh"}


# ---------------------------------------------------------------- kubernetes core kinds
def _pod_templates(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayJob's pod templates as core v1 PodTemplate objects (what kubernetes-validate knows)."""
    cluster = job["spec"]["rayClusterSpec"]
    named = [("head", cluster["headGroupSpec"]["template"]), ("submitter", job["spec"]["submitterPodTemplate"])]
    named += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    return [{"apiVersion": "v1", "kind": "PodTemplate",
             "metadata": {"name": f"{job['metadata']['name']}-{name}", "namespace": job["metadata"]["namespace"]},
             "template": template} for name, template in named]


@pytest.mark.parametrize("folder", KUSTOMIZE_DIRS)
def test_core_kinds_and_ray_pod_templates_validate(folder, iac_bin, tmp_path):
    objects = load_manifests([REPO / "k8s" / folder])
    core = [o for o in objects if "." not in o["apiVersion"].split("/")[0] or o["apiVersion"].startswith(
        "networking.k8s.io")]
    templates = [t for o in objects if o["kind"] == "RayJob" for t in _pod_templates(o)]
    path = tmp_path / "objects.yaml"
    path.write_text(yaml.safe_dump_all(core + templates))
    proc = subprocess.run([str(iac_bin / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = proc.stdout.count(" passed for resource ")
    assert passed == len(core) + len(templates)
    assert len(templates) >= 3 or folder == "namespace"


def test_checkov_passes_on_the_ray_pods(iac_bin, tmp_path):
    """checkov has no RayJob checks: run its Pod checks on the pods KubeRay will create from our
    templates (skips are justified inline as checkov.io/skipN annotations on the templates)."""
    for folder in ("overlays/aws", "overlays/local"):
        objects = load_manifests([REPO / "k8s" / folder])
        pods = [{"apiVersion": "v1", "kind": "Pod",
                 "metadata": {**t["template"]["metadata"], "name": t["metadata"]["name"], "namespace": "t2id"},
                 "spec": t["template"]["spec"]}
                for o in objects if o["kind"] == "RayJob" for t in _pod_templates(o)]
        policies = [o for o in objects if o["kind"] in ("NetworkPolicy", "Namespace")]
        (tmp_path / f"{folder.replace('/', '-')}.yaml").write_text(yaml.safe_dump_all(policies + pods))
    proc = subprocess.run([str(iac_bin / "checkov"), "-d", str(tmp_path), "--framework", "kubernetes", "--quiet",
                           "--compact", "--skip-download"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Failed checks: 0" in proc.stdout and re.search(r"Passed checks: [1-9]\d\d", proc.stdout)


# ---------------------------------------------------------------- terraform
@pytest.fixture(scope="module")
def tf(iac_bin) -> dict[str, Any]:
    """All of terraform/ parsed with python-hcl2 (checkov's parser), blocks merged by type."""
    script = ("import hcl2, json, pathlib, sys\n"
              "out = {p.name: hcl2.load(open(p)) for p in sorted(pathlib.Path(sys.argv[1]).glob('*.tf'))}\n"
              "print(json.dumps(out, default=str))\n")
    proc = subprocess.run([str(iac_bin / "python"), "-c", script, str(REPO / "terraform")],
                          capture_output=True, text=True, check=True)
    merged: dict[str, Any] = {}
    for blocks in json.loads(proc.stdout).values():
        for kind, items in blocks.items():
            for item in items:
                for name, body in item.items():
                    if kind in ("resource", "data"):
                        for label, inner in body.items():
                            merged.setdefault(kind, {})[f"{name}.{label}"] = inner
                    else:
                        merged.setdefault(kind, {})[name] = body
    return merged


def _one(value: Any) -> Any:
    """python-hcl2 wraps attribute values and blocks in lists."""
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def test_terraform_variables_and_outputs_are_documented(tf):
    assert len(tf["variable"]) >= 15 and len(tf["output"]) >= 5
    for name, body in tf["variable"].items():
        assert _one(body.get("description")), f"variable {name} has no description"
        assert _one(body.get("type")), f"variable {name} has no type"
    for name, body in tf["output"].items():
        assert _one(body.get("description")), f"output {name} has no description"
    assert {"bucket_name", "ecr_repository_url", "ray_pod_role_arn", "kubeconfig_command"} <= set(tf["output"])


def test_terraform_bucket_is_private_versioned_encrypted_and_expires_uploads(tf):
    r = tf["resource"]
    pab = r["aws_s3_bucket_public_access_block.store"]
    assert all(_one(pab[k]) is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                               "restrict_public_buckets"))
    assert _one(_one(r["aws_s3_bucket_versioning.store"]["versioning_configuration"])["status"]) == "Enabled"
    sse = _one(_one(r["aws_s3_bucket_server_side_encryption_configuration.store"]["rule"])[
        "apply_server_side_encryption_by_default"])
    assert _one(sse["sse_algorithm"]) == "aws:kms"
    rules = r["aws_s3_bucket_lifecycle_configuration.store"]["rule"]
    aborts = [_one(x["abort_incomplete_multipart_upload"]) for x in rules if "abort_incomplete_multipart_upload" in x]
    assert aborts and _one(aborts[0]["days_after_initiation"]) <= 7
    assert _one(r["aws_kms_key.store"]["enable_key_rotation"]) is True


def test_terraform_ray_role_is_limited_to_the_bucket_prefix_via_pod_identity(tf):
    assoc = tf["resource"]["aws_eks_pod_identity_association.ray"]
    assert (_one(assoc["namespace"]), _one(assoc["service_account"])) == ("${var.namespace}", "${var.service_account}")
    variables = tf["variable"]
    assert _one(variables["namespace"]["default"]) == ClusterConfig().namespace
    assert _one(variables["service_account"]["default"]) == ClusterConfig().service_account
    trust = json.dumps(tf["data"]["aws_iam_policy_document.ray_trust"])
    assert "pods.eks.amazonaws.com" in trust
    for statement in tf["data"]["aws_iam_policy_document.ray_store"]["statement"]:
        resources = json.dumps(statement["resources"])
        assert '"*"' not in resources
        if "s3:PutObject" in json.dumps(statement["actions"]):
            assert "${var.run_prefix}/*" in resources


def test_terraform_node_groups_match_the_rayjob(tf):
    eks = tf["module"]["eks"]
    groups = _one(eks["eks_managed_node_groups"])
    cfg = ClusterConfig()
    head, gpu, cpu = groups["ray-head"], groups["gpu"], groups["cpu"]
    assert _one(head["capacity_type"]) == "ON_DEMAND" and _one(head["min_size"]) >= 1
    assert _one(head["labels"]) == cfg.head.node_selector
    assert cfg.gpu_workers.node_selector.items() <= _one(gpu["labels"]).items()  # the pods' nodeSelector matches
    assert _one(cpu["labels"]) == cfg.cpu_workers.node_selector
    for group in (gpu, cpu):  # scale to zero, spot when var.gpu_spot
        assert _one(group["min_size"]) == 0 and _one(group["desired_size"]) == 0
        assert _one(group["capacity_type"]) == "${local.worker_capacity_type}"
    taint = _one(_one(gpu["taints"])["gpu"])
    toleration = cfg.gpu_workers.tolerations[0]
    assert (_one(taint["key"]), _one(taint["effect"])) == (toleration.key, "NO_SCHEDULE")
    assert _one(tf["locals"]["worker_capacity_type"]) == '${var.gpu_spot ? "SPOT" : "ON_DEMAND"}'
    assert "NVIDIA" in _one(gpu["ami_type"])


def test_terraform_installs_the_kuberay_operator_of_the_vendored_crds(tf):
    release = tf["resource"]["helm_release.kuberay_operator"]
    assert _one(release["chart"]) == "kuberay-operator"
    assert _one(release["namespace"]) == "kuberay-system"  # k8s/namespace/networkpolicy.yaml admits it
    assert _one(tf["variable"]["kuberay_version"]["default"]) == "1.7.0"  # shared/kuberay/README.md
    netpol = yaml.safe_load((REPO / "k8s" / "namespace" / "networkpolicy.yaml").read_text())
    assert netpol["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"][
        "kubernetes.io/metadata.name"] == "kuberay-system"


def _fmt_problems(path: Path) -> list[str]:
    """What `terraform fmt` would change that we can see without it: indentation by two spaces, no
    trailing blanks, and '=' aligned (one space after the longest key) in runs of one-line attributes."""
    problems, group = [], []

    def flush() -> None:
        if len(group) > 1:
            indent = len(group[0][1]) - len(group[0][1].lstrip())
            keys = [re.match(r"\s*(\S+)\s*=", line).group(1) for _, line in group]
            want = indent + max(map(len, keys)) + 1
            if any(line.index("=", indent) != want for _, line in group):
                problems.append(f"{path.name}:{group[0][0]}: '=' not aligned in {keys}")
        group.clear()

    for number, line in enumerate(path.read_text().splitlines(), 1):
        indent = len(line) - len(line.lstrip())
        if line != line.rstrip() or "\t" in line or indent % 2:
            problems.append(f"{path.name}:{number}: whitespace")
        match = re.match(r'^\s*("[^"]+"|[A-Za-z0-9_-]+)\s+=\s+\S', line)
        one_line = bool(match) and not re.search(r"[\[{(]\s*(#.*)?$", line)
        if not one_line or (group and indent != len(group[0][1]) - len(group[0][1].lstrip())):
            flush()
        if one_line:
            group.append((number, line))
    flush()
    return problems


def test_terraform_layout_is_fmt_clean():
    files = sorted((REPO / "terraform").glob("*.tf"))
    assert {f.name for f in files} >= {"versions.tf", "variables.tf", "outputs.tf", "main.tf", "s3.tf", "iam.tf",
                                       "helm.tf"}
    assert [p for f in files for p in _fmt_problems(f)] == []


# ---------------------------------------------------------------- issue 16: what AWS/Helm semantics need
def _encoded(value: Any) -> Any:
    """The literal argument of a yamlencode(...)/jsonencode(...) attribute as python-hcl2 prints it."""
    text = _one(value)
    match = re.fullmatch(r"\$\{(?:yamlencode|jsonencode)\((.*)\)\}", text, re.S)
    assert match, text
    return ast.literal_eval(match.group(1))


def _policy(tf: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """An aws_iam_policy_document's statements with the module's variables at their defaults."""
    defaults = {k: _one(v.get("default")) for k, v in tf["variable"].items()}
    bucket = "arn:aws:s3:::BUCKET"

    def resolve(text: str) -> str:
        text = text.replace("${aws_s3_bucket.store.arn}", bucket).replace("aws_s3_bucket.store.arn", bucket)
        return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(defaults[m.group(1)]), text)

    def flat(value: Any) -> list[Any]:
        return [y for x in value for y in flat(x)] if isinstance(value, list) else [value]

    out = []
    for st in tf["data"][f"aws_iam_policy_document.{name}"]["statement"]:
        resources = []
        for r in flat(st.get("resources", [])):
            if isinstance(r, str) and (m := re.fullmatch(r'\$\{\[for p in var\.(\w+) : "(.*)"\]\}', r)):
                resources += [resolve(m.group(2).replace("${p}", p)) for p in defaults[m.group(1)]]
            else:
                resources.append(resolve(r))
        conditions = [{"variable": _one(c["variable"]), "values": [resolve(v) for v in flat(c["values"])]}
                      for c in flat(st.get("condition", []))]
        out.append({"actions": flat(st["actions"]), "resources": resources, "condition": conditions})
    return out


def _allowed(statements: list[dict[str, Any]], action: str, resource: str, context: dict[str, str]) -> bool:
    """IAM evaluation for Allow statements (no Deny here): a condition on a key the request does not
    carry fails (StringLike without IfExists), which is what denies HeadBucket under an s3:prefix
    condition."""
    for st in statements:
        if action not in st["actions"] or not any(fnmatch.fnmatchcase(resource, r) for r in st["resources"]):
            continue
        ok = True
        for cond in st["condition"]:
            key = cond["variable"]
            if key not in context or not any(fnmatch.fnmatchcase(context[key], v) for v in cond["values"]):
                ok = False
        if ok:
            return True
    return False


def test_terraform_ray_role_allows_what_pyarrow_and_ray_send(tf):
    """Requests t2id's S3 paths make (pyarrow S3FileSystem under Ray Train/Tune and t2id's store),
    evaluated against the role's policy: moto enforces no IAM, so this is where ACCESS_DENIED shows."""
    st = _policy(tf, "ray_store")
    bucket = "arn:aws:s3:::BUCKET"
    # create_dir/get_file_info on s3://BUCKET/runs/...: HEAD /BUCKET is HeadBucket = s3:ListBucket, no prefix
    assert _allowed(st, "s3:ListBucket", bucket, {})
    assert _allowed(st, "s3:ListBucket", bucket, {"s3:prefix": "runs/t2id-cas/lora/"})
    assert _allowed(st, "s3:PutObject", f"{bucket}/runs/t2id-cas/lora/fold0/adapter.safetensors", {})
    assert _allowed(st, "s3:GetObject", f"{bucket}/datasets/neck-us/images/a.png", {})
    assert _allowed(st, "s3:GetObject", f"{bucket}/models/clip-vit-large-patch14/config.json", {})
    # and no more than that: inputs are read-only, nothing outside the prefixes
    assert not _allowed(st, "s3:PutObject", f"{bucket}/datasets/neck-us/images/a.png", {})
    assert not _allowed(st, "s3:GetObject", f"{bucket}/other/secret.txt", {})
    assert not _allowed(st, "s3:DeleteObject", f"{bucket}/models/x", {})


def test_terraform_nvidia_device_plugin_lands_on_the_gpu_nodes(tf):
    """The chart's default affinity wants NFD/GFD labels no node here has: ours must replace it with
    terms every GPU node satisfies (Helm replaces lists, so nodeSelectorTerms is exactly ours)."""
    values = _encoded(tf["resource"]["helm_release.nvidia_device_plugin"]["values"])
    terms = values["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    gpu = _one(tf["module"]["eks"]["eks_managed_node_groups"])["gpu"]
    labels = _one(gpu["labels"])

    def matches(term: dict[str, Any]) -> bool:
        return all((e["operator"] == "In" and labels.get(e["key"]) in e["values"])
                   or (e["operator"] == "Exists" and e["key"] in labels) for e in term["matchExpressions"])

    assert terms and all(matches(t) for t in terms)
    assert "feature.node.kubernetes.io" not in json.dumps(values)
    taint = _one(_one(gpu["taints"])["gpu"])
    assert any(t["key"] == _one(taint["key"]) and t["operator"] == "Exists" for t in values["tolerations"])


def test_terraform_enforces_network_policy_and_keeps_coredns_on_the_head_group(tf):
    addons = _one(tf["module"]["eks"]["addons"])
    assert _encoded(addons["vpc-cni"]["configuration_values"]) == {"enableNetworkPolicy": "true"}
    assert _encoded(addons["coredns"]["configuration_values"])["nodeSelector"] == {"t2id.io/pool": "ray-head"}


def test_terraform_node_disks_hold_the_image(tf):
    groups = _one(tf["module"]["eks"]["eks_managed_node_groups"])
    defaults = {k: _one(v.get("default")) for k, v in tf["variable"].items()}
    local_volume = _one(tf["locals"]["root_volume"])
    for name, group in groups.items():
        mapping = _one(group.get("block_device_mappings"))
        assert mapping is not None, f"node group {name} uses the 20 GiB default root volume"
        if mapping == "${local.root_volume}":
            mapping = local_volume
        size = _one(_one(mapping["xvda"])["ebs"])["volume_size"]
        size = defaults[re.fullmatch(r"\$\{var\.(\w+)\}", size).group(1)] if isinstance(size, str) else size
        assert size >= 100, f"node group {name}: {size} GiB root volume"


def test_terraform_cluster_autoscaler_matches_the_cluster_minor(tf):
    values = _encoded(tf["resource"]["helm_release.cluster_autoscaler"]["values"])
    tag = values["image"]["tag"]
    assert tag == "${local.cluster_autoscaler_tag}"
    tag = _one(tf["locals"]["cluster_autoscaler_tag"]).replace(
        "${var.kubernetes_version}", _one(tf["variable"]["kubernetes_version"]["default"]))
    assert re.fullmatch(r"v(\d+\.\d+)\.\d+", tag).group(1) == _one(tf["variable"]["kubernetes_version"]["default"])


def test_terraform_destroy_can_remove_the_bucket_and_registry(tf):
    assert _one(tf["resource"]["aws_s3_bucket.store"]["force_destroy"]) == "${var.force_destroy_bucket}"
    assert _one(tf["resource"]["aws_ecr_repository.t2id"]["force_delete"]) is True


def test_checkov_skip_reasons_name_only_what_exists():
    """A skip that points at a control must point at one terraform creates (no phantom CloudTrail)."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "terraform").glob("*.tf")))
    skips = re.findall(r"checkov:skip=\S+:(.*)", text)
    assert skips
    if 'resource "aws_cloudtrail"' not in text:
        assert not [s for s in skips if re.search(r"CloudTrail .*(is|are) the audit", s)], skips
