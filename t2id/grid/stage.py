"""Stage `grid`: train the detector for every (fold, strategy) on Ray Tune; publish per-class metrics.

Outputs (run-relative keys):
  grid/trials.parquet     one row per (fold, strategy, class), "all classes" first: mAP50-95, mAP50,
                          precision, recall, training seconds, status ("ok" / "skipped") and reason;
  grid/pr_curves.parquet  the validation PR curve of each (fold, strategy, class) as points;
  grid/results/...        one JSON per trial (what a resumed grid reuses), grid/tune/ Tune's experiment.
Strategies with synthetic images (baseline_sdxl, rfs_sdxl, t2id_cas) train on the fold's kept,
labelled rows of label/fold=<k>/labels.parquet; a fold without them records its trials as skipped,
with the reason, instead of dropping them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from t2id.config import sha256_json
from t2id.errors import UserError
from t2id.grid.tune import TuneSettings, raise_on_errors, run_trials
from t2id.runner import Stage, StageContext, StageResult
from t2id.store import Store

TRIALS_KEY = "grid/trials.parquet"
PR_KEY = "grid/pr_curves.parquet"
ALL = "all classes"
METRICS = ("map50_95", "map50", "precision", "recall")

TRIALS_SCHEMA = pa.schema([
    ("fold", pa.int32()), ("strategy", pa.string()), ("class", pa.string()),
    ("map50_95", pa.float64()), ("map50", pa.float64()), ("precision", pa.float64()), ("recall", pa.float64()),
    ("train_seconds", pa.float64()), ("n_synthetic", pa.int32()), ("status", pa.string()), ("reason", pa.string()),
])
PR_SCHEMA = pa.schema([
    ("fold", pa.int32()), ("strategy", pa.string()), ("class", pa.string()),
    ("recall", pa.float64()), ("precision", pa.float64()),
])


# 1. What each trial trains on -------------------------------------------------------------------

def class_names(store: Store) -> list[str]:
    return list(json.loads(store.read_text("data/classes.json"))["names"])


def run_folds(store: Store) -> list[int]:
    folds = store.read_table("split/folds.parquet").column("fold").to_pylist()
    return sorted({int(f) for f in folds})


def synthetic_key(fold: int) -> str:
    return f"label/fold={fold}/labels.parquet"


def usable_synthetic(table: pa.Table) -> pa.Table:
    """Kept, labelled synthetic rows: passed the quality gate and carry at least one box."""
    if "kept" in table.column_names:
        table = table.filter(pc.fill_null(table["kept"], False))
    return table.filter(pc.greater(pc.list_value_length(table["boxes"]), 0))


def synthetic_status(ctx: StageContext, fold: int) -> tuple[str | None, int, str]:
    """(store key of the fold's synthetic rows or None, usable row count, reason when None)."""
    if not ctx.stage_enabled("label"):
        return None, 0, "the label stage is not enabled (run.stages), so there is no labelled synthetic set"
    key = synthetic_key(fold)
    if not ctx.store.exists(key):
        return None, 0, f"{key} does not exist (run the generate and label stages)"
    count = usable_synthetic(ctx.store.read_table(key)).num_rows
    if count == 0:
        return None, 0, f"{key} holds no kept, labelled synthetic images"
    return key, count, ""


# 2. The trial's work (runs in a Tune worker) ----------------------------------------------------

@dataclass(frozen=True)
class DetectTrial:
    """train_fn of the grid: one detector training through the detect helper; returns plain JSON."""

    store: Store
    detector: dict[str, Any]
    cache_dir: str
    seed: int
    device: str
    workers: int

    def __call__(self, trial: dict[str, Any]) -> dict[str, Any]:
        from t2id.detect.config import DetectorConfig, StrategySpec
        from t2id.detect.train import detect_on_store

        synthetic = None
        if trial.get("synthetic_key"):
            synthetic = usable_synthetic(self.store.read_table(trial["synthetic_key"]))
        result = detect_on_store(
            self.store, trial["fold"], StrategySpec.model_validate(trial["spec"]), DetectorConfig(**self.detector),
            Path(self.cache_dir), self.seed, synthetic=synthetic, device=self.device, workers=self.workers,
        )
        return result.to_json()  # per_class, overall (NaN as null), pr_curves, seconds, ...


# 3. Tables --------------------------------------------------------------------------------------

def trial_rows(fold: int, strategy: str, output: dict[str, Any], classes: list[str], n_synthetic: int) -> list[dict]:
    rows = []
    for name in [ALL, *classes]:
        metrics = output["overall"] if name == ALL else output["per_class"].get(name, {})
        rows.append({"fold": fold, "strategy": strategy, "class": name,
                     **{m: _num(metrics.get(m)) for m in METRICS},
                     "train_seconds": float(output.get("seconds", 0.0)), "n_synthetic": n_synthetic,
                     "status": "ok", "reason": ""})
    return rows


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def skipped_rows(fold: int, strategy: str, classes: list[str], reason: str) -> list[dict]:
    return [{"fold": fold, "strategy": strategy, "class": name, **dict.fromkeys(METRICS),
             "train_seconds": None, "n_synthetic": 0, "status": "skipped", "reason": reason}
            for name in [ALL, *classes]]


def pr_rows(fold: int, strategy: str, output: dict[str, Any]) -> list[dict]:
    return [{"fold": fold, "strategy": strategy, "class": name, "recall": float(r), "precision": float(p)}
            for name, points in output.get("pr_curves", {}).items() for r, p in points]


# 4. The stage -----------------------------------------------------------------------------------

def plan_trials(ctx: StageContext) -> tuple[list[dict[str, Any]], list[dict], list[int], list[str]]:
    """(trials to train, skipped rows, folds, classes)."""
    grid = ctx.config.grid
    classes = class_names(ctx.store)
    available = run_folds(ctx.store)
    folds = grid.folds if grid.folds is not None else available
    missing = sorted(set(folds) - set(available))
    if missing:
        raise UserError(f"grid.folds {grid.folds}: fold(s) {missing} do not exist; the split has folds {available}")
    seed = ctx.config.run.seed if grid.seed is None else grid.seed
    upstream = {s: ctx.marker(s)["outputs"] for s in ("data", "split") if ctx.marker(s) is not None}
    trials, skipped = [], []
    for fold in folds:
        syn_key, n_syn, reason = synthetic_status(ctx, fold)
        for strategy in grid.strategies:
            spec = grid.strategy_spec(strategy)
            uses_syn = spec.synthetic
            if uses_syn and syn_key is None:
                skipped.extend(skipped_rows(fold, strategy, classes, f"needs synthetic images: {reason}"))
                continue
            # A trial's published result is reused only while everything it was trained from is unchanged.
            identity = {"fold": fold, "strategy": spec.model_dump(mode="json"),
                        "detector": grid.detector.model_dump(mode="json"), "seed": seed, "inputs": upstream,
                        "synthetic": ctx.store.sha256(syn_key) if uses_syn else None}
            digest = sha256_json(identity)[:16]
            name = f"fold={fold}-{strategy}"
            trials.append({"name": name, "fold": fold, "strategy": strategy, "spec": spec.model_dump(mode="json"),
                           "synthetic_key": syn_key if uses_syn else None, "n_synthetic": n_syn if uses_syn else 0,
                           "result_key": f"grid/results/{name}-{digest}.json"})
    return trials, skipped, folds, classes


def detect_trial(ctx: StageContext) -> DetectTrial:
    """The grid's train_fn for this run: real detector trainings through the detect helper."""
    grid = ctx.config.grid
    return DetectTrial(
        store=ctx.store, detector=grid.detector.model_dump(mode="json"),
        cache_dir=str(Path(ctx.cache_dir).expanduser().resolve()),  # Tune workers run in their trial dir
        seed=ctx.config.run.seed if grid.seed is None else grid.seed,
        device="0" if grid.gpus_per_trial > 0 else "cpu",  # Ray sets CUDA_VISIBLE_DEVICES per trial
        workers=grid.workers,
    )


def run(ctx: StageContext, train_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> StageResult:
    """The grid stage; `train_fn` replaces the detector training (default `detect_trial(ctx)`)."""
    from t2id.raycluster import ensure_ray

    grid = ctx.config.grid
    t0 = time.perf_counter()
    trials, skipped, folds, classes = plan_trials(ctx)
    train_fn = train_fn or detect_trial(ctx)
    already = sum(ctx.store.exists(t["result_key"]) for t in trials)
    outcome = None
    if trials:
        if already < len(trials):
            ensure_ray(ctx.config.cluster)
            if not (ctx.config.cluster.address or os.environ.get("RAY_ADDRESS")):
                # A local Ray never grows: a trial asking for more than it has would wait forever.
                # (On a cluster an autoscaler may add the nodes, so no check there.)
                _check_resources(grid.cpus_per_trial, grid.gpus_per_trial)
        outcome = run_trials(trials, train_fn, ctx.store, TuneSettings(
            cpus_per_trial=grid.cpus_per_trial, gpus_per_trial=grid.gpus_per_trial,
            max_concurrent=grid.max_concurrent, max_retries=grid.max_retries))
        raise_on_errors(outcome, grid.max_retries)

    rows, curves = [], []
    by_name = outcome.results if outcome else {}
    for trial in trials:
        output = by_name[trial["name"]]
        rows.extend(trial_rows(trial["fold"], trial["strategy"], output, classes, trial["n_synthetic"]))
        curves.extend(pr_rows(trial["fold"], trial["strategy"], output))
    rows.extend(skipped)
    order = {s: i for i, s in enumerate(grid.strategies)}
    cls_order = {c: i for i, c in enumerate([ALL, *classes])}
    rows.sort(key=lambda r: (r["fold"], order[r["strategy"]], cls_order[r["class"]]))
    outputs = {
        TRIALS_KEY: ctx.store.write_table(TRIALS_KEY, pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA)),
        PR_KEY: ctx.store.write_table(PR_KEY, pa.Table.from_pylist(curves, schema=PR_SCHEMA)),
    }
    return StageResult(outputs=outputs, summary={
        "trials": len(trials), "reused": already, "skipped": len({(r["fold"], r["strategy"]) for r in skipped}),
        "folds": folds, "strategies": list(grid.strategies), "seconds": round(time.perf_counter() - t0, 1),
        "resumed": bool(outcome and outcome.restored),
    })


def _check_resources(cpus: float, gpus: float) -> None:
    import ray

    have = ray.cluster_resources()
    if cpus > have.get("CPU", 0):
        raise UserError(f"grid.cpus_per_trial {cpus} exceeds the Ray cluster's {have.get('CPU', 0)} CPUs; lower it")
    if gpus > have.get("GPU", 0):
        raise UserError(f"grid.gpus_per_trial {gpus} but the Ray cluster has {have.get('GPU', 0)} GPUs; "
                        "set grid.gpus_per_trial: 0 for CPU training")


STAGE = Stage(name="grid", sections=("grid",), depends_on=("data", "split", "label"), run=run)
