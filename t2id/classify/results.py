"""grid/trials.parquet for run.task classify: one row per (fold, strategy, seed, class), "all classes" first.

Class rows hold that class's recall, precision, F1, one-vs-rest AUC and support (validation images);
the "all classes" row holds accuracy, balanced accuracy, macro F1 and macro AUC, and also repeats
balanced accuracy as its `recall` (the mean per-class recall) and macro F1 as its `f1`, so a per-class
table of recall or F1 has its overall row in the same column (t2id.classify.metrics has the definitions).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

ALL = "all classes"  # as t2id.grid.core.ALL
CLASS_METRICS = ("recall", "precision", "f1", "auc")
OVERALL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")

TRIALS_SCHEMA = pa.schema([
    ("fold", pa.int32()), ("strategy", pa.string()), ("seed", pa.int64()), ("class", pa.string()),
    ("accuracy", pa.float64()), ("balanced_accuracy", pa.float64()), ("macro_f1", pa.float64()),
    ("recall", pa.float64()), ("precision", pa.float64()), ("f1", pa.float64()), ("auc", pa.float64()),
    ("support", pa.int64()),
    ("train_seconds", pa.float64()), ("n_synthetic", pa.int32()),
    ("budget_unit", pa.string()), ("budget", pa.int64()), ("optimizer_steps", pa.int64()),
    ("images_seen", pa.int64()), ("selection", pa.string()), ("predictions", pa.string()),
    ("status", pa.string()), ("reason", pa.string()),
])


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def trial_rows(trial: dict[str, Any], output: dict[str, Any], classes: list[str]) -> list[dict]:
    overall = output["overall"]
    common = {"train_seconds": float(output.get("seconds", 0.0)), "n_synthetic": trial["n_synthetic"],
              "budget_unit": output.get("budget_unit"), "budget": output.get("budget"),
              "optimizer_steps": output.get("optimizer_steps"), "images_seen": output.get("images_seen"),
              "selection": output.get("selection"), "predictions": output.get("predictions"),
              "status": "ok", "reason": ""}
    key = {"fold": trial["fold"], "strategy": trial["strategy"], "seed": trial["seed"]}
    support = sum(int(output["per_class"][c].get("support") or 0) for c in classes)
    rows = [{**key, "class": ALL, **{m: _num(overall.get(m)) for m in OVERALL_METRICS},
             "recall": _num(overall.get("balanced_accuracy")), "precision": None, "f1": _num(overall.get("macro_f1")),
             "auc": _num(overall.get("auc")), "support": support, **common}]
    for name in classes:
        metrics = output["per_class"].get(name, {})
        rows.append({**key, "class": name, **dict.fromkeys(OVERALL_METRICS),
                     **{m: _num(metrics.get(m)) for m in CLASS_METRICS},
                     "support": int(metrics.get("support") or 0), **common})
    return rows


def trials_table(trials: list[dict[str, Any]], results: dict[str, dict[str, Any]], skipped: list[dict],
                 strategies: list[str], classes: list[str]) -> pa.Table:
    rows = []
    for trial in trials:
        rows.extend(trial_rows(trial, results[trial["name"]], classes))
    names = TRIALS_SCHEMA.names
    rows.extend({name: row.get(name) for name in names} for row in skipped)  # skipped: metrics null, with the reason
    order = {s: i for i, s in enumerate(strategies)}
    cls_order = {c: i for i, c in enumerate([ALL, *classes])}
    rows.sort(key=lambda r: (r["fold"], order[r["strategy"]], r["seed"], cls_order[r["class"]]))
    return pa.Table.from_pylist(rows, schema=TRIALS_SCHEMA)
