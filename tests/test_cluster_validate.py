"""`t2id k8s validate` without a t2id checkout (issue 16, item 13): CRDs from a file, from an
https/http URL, or from the cluster's own API server (a small HTTP server on 127.0.0.1 answers the
CustomResourceDefinition reads the kubernetes client makes)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import t2id.deploy.validate as validate_mod
from t2id.cli import app

REPO = Path(__file__).resolve().parents[1]
CRDS = validate_mod.default_crds_dir()
pytestmark = pytest.mark.skipif(CRDS is None, reason="KubeRay CRDs (shared/kuberay/crds) are not beside the repo")
RAYJOB_CRD = "ray.io_rayjobs.yaml"


@pytest.fixture(scope="module")
def crd_docs() -> dict[str, dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    docs = {}
    for name in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        doc = yaml.load((CRDS / name).read_text(), Loader=loader)  # noqa: S506 (safe loader)
        docs[doc["metadata"]["name"]] = doc
    return docs


@pytest.fixture(scope="module")
def server(crd_docs):
    """Serves /crds/<file> (a download URL) and the apiextensions API's CRD reads."""
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            if self.path.startswith("/crds/"):
                body, ctype, code = (CRDS / self.path.rsplit("/", 1)[-1]).read_bytes(), "application/yaml", 200
            elif self.path.startswith("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/"):
                name = self.path.rsplit("/", 1)[-1]
                doc = crd_docs.get(name)
                code = 200 if doc else 404
                body = json.dumps(doc or {"kind": "Status", "code": 404, "reason": "NotFound"}).encode()
                ctype = "application/json"
            else:
                body, ctype, code = b"not found", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def rendered(tmp_path) -> Path:
    config = tmp_path / "c.yaml"
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["store"]["uri"] = "s3://b/runs"
    raw["cluster"] = {"image": "registry.example/t2id:1"}
    config.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(app, ["k8s", "render", str(config), "--stage", "lora"])
    assert out.exit_code == 0, out.output
    path = tmp_path / "rendered.yaml"
    path.write_text(out.output)
    return path


def test_without_a_checkout_validate_says_where_to_get_crds(rendered, monkeypatch):
    monkeypatch.setattr(validate_mod, "default_crds_dir", lambda: None)  # as outside a t2id checkout
    result = CliRunner().invoke(app, ["k8s", "validate", str(rendered)])
    assert result.exit_code == 1
    message = str(result.exception)
    assert "--from-cluster" in message and "--crds FILE|DIR" in message and "ray.io_rayjobs.yaml" in message


def test_validate_against_a_crd_file_and_a_url(rendered, server):
    base, requests = server
    by_file = CliRunner().invoke(app, ["k8s", "validate", str(rendered), "--crds", str(CRDS / RAYJOB_CRD)])
    assert by_file.exit_code == 0 and "1 custom resource(s) checked" in by_file.output
    by_url = CliRunner().invoke(app, ["k8s", "validate", str(rendered), "--crds", f"{base}/crds/{RAYJOB_CRD}"])
    assert by_url.exit_code == 0, by_url.output
    assert f"/crds/{RAYJOB_CRD}" in requests
    broken = rendered.read_text().replace("maxReplicas:", "maxReplica:", 1)
    rendered.write_text(broken)
    bad = CliRunner().invoke(app, ["k8s", "validate", str(rendered), "--crds", f"{base}/crds/{RAYJOB_CRD}"])
    assert bad.exit_code == 1 and "'maxReplica' was unexpected" in bad.output
    missing = CliRunner().invoke(app, ["k8s", "validate", str(rendered), "--crds", f"{base}/crds/nothing.yaml"])
    assert missing.exit_code == 1 and "cannot download it" in str(missing.exception)


def test_validate_against_the_clusters_own_crds(rendered, server, tmp_path, monkeypatch):
    base, requests = server
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": base}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "nobody"}}],
        "users": [{"name": "nobody", "user": {}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    result = CliRunner().invoke(app, ["k8s", "validate", str(rendered), "--from-cluster"])
    assert result.exit_code == 0, result.output
    assert f"checked against the cluster at {base}" in result.output
    assert "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/rayjobs.ray.io" in requests
