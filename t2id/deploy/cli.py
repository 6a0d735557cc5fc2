"""`t2id submit` and `t2id k8s ...` commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from t2id.errors import UserError

k8s_app = typer.Typer(help="KubeRay manifests: render them from a config, validate them offline.",
                      no_args_is_help=True)


def submit(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    address: Annotated[str | None, typer.Option(help="Ray dashboard URL, e.g. http://127.0.0.1:8265 "
                                                "(default: cluster.address, then RAY_ADDRESS).")] = None,
    k8s: Annotated[bool, typer.Option("--k8s", help="Create a KubeRay RayJob through the Kubernetes API.")] = False,
    namespace: Annotated[str | None, typer.Option(help="Kubernetes namespace (default: cluster.namespace).")] = None,
    context: Annotated[str | None, typer.Option(help="kubeconfig context (default: the current one).")] = None,
    only: Annotated[str | None, typer.Option(help="Run just this stage.")] = None,
    force: Annotated[str | None, typer.Option(help="Redo this stage and every stage after it (Ray path).")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return after submitting.")] = False,
    upload_code: Annotated[bool, typer.Option("--upload-code", help="Ship this checkout's t2id package with the "
                                              "job (Ray path), for a cluster whose image has another version.")] = False,
    image: Annotated[str | None, typer.Option(help="Image of the Ray pods for --k8s (sets cluster.image; the GPU "
                                              "workers', and every pod's without --cpu-image), e.g. "
                                              "<ecr_repository_url>:<tag>-gpu.")] = None,
    cpu_image: Annotated[str | None, typer.Option(help="Image of the head, CPU workers and submitter for --k8s "
                                                  "(sets cluster.cpu_image), e.g. <ecr_repository_url>:<tag>-cpu."
                                                  )] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop following a RayJob after this many seconds.")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between RayJob status reads.", hidden=True)] = 5.0,
    logs: Annotated[bool, typer.Option("--logs", help="Stream the Ray job's raw log instead of its progress "
                                       "(Ray path).")] = False,
) -> None:
    """Run a config on a cluster: a Ray job (--address) or a KubeRay RayJob (--k8s); follows it to the end."""
    from t2id.config import load_config
    from t2id.deploy import submit as sub

    overrides: dict[str, object] = {}
    if namespace:
        overrides["cluster.namespace"] = namespace
    if image:
        overrides["cluster.image"] = image
    if cpu_image:
        overrides["cluster.cpu_image"] = cpu_image
    cfg = load_config(config, overrides=overrides or None)
    if k8s:
        if force:
            raise UserError("--force works with --address only; a RayJob runs the stages whose markers are "
                            "missing or stale (delete a stage's _SUCCESS.json to redo it)")
        sub.submit_k8s(cfg, stage=only, wait=not no_wait, context=context, echo=typer.echo,
                       poll_seconds=poll, timeout_seconds=timeout)
        return
    address = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("say where to submit: --address http://HEAD:8265 (Ray dashboard) or --k8s")
    outcome = sub.submit_ray(cfg, address, only=only, force=force, wait=not no_wait, upload_code=upload_code,
                             echo=typer.echo, logs=logs)
    typer.echo(f"job {outcome.job_id}: {outcome.status}")


@k8s_app.command("render")
def render(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    stage: Annotated[list[str] | None, typer.Option("--stage", help="A RayJob for this stage instead of the "
                                                    "pipeline (repeatable).")] = None,
    all_stages: Annotated[bool, typer.Option("--all-stages", help="One RayJob per stage in run.stages.")] = False,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Write one YAML file per object here "
                                                 "instead of printing.")] = None,
    image: Annotated[str | None, typer.Option(help="Image of the GPU workers, and of every pod without "
                                              "--cpu-image (sets cluster.image).")] = None,
    cpu_image: Annotated[str | None, typer.Option(help="Image of the head, CPU workers and submitter "
                                                  "(sets cluster.cpu_image).")] = None,
) -> None:
    """Print the ConfigMap and RayJob(s) for a config (YAML, ready for kubectl apply -f -)."""
    from t2id.config import load_config
    from t2id.deploy.manifests import render as render_objects
    from t2id.deploy.manifests import to_yaml, write_files

    overrides = {key: value for key, value in (("cluster.image", image), ("cluster.cpu_image", cpu_image)) if value}
    cfg = load_config(config, overrides=overrides or None)
    stages = list(cfg.run.stages) if all_stages else (stage or None)
    objects = render_objects(cfg, stages)
    if out_dir is None:
        typer.echo(to_yaml(objects), nl=False)
        return
    for path in write_files(objects, out_dir):
        typer.echo(f"wrote {path}")


@k8s_app.command("validate")
def validate(
    paths: Annotated[list[Path], typer.Argument(help="YAML files, folders of YAML, or kustomize folders.")],
    crds: Annotated[str | None, typer.Option(help="CRD YAML to validate against: a folder, a file or an https URL "
                                             "(e.g. KubeRay's ray-operator/config/crd/bases/ray.io_rayjobs.yaml "
                                             "at your operator's tag). Default: $T2ID_KUBERAY_CRDS, else the "
                                             "CRDs beside a t2id checkout.")] = None,
    from_cluster: Annotated[bool, typer.Option("--from-cluster", help="Validate against the RayJob/RayCluster "
                                               "CRDs installed in the cluster of your kubeconfig.")] = False,
    context: Annotated[str | None, typer.Option(help="kubeconfig context for --from-cluster.")] = None,
) -> None:
    """Validate RayJob/RayCluster objects against CRD schemas, KubeRay's and Kueue's rules, offline."""
    from t2id.deploy.validate import (cluster_crd_schemas, default_crds_dir, load_crd_schemas, load_manifests,
                                      validate_objects)

    if from_cluster and crds:
        raise UserError("pass either --crds or --from-cluster, not both")
    objects = load_manifests(paths)
    if from_cluster:
        from t2id.deploy.submit import k8s_api_client

        api_client = k8s_api_client(context)
        source = f"the cluster at {api_client.configuration.host}"
        schemas = cluster_crd_schemas(api_client)
    else:
        crds_source = crds or default_crds_dir()
        if crds_source is None:
            raise UserError("no KubeRay CRDs to validate against: pass --from-cluster (your cluster's own), "
                            "--crds FILE|DIR, or --crds https://raw.githubusercontent.com/ray-project/kuberay/"
                            "v1.7.0/ray-operator/config/crd/bases/ray.io_rayjobs.yaml")
        source = str(crds_source)
        schemas = load_crd_schemas(crds_source)
    report = validate_objects(objects, schemas)
    for line in report.errors:
        typer.echo(f"error: {line}", err=True)
    typer.echo(f"{len(report.checked)} custom resource(s) checked against {source}, "
               f"{len(report.errors)} error(s); not checked here (core kinds): {len(report.skipped)}")
    if not report.checked:
        raise UserError("no RayJob/RayCluster found in the given paths")
    if report.errors:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the deployment commands to the root app."""
    app.command("submit")(submit)
    app.add_typer(k8s_app, name="k8s")
