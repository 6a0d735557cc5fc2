"""The report's generator comparison: one row per strategy that trains on synthetic images (issue 20).

A run trains one generator (lora.method); a grid strategy with `synthetic_from` trains on another run's
synthetic set (t2id.grid.sources), so one report can set generators side by side on the same folds. Per
strategy: the generator (the synthetic manifest's `method` column; null = lora, manifests from before it
was recorded), the run the images come from, the synthetic images each fold's trials trained on, FID and
KID vs validation as that run's evaluate stage wrote them (read, never recomputed), the strategy's metric
overall and per target class, and its paired test against the baseline when the report computed one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from t2id import layout
from t2id.grid.sources import open_source, synthetic_key
from t2id.report import tables
from t2id.store import Store

ALL = tables.ALL
THIS_RUN = "this run"


@dataclass
class Source:
    """What the report reads from the run that made a strategy's synthetic images."""

    name: str  # THIS_RUN or the synthetic_from URI
    generator: str = "n/a"  # lora.method values of its synthetic manifests
    labeller: str = "n/a"  # label_source values of its synthetic manifests
    networks: str = "not recorded"  # evaluate's feature networks
    metrics: pd.DataFrame | None = None  # evaluate/metrics.parquet
    error: str | None = None
    folds: list[int] = field(default_factory=list)


def read_source(store: Store, uri: str | None, task: str, folds: list[int]) -> Source:
    """The generator, labeller and evaluate metrics of the run `uri` (None: this run) over `folds`."""
    source = Source(THIS_RUN if uri is None else uri, folds=folds)
    try:
        run = store if uri is None else open_source(store, uri)
        manifests = [run.read_table(key).to_pandas() for key in (synthetic_key(task, f) for f in folds)
                     if run.exists(key)]
        if run.exists(layout.evaluate.metrics):
            source.metrics = run.read_table(layout.evaluate.metrics).to_pandas()
    except Exception as exc:  # an unreachable other run thins this table, not the whole report
        source.error = f"{type(exc).__name__}: {exc}"
        return source
    if manifests:
        rows = pd.concat(manifests, ignore_index=True)
        methods = rows["method"] if "method" in rows else pd.Series([None] * len(rows))
        source.generator = ", ".join(dict.fromkeys(methods.fillna("lora").astype(str)))
        labels = rows["label_source"].dropna() if "label_source" in rows else pd.Series([], dtype=str)
        source.labeller = ", ".join(dict.fromkeys(labels.astype(str))) or "not recorded"
    if source.metrics is not None and "networks" in source.metrics:
        source.networks = "; ".join(dict.fromkeys(source.metrics["networks"].dropna().astype(str))) or "not recorded"
    return source


def _mean_std(values: pd.Series, scale: float = 1.0, digits: int = 1) -> str:
    values = values.dropna().astype(float) * scale
    if values.empty:
        return "n/a"
    text = f"{values.mean():.{digits}f}"
    if len(values) > 1:
        text += f" ± {values.std(ddof=1):.{digits}f}"
    return text + f" (n={len(values)})"


def _per_fold(trials: pd.DataFrame, strategy: str) -> tuple[str, list[int]]:
    """'fold 0: 120; fold 1: skipped' (n_synthetic of the trials, max over seeds) and the trained folds
    (every fold of the strategy's trials when none trained, so the generator is still described)."""
    rows = trials[(trials["class"] == ALL) & (trials["strategy"] == strategy)]
    parts, trained = [], []
    for fold, part in rows.groupby("fold"):
        ok = part[part["status"].fillna("ok") == "ok"] if "status" in part else part
        if ok.empty:
            parts.append(f"fold {int(fold)}: skipped")
            continue
        trained.append(int(fold))
        n = ok["n_synthetic"].max() if "n_synthetic" in ok else np.nan
        parts.append(f"fold {int(fold)}: {'not recorded' if pd.isna(n) else int(n)}")
    return "; ".join(parts), trained or sorted(int(f) for f in rows["fold"].unique())


def generator_table(store: Store, synthetic_sources: dict[str, str | None], trials: pd.DataFrame,
                    strategies: list[str], classes: list[str], target_classes: list[str], metric: str,
                    metric_label: str, tests: pd.DataFrame | None, baseline: str, task: str = "detect",
                    ) -> tuple[pd.DataFrame, str] | None:
    """(the table, its caption), or None when no strategy of the grid trains on synthetic images.

    `synthetic_sources`: strategy -> its synthetic_from (None: this run), for the config's strategies with
    synthetic: true. `tests`: the report's sign-flip (and bootstrap) table.
    """
    chosen = {name: synthetic_sources[name] for name in strategies if name in synthetic_sources}
    if not chosen:
        return None
    stats = tables.summary_stats(trials, metric, strategies, classes)
    targets = [c for c in target_classes if c in classes] or list(classes)
    comparison = (tables.comparison_table(tests, strategies, classes)
                  if tests is not None and not tests.empty else None)
    cache: dict[tuple[str | None, tuple[int, ...]], Source] = {}
    rows, sources = [], {}
    for strategy, uri in chosen.items():
        per_fold, folds = _per_fold(trials, strategy)
        key = (uri, tuple(folds))
        if key not in cache:
            cache[key] = read_source(store, uri, task, folds)
        source = cache[key]
        sources[source.name] = source
        row: dict = {"strategy": strategy, "generator": source.generator, "source run": source.name,
                     "synthetic images per fold": per_fold}
        metrics = source.metrics
        if metrics is not None and "fold" in metrics:
            metrics = metrics[metrics["fold"].isin(folds)]
        for column, label, scale in (("fid", "FID ↓", 1.0), ("kid_mean", "KID ×10³ ↓", 1e3)):
            row[label] = (_mean_std(metrics[column], scale, 2) if metrics is not None and column in metrics
                          else "n/a")
        for name in [ALL, *targets]:
            st = stats[(stats["strategy"] == strategy) & (stats["class"] == name)].iloc[0]
            cell = tables.format_cell(st["mean"], st["std"], int(st["n"]))
            row[f"{metric_label} {name}"] = cell if cell == "—" else f"{cell} (n={int(st['n'])})"
        if comparison is not None and strategy in comparison.columns:
            row[f"Δ vs {baseline} (pp), p"] = comparison.loc[ALL, strategy]
        rows.append(row)
    networks = "; ".join(f"{name}: {s.networks}" for name, s in sources.items() if s.error is None)
    labellers = "; ".join(f"{name}: {s.labeller}" for name, s in sources.items() if s.error is None)
    errors = "; ".join(f"{name}: {s.error}" for name, s in sources.items() if s.error is not None)
    box_note = ("class from the prompt (label_source)" if task == "classify"
                else "boxes of the synthetic images by (label_source)")
    caption = (
        f"Generator comparison: each strategy that trains on synthetic images, the generator that made them (the "
        f"synthetic manifest's `method`; lora where a manifest predates it) and the run they come from (synthetic_from; "
        f"same data and split, checked before training). FID and KID vs each fold's validation images of the target "
        f"classes, as the source run's evaluate stage wrote them: mean ± std over its (fold, class) rows of the folds "
        f"this strategy trained on (n = rows; n/a: no evaluate output there); feature networks: {networks or 'n/a'}. "
        f"{box_note.capitalize()}: {labellers or 'n/a'}. {metric_label} (%) mean ± std over folds and seeds "
        f"(n trials); Δ: the paired test against {baseline} of the comparison table (all classes)."
        + (f" Unreadable source runs: {errors}." if errors else ""))
    return pd.DataFrame(rows).set_index("strategy"), caption
