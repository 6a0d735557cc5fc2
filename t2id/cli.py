"""The `t2id` command line. Thin: parse, load the config, call the stage code.

Exit codes: 0 ok, 1 user error (bad config, bad data, missing file: one line, no traceback
unless --debug), 2 usage error (unknown command or option).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from t2id import layout
from t2id.data.cli import app as data_app
from t2id.deploy.cli import register as register_deploy
from t2id.errors import UserError, one_line
from t2id.evaluate.cli import app as models_app

app = typer.Typer(help="T2ID-CAS as resumable Ray batch jobs.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
config_app = typer.Typer(help="Validate and show config files.", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """T2ID-CAS: rare-class synthesis with SDXL-LoRA + class-aware sampling, as Ray jobs.

    Add --debug anywhere on the command line to see the traceback of an error.
    """


@config_app.command("validate")
def config_validate(config: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Check a config file; exit 1 with one line per problem."""
    from t2id.config import load_config

    cfg = load_config(config)
    out.print(f"{config}: ok (run.id={cfg.run.id}, store={cfg.store.uri})")


@config_app.command("show")
def config_show(config: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Print the effective config, defaults filled in."""
    from t2id.config import dump_config, load_config

    typer.echo(dump_config(load_config(config)), nl=False)


VERBOSE_HELP = ("Show everything live (Ray, workers, training output). Default: one line per stage and progress "
                "bars; the rest goes to each stage's log in the run (<run>/<stage>/logs/<stage>.log).")


def pipeline_console(cfg, verbose: bool):
    """The events a pipeline run reports to: quiet with per-stage logs in the run's store, or verbose."""
    from t2id.console import run_console
    from t2id.runner import run_store

    logs = Path(cfg.store.cache_dir).expanduser() / "logs" / cfg.run.id
    return run_console(run_store(cfg), logs, verbose=verbose)


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    only: Annotated[str | None, typer.Option(help="Run just this stage.")] = None,
    force: Annotated[str | None, typer.Option(help="Redo this stage and every stage after it.")] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Before skipping a done stage, hash all its outputs (default: sizes, and hashes of "
                         "files under 1 MiB).")] = False,
    steal_lock: Annotated[bool, typer.Option(
        "--steal-lock", help="Take the run lock from another run of this run id (only if that run is dead).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
) -> None:
    """Run the pipeline from a config; done stages are skipped, so rerunning resumes."""
    from t2id.config import load_config
    from t2id.preflight import preflight
    from t2id.runner import run_pipeline, run_store

    cfg = load_config(config)
    preflight(cfg, [only] if only else None)  # store, S3, weights: one line in seconds, before Ray starts
    with pipeline_console(cfg, verbose) as events:
        run_pipeline(cfg, only=only, force=force, events=events, verify=verify, steal_lock=steal_lock)
    out.print(f"run '{cfg.run.id}' is at {run_store(cfg).root}")


@app.command("demo")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the demo store.")] = Path("t2id-demo"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE_HELP)] = False,
    task: Annotated[str, typer.Option(help="detect (configs/demo.yaml) or classify (configs/demo-classify.yaml).")
                    ] = "detect",
) -> None:
    """The whole pipeline on the built-in demo config: phantom data, tiny models, local Ray."""
    from t2id.config import builtin_config, load_config
    from t2id.preflight import preflight
    from t2id.runner import run_pipeline, run_store

    store_dir = out_dir.expanduser().resolve()
    if task not in ("detect", "classify"):
        raise UserError(f"--task {task!r}: use detect or classify")
    cfg = load_config(builtin_config("demo" if task == "detect" else "demo-classify"), overrides={
        "store.uri": str(store_dir / "store"),
        "store.cache_dir": str(store_dir / "cache"),
    })
    preflight(cfg)
    with pipeline_console(cfg, verbose) as events:
        run_pipeline(cfg, events=events)
    root = run_store(cfg)
    out.print(f"artifacts: {root.root}")
    if root.exists(layout.report.index_html):
        out.print(f"report: {root.uri(layout.report.index_html)}")


@app.command("status")
def status(
    target: Annotated[str, typer.Argument(help="CONFIG (a .yaml) or the run root: <store.uri>/<run.id>, a "
                                               "folder or s3://bucket/prefix/run-id.")],
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until the run ends (Ctrl-C to stop).")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.", min=0.5)] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Where a run stands, from its store alone (no Ray): each stage done / running / failed / pending."""
    import json
    import time

    from rich.live import Live

    from t2id.console import status_view
    from t2id.status import open_run, run_status

    store = open_run(target)  # an s3:// run: endpoint from AWS_ENDPOINT_URL, credentials from the AWS chain
    if as_json:
        typer.echo(json.dumps(run_status(store).to_json(), indent=1, default=str))
        return
    if not watch:
        out.print(status_view(run_status(store)))
        return
    with contextlib.suppress(KeyboardInterrupt), Live(status_view(run_status(store)), console=out,
                                                       auto_refresh=False) as live:
        while True:
            now = run_status(store)
            live.update(status_view(now), refresh=True)
            if not now.active and all(s.state in ("done", "failed") for s in now.stages):
                break  # the run ended
            time.sleep(interval)


@app.command("plan")
def plan(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    price_per_gpu_hour: Annotated[float | None, typer.Option(help="Price of one GPU-hour, for the cost.",
                                                             min=0)] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs of the cluster (default: cluster.gpu_workers max_replicas "
                                                  "x gpus).", min=1)] = None,
    gpu_type: Annotated[str, typer.Option(help="GPU type of the throughput table (t2id/plan_throughput.py).")] = "h200",
    images: Annotated[int | None, typer.Option(help="Images in your dataset (default: the run's store, the "
                                                    "phantom, or the paper's 7,464).", min=1)] = None,
    rare_images: Annotated[int | None, typer.Option(help="Images holding a lora.target_classes class (default: "
                                                         "as --images; the paper's: 840).", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")] = False,
) -> None:
    """Before anything runs: what the config will do, estimated GPU-hours and wall time per stage, and the cost."""
    from t2id.config import load_config
    from t2id.console import plan_views
    from t2id.plan import make_plan, plan_json

    result = make_plan(load_config(config), str(config), gpu_type=gpu_type, gpus=gpus,
                       price_per_gpu_hour=price_per_gpu_hour, images=images, rare_images=rare_images)
    if as_json:
        typer.echo(plan_json(result))
        return
    for part in plan_views(result):
        out.print(part, highlight=False)


# Stage and deployment command groups live beside their code.
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
register_deploy(app)


def main(argv: list[str] | None = None) -> None:
    """Entry point: typer handles usage errors (exit 2); user errors print one line and exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("T2ID_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]  # accepted anywhere on the line
    try:
        app(args=args, prog_name="t2id")  # standalone mode: exits 0, or 2 on usage errors
    except Exception as exc:
        # A UserError, also one raised in a Ray task, actor, Train worker or Tune trial and wrapped by Ray, and the
        # storage faults the user fixes (full disk, missing bucket, unreachable endpoint, no credentials): one
        # line. Anything else is a bug and keeps its traceback.
        message = one_line(exc)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        for line in message.splitlines():
            err.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
