"""What every job entrypoint shares: the argument parser and the call into t2id.runner."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from t2id.console import RichEvents
from t2id.config import STAGES, T2IDConfig, builtin_config, load_config
from t2id.errors import UserError, one_line
from t2id.preflight import preflight
from t2id.runner import StageOutcome, run_pipeline, run_store


def build_parser(stage: str | None) -> argparse.ArgumentParser:
    what = f"the '{stage}' stage" if stage else "the whole pipeline (done stages are skipped)"
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{stage or 'pipeline'}", description=f"Run {what}.")
    parser.add_argument("--config", type=Path, default=os.environ.get("T2ID_CONFIG"),
                        help="YAML config (default: $T2ID_CONFIG, which the RayJob pods set).")
    if stage is None:
        parser.add_argument("--only", choices=STAGES, help="Run just this stage.")
    parser.add_argument("--force", choices=STAGES, help="Redo this stage and every stage after it.")
    parser.add_argument("--verify", action="store_true",
                        help="Before skipping a done stage, hash all its outputs (default: sizes, small files hashed).")
    # A RayJob retried after its head pod died starts while the dead driver's lease (5 min) still looks
    # alive: resubmit with --steal-lock, or let the retry wait the lease out.
    parser.add_argument("--steal-lock", action="store_true",
                        help="Take the run lock from another run of this run id (only if that run is dead).")
    parser.add_argument("--smoke-test", action="store_true",
                        help="Ignore --config: run the built-in demo config (tiny models, CPU) in a temp store.")
    parser.add_argument("--out", type=Path, default=None, help="Store folder for --smoke-test (default: a temp dir).")
    return parser


def smoke_config(stage: str | None, out: Path | None) -> T2IDConfig:
    """The demo config, its store under `out`; a stage job also runs the stages before it."""
    out = (out or Path(tempfile.mkdtemp(prefix="t2id-smoke-"))).resolve()
    overrides: dict[str, object] = {"store.uri": str(out / "store"), "store.cache_dir": str(out / "cache")}
    if stage is not None:
        overrides["run.stages"] = list(STAGES[: STAGES.index(stage) + 1])
    return load_config(builtin_config("demo"), overrides=overrides)


def run_job(stage: str | None, args: argparse.Namespace) -> list[StageOutcome]:
    """Load the config, run the stage(s), print one JSON line per stage (easy to grep in job logs)."""
    try:
        if args.smoke_test:
            cfg = smoke_config(stage, args.out)
        elif args.config is None:
            raise UserError("no config: pass --config FILE or set T2ID_CONFIG")
        else:
            cfg = load_config(args.config)
        only = stage or getattr(args, "only", None)
        preflight(cfg, [only] if only else None)  # store, S3, weights: one line in seconds, before Ray starts
        outcomes = run_pipeline(cfg, only=only, force=args.force, events=RichEvents(), verify=args.verify,
                                steal_lock=args.steal_lock)
    except Exception as exc:
        line = one_line(exc)  # a user error, also one raised inside a Ray worker; anything else keeps its traceback
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(1) from exc
    for o in outcomes:
        print(json.dumps({"stage": o.stage, "status": o.status, "seconds": round(o.seconds, 2)}))
    print(json.dumps({"run": cfg.run.id, "store": run_store(cfg).root}))
    return outcomes


def entrypoints(stage: str | None) -> tuple[Callable[..., argparse.Namespace], Callable[[argparse.Namespace], None]]:
    """`parse_args(argv=None)` and `main(args)` of the job for `stage` (None: the whole pipeline)."""

    def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
        return build_parser(stage).parse_args(argv)

    def main(args: argparse.Namespace) -> None:
        run_job(stage, args)

    return parse_args, main

