"""The `t2id` command line. Thin: parse, load the config, call the stage code.

Exit codes: 0 ok, 1 user error (bad config, bad data, missing file: one line, no traceback
unless --debug), 2 usage error (unknown command or option).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from t2id import layout
from t2id.console import RichEvents
from t2id.data.cli import app as data_app
from t2id.deploy.cli import register as register_deploy
from t2id.errors import UserError
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


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    only: Annotated[str | None, typer.Option(help="Run just this stage.")] = None,
    force: Annotated[str | None, typer.Option(help="Redo this stage and every stage after it.")] = None,
) -> None:
    """Run the pipeline from a config; done stages are skipped, so rerunning resumes."""
    from t2id.config import load_config
    from t2id.runner import run_pipeline, run_store

    cfg = load_config(config)
    run_pipeline(cfg, only=only, force=force, events=RichEvents(err))
    out.print(f"run '{cfg.run.id}' is at {run_store(cfg).root}")


@app.command("demo")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the demo store.")] = Path("t2id-demo"),
) -> None:
    """The whole pipeline on the built-in demo config: phantom data, tiny models, local Ray."""
    from t2id.config import builtin_config, load_config
    from t2id.runner import run_pipeline, run_store

    store_dir = out_dir.expanduser().resolve()
    cfg = load_config(builtin_config("demo"), overrides={
        "store.uri": str(store_dir / "store"),
        "store.cache_dir": str(store_dir / "cache"),
    })
    run_pipeline(cfg, events=RichEvents(err))
    root = run_store(cfg)
    out.print(f"artifacts: {root.root}")
    if root.exists(layout.report.index_html):
        out.print(f"report: {root.uri(layout.report.index_html)}")


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
    except UserError as exc:
        if debug:
            traceback.print_exc()
        for line in str(exc).splitlines():
            err.print(f"[red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
