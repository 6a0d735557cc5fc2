"""The pure core of `grid`: which trials to train, the work of one trial, and the result tables.

A trial is one (fold, strategy, seed) detector training, described by a plain JSON dict (it is a
point of Tune's search space): `name`, `fold`, `strategy`, `seed`, `synthetic_key` (the fold's
labelled synthetic rows, or None), `n_synthetic` and `identity` (everything its result depends on;
t2id.resume keeps a finished trial's result while its identity holds). Every trial of a grid gets
the same compute budget (grid.budget), and reports its FINAL model (`selection: final`), with
mAP from its stored per-image predictions. Strategies with synthetic images (baseline_sdxl,
rfs_sdxl, t2id_cas) train on the fold's kept, labelled rows of the label stage; a fold without them
records its trials as skipped, with the reason, instead of dropping them. A strategy with
`synthetic_from` trains on another run's synthetic set instead (t2id.grid.sources): the trial then
carries that run's root as `synthetic_from`, and its identity that set's sha256.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from t2id import layout
from t2id.grid import sources
from t2id.grid.settings import GridSettings
from t2id.store import Store

ALL = "all classes"
METRICS = ("map50_95", "map50", "precision", "recall")

TRIALS_SCHEMA = pa.schema([
    ("fold", pa.int32()), ("strategy", pa.string()), ("seed", pa.int64()), ("class", pa.string()),
    ("map50_95", pa.float64()), ("map50", pa.float64()), ("precision", pa.float64()), ("recall", pa.float64()),
    ("train_seconds", pa.float64()), ("n_synthetic", pa.int32()),
    ("budget_unit", pa.string()), ("budget", pa.int64()), ("optimizer_steps", pa.int64()),
    ("images_seen", pa.int64()), ("selection", pa.string()), ("predictions", pa.string()),
    ("status", pa.string()), ("reason", pa.string()),
])
PR_SCHEMA = pa.schema([
    ("fold", pa.int32()), ("strategy", pa.string()), ("seed", pa.int64()), ("class", pa.string()),
    ("recall", pa.float64()), ("precision", pa.float64()),
])


# 1. What each trial trains on -------------------------------------------------------------------

def usable_synthetic(table: pa.Table) -> pa.Table:
    """Kept, labelled synthetic rows: passed the quality gate and carry at least one box."""
    if "kept" in table.column_names:
        table = table.filter(pc.fill_null(table["kept"], False))
    return table.filter(pc.greater(pc.list_value_length(table["boxes"]), 0))


def synthetic_status(store: Store, s: GridSettings, fold: int) -> tuple[str | None, int, str]:
    """(store key of the fold's synthetic rows or None, usable row count, reason when None)."""
    if not s.use_synthetic:
        return None, 0, "the label stage is not enabled (run.stages), so there is no labelled synthetic set"
    key = layout.label.labels(fold)
    if not store.exists(key):
        return None, 0, f"{key} does not exist (run the generate and label stages)"
    count = usable_synthetic(store.read_table(key)).num_rows
    if count == 0:
        return None, 0, f"{key} holds no kept, labelled synthetic images"
    return key, count, ""


def plan_trials(store: Store, s: GridSettings, inputs: dict[str, str]
                ) -> tuple[list[dict[str, Any]], list[dict], list[int], list[str]]:
    """(trials to train, skipped rows, folds, classes); `inputs` are the upstream stages' output digests."""
    from t2id.data.manifest import load_classes, select_folds

    classes = load_classes(store)
    folds = select_folds(store, s.grid.folds, "grid.folds")
    others = sources.open_sources(store, s)  # other runs' stores, split-checked before any trial
    trials, skipped = [], []
    classify = s.task == "classify"
    if classify:
        from t2id.classify.trial import synthetic_status as classify_synthetic_status
    for fold in folds:
        if classify:
            own = classify_synthetic_status(store, s.use_synthetic, fold)
        else:
            own = synthetic_status(store, s, fold)
        status = {None: own, **{uri: sources.source_status(other, uri, s.task, fold) for uri, other in others.items()}}
        for strategy in s.grid.strategies:
            spec = s.grid.strategy_spec(strategy)
            source = spec.synthetic_from if spec.synthetic else None
            syn_store = others[source] if source else store
            syn_key, n_syn, reason = status[source]
            for seed in s.seeds:
                if spec.synthetic and syn_key is None:
                    skipped.extend(skipped_rows(fold, strategy, seed, classes, f"needs synthetic images: {reason}",
                                                s.grid.budget.unit))
                    continue
                # A trial's published result is reused only while everything it was trained from is unchanged.
                model = ({"classifier": s.grid.classifier.model_dump(mode="json")} if classify else
                         {"detector": s.grid.detector.model_dump(mode="json")})
                # (the synthetic rows' sha256 covers another run's set too: regenerating it retrains these trials only)
                identity = {"fold": fold, "strategy": spec.identity(), **model, "seed": seed,
                            "budget": s.grid.budget.model_dump(mode="json"), "selection": "final",
                            "inputs": inputs, "synthetic": syn_store.sha256(syn_key) if spec.synthetic else None}
                trials.append({"name": layout.grid.trial_name(fold, strategy, seed), "fold": fold,
                               "strategy": strategy, "seed": seed,
                               "synthetic_key": syn_key if spec.synthetic else None,
                               # the other run's root, resolved here: Tune workers run in their own folders
                               "synthetic_from": syn_store.uri() if source else None,
                               "n_synthetic": n_syn if spec.synthetic else 0, "identity": identity})
    return trials, skipped, folds, classes


# 2. The trial's work (runs in a Tune worker) ----------------------------------------------------

def detect_trial(trial: dict[str, Any], s: GridSettings, store: Store, cache_dir: str) -> dict[str, Any]:
    """The grid's trial function: one detector training through the detect helper; plain JSON out
    (per_class, overall with NaN as null, pr_curves, seconds, budget, optimizer_steps, images_seen,
    selection, predictions key, ...). The first seed's final weights are also published per
    (fold, strategy) (`layout.grid.weights(fold, strategy)`, what the label teacher may reuse)."""
    from t2id.detect.train import detect_on_store
    from t2id.devices import resolve_device, ultralytics_device

    source = sources.open_source(store, trial["synthetic_from"]) if trial.get("synthetic_from") else store
    synthetic = None
    if trial.get("synthetic_key"):
        synthetic = usable_synthetic(source.read_table(trial["synthetic_key"]))
    # Ray sets CUDA_VISIBLE_DEVICES per trial, so a trial given a GPU (or a share of one) sees it first.
    device = resolve_device("cuda" if s.grid.gpus_per_trial > 0 else "cpu", "grid.gpus_per_trial")
    result = detect_on_store(store, trial["fold"], s.grid.strategy_spec(trial["strategy"]), s.grid.detector,
                             Path(cache_dir), trial["seed"], synthetic=synthetic, device=ultralytics_device(device),
                             workers=s.grid.workers, budget=s.grid.budget, synthetic_store=source)
    if trial["seed"] == s.seeds[0]:
        store.write_file(layout.grid.weights(trial["fold"], trial["strategy"]), result.weights)
    return result.record


def classify_trial(trial: dict[str, Any], s: GridSettings, store: Store, cache_dir: str) -> dict[str, Any]:
    """The grid's trial function for run.task classify: one classifier training (t2id.classify.trial)."""
    from t2id.classify.trial import classify_on_store, kept_synthetic
    from t2id.data.manifest import load_classes
    from t2id.devices import resolve_device

    source = sources.open_source(store, trial["synthetic_from"]) if trial.get("synthetic_from") else store
    synthetic = kept_synthetic(source.read_table(trial["synthetic_key"])) if trial.get("synthetic_key") else None
    device = resolve_device("cuda" if s.grid.gpus_per_trial > 0 else "cpu", "grid.gpus_per_trial")
    return classify_on_store(store, trial["fold"], s.grid.strategy_spec(trial["strategy"]), s.grid.classifier,
                             load_classes(store), Path(cache_dir), trial["seed"], synthetic=synthetic,
                             device=str(device), budget=s.grid.budget, synthetic_store=source)


def task_trial(trial: dict[str, Any], s: GridSettings, store: Store, cache_dir: str) -> dict[str, Any]:
    """The grid stage's default trial: a detector or a classifier training, by run.task."""
    fn = classify_trial if s.task == "classify" else detect_trial
    return fn(trial, s, store, cache_dir)


# 3. Tables --------------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def trial_rows(trial: dict[str, Any], output: dict[str, Any], classes: list[str]) -> list[dict]:
    rows = []
    for name in [ALL, *classes]:
        metrics = output["overall"] if name == ALL else output["per_class"].get(name, {})
        rows.append({"fold": trial["fold"], "strategy": trial["strategy"], "seed": trial["seed"], "class": name,
                     **{m: _num(metrics.get(m)) for m in METRICS},
                     "train_seconds": float(output.get("seconds", 0.0)), "n_synthetic": trial["n_synthetic"],
                     "budget_unit": output.get("budget_unit"), "budget": output.get("budget"),
                     "optimizer_steps": output.get("optimizer_steps"), "images_seen": output.get("images_seen"),
                     "selection": output.get("selection"), "predictions": output.get("predictions"),
                     "status": "ok", "reason": ""})
    return rows


def skipped_rows(fold: int, strategy: str, seed: int, classes: list[str], reason: str,
                 budget_unit: str | None = None) -> list[dict]:
    return [{"fold": fold, "strategy": strategy, "seed": seed, "class": name, **dict.fromkeys(METRICS),
             "train_seconds": None, "n_synthetic": 0, "budget_unit": budget_unit, "budget": None,
             "optimizer_steps": None, "images_seen": None, "selection": None, "predictions": None,
             "status": "skipped", "reason": reason}
            for name in [ALL, *classes]]


def pr_rows(trial: dict[str, Any], output: dict[str, Any]) -> list[dict]:
    return [{"fold": trial["fold"], "strategy": trial["strategy"], "seed": trial["seed"], "class": name,
             "recall": float(r), "precision": float(p)}
            for name, points in output.get("pr_curves", {}).items() for r, p in points]


def tables(trials: list[dict[str, Any]], results: dict[str, dict[str, Any]], skipped: list[dict],
           strategies: list[str], classes: list[str], task: str = "detect") -> tuple[pa.Table, pa.Table]:
    """(trials table, PR curves table): one row per (fold, strategy, seed, class), config order."""
    if task == "classify":
        from t2id.classify.results import trials_table
        return trials_table(trials, results, skipped, strategies, classes), pa.Table.from_pylist([], schema=PR_SCHEMA)
    rows, curves = [], []
    for trial in trials:
        output = results[trial["name"]]
        rows.extend(trial_rows(trial, output, classes))
        curves.extend(pr_rows(trial, output))
    rows.extend(skipped)
    order = {s: i for i, s in enumerate(strategies)}
    cls_order = {c: i for i, c in enumerate([ALL, *classes])}
    rows.sort(key=lambda r: (r["fold"], order[r["strategy"]], r["seed"], cls_order[r["class"]]))
    return pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA), pa.Table.from_pylist(curves, schema=PR_SCHEMA)
