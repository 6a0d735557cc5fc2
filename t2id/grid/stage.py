"""Stage `grid`: train the detector for every (fold, strategy, seed) on Ray Tune; publish per-class metrics.

Outputs (run-relative keys, t2id.layout.grid):
  trials.parquet     one row per (fold, strategy, seed, class), "all classes" first: mAP50-95, mAP50
                     (COCO, from the trial's predictions.parquet), precision, recall, training seconds,
                     n_synthetic, budget_unit / budget / optimizer_steps / images_seen (counted),
                     selection ("final"), predictions (store key), status ("ok" / "skipped") and reason;
  pr_curves.parquet  the validation PR curve of each (fold, strategy, seed, class) as points;
  fold=<k>/strategy=<s>/seed=<n>/  each trial's result, predictions, final weights and memo;
  tune/              Ray Tune's experiment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from t2id import layout
from t2id.errors import UserError
from t2id.grid import sources
from t2id.grid.core import plan_trials, tables, task_trial
from t2id.grid.ray_layer import TrialFn, raise_on_errors, run_trials
from t2id.grid.settings import GridSettings, settings
from t2id.runner import Stage, StageContext, StageResult, outputs_digest
from t2id.tracking import start as start_tracking

UPSTREAM = ("data", "split")  # what every trial trains from (the synthetic set is hashed per trial)


def run_grid(ctx: StageContext, s: GridSettings, trial_fn: TrialFn) -> StageResult:
    from t2id.raycluster import ensure_ray

    t0 = time.perf_counter()
    inputs = {stage: outputs_digest(marker) for stage in UPSTREAM if (marker := ctx.marker(stage)) is not None}
    trials, skipped, folds, classes = plan_trials(ctx.store, s, inputs)
    results: dict = {}
    reused = len(trials)
    if trials:
        ensure_ray(ctx.cluster)
        if not (ctx.cluster.address or os.environ.get("RAY_ADDRESS")):
            # A local Ray never grows: a trial asking for more than it has would wait forever.
            # (On a cluster an autoscaler may add the nodes, so no check there.)
            _check_resources(s.grid.cpus_per_trial, s.grid.gpus_per_trial)
        cache_dir = str(Path(ctx.cache_dir).expanduser().resolve())  # Tune workers run in their trial dir
        start_tracking(ctx.tracking)  # an unusable MLflow URI fails here, before any trial trains
        with ctx.events.progress("grid: trials", len(trials)) as advance:
            outcome = run_trials(trials, trial_fn, ctx.store, s, cache_dir, force=ctx.force, progress=advance,
                                 tracking=ctx.tracking)
        raise_on_errors(outcome, s.grid.max_retries)
        results, reused = outcome.results, outcome.reused
    trials_table, curves_table = tables(trials, results, skipped, list(s.grid.strategies), classes, s.task)
    outputs = {
        layout.grid.trials: ctx.store.write_table(layout.grid.trials, trials_table),
        layout.grid.pr_curves: ctx.store.write_table(layout.grid.pr_curves, curves_table),
    }
    return StageResult(outputs=outputs, summary={
        "trials": len(trials), "reused": reused, "skipped": len({(r["fold"], r["strategy"], r["seed"]) for r in skipped}),
        "folds": folds, "strategies": list(s.grid.strategies), "seeds": s.seeds, "seconds": round(time.perf_counter() - t0, 1),
        "resumed": reused > 0,  # finished trials of an earlier, interrupted or invalidated run were kept
    })


def _check_resources(cpus: float, gpus: float) -> None:
    import ray

    have = ray.cluster_resources()
    if cpus > have.get("CPU", 0):
        raise UserError(f"grid.cpus_per_trial {cpus} exceeds the Ray cluster's {have.get('CPU', 0)} CPUs; lower it")
    if gpus > have.get("GPU", 0):
        raise UserError(f"grid.gpus_per_trial {gpus} but the Ray cluster has {have.get('GPU', 0)} GPUs; "
                        "set grid.gpus_per_trial: 0 for CPU training")


def build_stage(trial_fn: TrialFn = task_trial) -> Stage[GridSettings]:
    """The grid stage with `trial_fn` as each trial's work (default: a real detector or classifier training,
    by run.task)."""
    def run(ctx: StageContext, s: GridSettings) -> StageResult:
        return run_grid(ctx, s, trial_fn)

    def external_inputs(ctx: StageContext, s: GridSettings) -> dict[str, str]:
        return sources.external_inputs(ctx.store, s)

    return Stage(name="grid", settings=settings, depends_on=("data", "split", "label"), run=run,
                 external_inputs=external_inputs)


STAGE = build_stage()
