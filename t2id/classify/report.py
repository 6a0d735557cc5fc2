"""The report's content for run.task classify: the seed papers' layout (strategies x metrics, per class).

Tables (mean ± std over folds and seeds, sample std, n stated, as the detection report):
  - overall: one row per strategy, columns accuracy, balanced accuracy, macro F1, macro AUC (overall.csv);
  - per class: one table per metric (recall = sensitivity, F1, one-vs-rest AUC), classes as rows with
    "all classes" first (its recall is the balanced accuracy, its F1 the macro F1, its AUC the macro AUC),
    strategies as columns (table_ii.csv holds report.metric's table, the others table_<metric>.csv);
  - the paired comparison with report.baseline on report.metric: the exact sign-flip test over (fold, seed)
    differences (t2id.report.tables.sign_flip) and the image-level paired bootstrap interval
    (t2id.significance.paired_image_bootstrap over each trial's stored predictions, the metric recomputed by
    t2id.classify.metrics on every resample).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from t2id import layout
from t2id.classify.metrics import classification_metrics
from t2id.report import figures, tables
from t2id.report.build import (
    _read,
    class_names,
    contact_sheets,
    fold_statement,
    generator_block,
    networks_note,
    sample_rows,
    training_blocks,
)
from t2id.report.html import Block, Figure, Heading, Para, Table
from t2id.report.settings import ReportSettings
from t2id.significance import PairedFold, paired_image_bootstrap
from t2id.store import Store

ALL = tables.ALL
CLASS_METRICS = {"recall": "recall (sensitivity)", "f1": "F1", "auc": "one-vs-rest AUC", "precision": "precision"}
OVERALL = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1", "auc": "AUC"}
DETECTION_ONLY = ("map50_95", "map50")


def lead_metric(s: ReportSettings) -> str:
    """report.metric when it is a classification metric; else recall (its overall row: balanced accuracy)."""
    return "recall" if s.report.metric in DETECTION_ONLY else s.report.metric


def overall_table(trials: pd.DataFrame, strategies: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(strategies x overall metrics, 'mean ± std' in %; long stats with n)."""
    rows, stats = [], []
    for metric in OVERALL:
        st = tables.summary_stats(trials, metric, strategies, [ALL])
        st = st[st["class"] == ALL].assign(metric=metric)
        stats.append(st)
    stats_frame = pd.concat(stats, ignore_index=True)
    for strategy in strategies:
        cells = {"strategy": strategy}
        for metric, label in OVERALL.items():
            r = stats_frame[(stats_frame["strategy"] == strategy) & (stats_frame["metric"] == metric)].iloc[0]
            cells[label] = tables.format_cell(r["mean"], r["std"], int(r["n"]))
        rows.append(cells)
    return pd.DataFrame(rows).set_index("strategy"), stats_frame


def _metric_vector(target: np.ndarray, probs: np.ndarray, weights: np.ndarray, metric: str) -> np.ndarray:
    """[all classes, class 0, ..., class K-1] of `metric` on weighted predictions."""
    overall, per_class = classification_metrics(target, probs, weights, with_auc=metric == "auc")
    head = {"recall": "balanced_accuracy", "f1": "macro_f1", "auc": "auc"}.get(metric)
    first = overall[head] if head else float(np.mean([c[metric] for c in per_class]))
    return np.array([first, *[c[metric] for c in per_class]], dtype=float)


def image_bootstrap(store: Store, trials: pd.DataFrame, baseline: str, strategies: list[str], classes: list[str],
                    metric: str, resamples: int, confidence: float, seed: int) -> tuple[pd.DataFrame, str | None]:
    """Per (strategy, class): the image-level paired bootstrap interval of the mean difference to `baseline`."""
    rows = tables.with_seeds(trials[(trials["class"] == ALL) & (trials["status"].fillna("ok") == "ok")])
    preds: dict[tuple[int, str, int], pd.DataFrame] = {}
    for r in rows.itertuples():
        if not isinstance(r.predictions, str) or not store.exists(r.predictions):
            return pd.DataFrame(), f"the predictions of trial fold={r.fold} strategy={r.strategy} seed={r.seed} are missing"
        preds[(int(r.fold), str(r.strategy), int(r.seed))] = store.read_table(r.predictions).to_pandas()
    arrays = {key: (frame["target"].to_numpy(), np.stack(frame["probs"].to_numpy())) for key, frame in preds.items()}
    # paired_image_bootstrap runs once per (strategy, class) with the same seed, so every class (and every
    # strategy's baseline side) meets the same resamples again: one metric computation per (trial, resample).
    cache: dict[tuple, np.ndarray] = {}

    def vector(key: tuple[int, str, int], weights: np.ndarray) -> np.ndarray:
        memo = (key, weights.tobytes())
        if memo not in cache:
            cache[memo] = _metric_vector(*arrays[key], weights, metric)
        return cache[memo]

    out = []
    for strategy in strategies:
        if strategy == baseline:
            continue
        pairs: dict[int, list[int]] = {}
        for fold, name, s in sorted(preds):
            if name == strategy and (fold, baseline, s) in preds:
                if list(preds[(fold, name, s)]["image_id"]) != list(preds[(fold, baseline, s)]["image_id"]):
                    return pd.DataFrame(), f"fold {fold}: {strategy} and {baseline} were scored on different images"
                pairs.setdefault(fold, []).append(s)
        for index, name in enumerate([ALL, *classes]):
            folds = []
            for fold, seeds in pairs.items():
                n = len(preds[(fold, baseline, seeds[0])])

                def side(weights: np.ndarray, which: str, fold=fold, seeds=seeds, index=index) -> float:
                    return float(np.mean([vector((fold, which, s), weights)[index] for s in seeds]))

                folds.append(PairedFold(n, lambda w, side=side: side(w, strategy), lambda w, side=side: side(w, baseline)))
            row = {"strategy": strategy, "class": name, "boot_low": np.nan, "boot_high": np.nan, "boot_resamples": 0}
            if folds:
                ci = paired_image_bootstrap(folds, resamples, confidence, seed)
                row.update(boot_low=ci.low, boot_high=ci.high, boot_resamples=ci.resamples)
            out.append(row)
    return pd.DataFrame(out), None


def build_classify_report(store: Store, s: ReportSettings) -> tuple[list[Block], dict[str, pd.DataFrame]]:
    cfg = s.report
    trials = tables.with_seeds(store.read_table(layout.grid.trials).to_pandas())
    classes = class_names(store, trials)
    strategies = [name for name in s.strategies if name in set(trials["strategy"])]
    strategies += [name for name in dict.fromkeys(trials["strategy"]) if name not in strategies]
    metric = lead_metric(s)
    folds, seeds = tables.design(trials)
    clf = s.classifier
    stats = tables.summary_stats(trials, metric, strategies, classes)
    n_text = tables.n_statement(stats)
    csvs: dict[str, pd.DataFrame] = {"table_ii_stats.csv": stats}
    blocks: list[Block] = [Para(s.description)] if s.description else []
    blocks.append(Para(
        f"Run `{s.run_id}`, store `{store.root}`, task: image classification. Classifier `{clf.model}` "
        f"({'initialized from ' + clf.weights if clf.weights else 'random init, trained from scratch'}) at "
        f"{clf.imgsz} px, batch {clf.batch}, {clf.epochs} epochs; strategies: {', '.join(strategies)}. Trials: "
        f"{len(folds)} fold{'s' if len(folds) != 1 else ''} × {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"({', '.join(map(str, seeds))})."))

    blocks.append(Heading("Method"))
    fold_text, per_fold = fold_statement(store)
    blocks += [Para(t) for t in fold_text]
    blocks.append(Para(
        f"Every number comes from a `{clf.model}` classifier trained in that trial (fold, strategy, seed) and "
        "scored on the fold's validation images with its final weights (no epoch chosen on them). Synthetic images "
        "carry the class their prompt asked for (label_source: prompt; classification has no label stage). "
        "Sampling: rfs repeats image i r_c = max(1, sqrt(t / f_c)) times (LVIS), cas draws a class uniformly and "
        "then one of its images; class_weights weights the cross-entropy by N / (K n_c)." +
        (" " + networks_note(_read(store, layout.evaluate.metrics), store.read_table(layout.evaluate.metrics))
         if store.exists(layout.evaluate.metrics) else "")))
    training_blocks(blocks, csvs, trials, strategies, per_fold,
                    synthetic_caption="Synthetic images in each trial's training set (per fold and strategy; the "
                                      "maximum over seeds)",
                    budget_note="Compute budget: every strategy's epoch draws the same number of images (the fold's "
                                "real training images by default), so all strategies see as many images and take as "
                                "many optimizer steps; selection = final: the last epoch's model.")

    blocks.append(Heading("Classification results"))
    overall, overall_stats = overall_table(trials, strategies)
    csvs["overall.csv"] = overall.reset_index()
    csvs["overall_stats.csv"] = overall_stats
    blocks.append(Table(f"Overall metrics (%) per strategy, mean ± std over folds and seeds (ddof=1); {n_text}",
                        tables.paper_headers(overall.T).T, "overall.csv"))
    for name, label in CLASS_METRICS.items():
        if name == "precision" and metric != "precision":
            continue
        table = tables.table_ii(trials, name, strategies, classes)
        csv = "table_ii.csv" if name == metric else f"table_{name}.csv"
        csvs[csv] = table.reset_index()
        blocks.append(Table(f"{label} (%) per class and strategy, mean ± std over folds and seeds; the 'all classes' "
                            f"row is its macro mean{' (balanced accuracy)' if name == 'recall' else ''}; {n_text}",
                            tables.paper_headers(table), csv, best="max"))
    tests = None
    if cfg.baseline in strategies and len(strategies) > 1:
        tests = tables.sign_flip(trials, cfg.baseline, metric, cfg.alpha, strategies, classes, s.seed)
        boot, unavailable = image_bootstrap(store, trials, cfg.baseline, strategies, classes, metric,
                                            cfg.bootstrap_samples, cfg.confidence, s.seed)
        if unavailable is None and not boot.empty:
            tests = tests.merge(boot, on=["strategy", "class"], how="left")
        csvs["significance.csv"] = tests
        k = int(tests.loc[tests["n_pairs"] > 0, "n_folds"].max()) if (tests["n_pairs"] > 0).any() else 0
        blocks.append(Para(
            f"Difference to `{cfg.baseline}` in {CLASS_METRICS[metric]}, percentage points: mean of the paired "
            "(fold, seed) differences; p: exact sign-flip test over them, seeds of a fold flipping together; * marks "
            f"p <= {cfg.alpha:g}. {tables.min_p_statement(k, cfg.alpha)} " +
            (f"[low, high]: {cfg.confidence:.0%} image-level paired bootstrap interval ({cfg.bootstrap_samples} "
             "resamples of each fold's validation images, the same images for both strategies): evaluation noise "
             "only." if unavailable is None else f"No image-level interval: {unavailable}.")))
        blocks.append(Table(f"Δ {CLASS_METRICS[metric]} vs {cfg.baseline} (pp) [image-level CI] p; {n_text}",
                            tables.paper_headers(tables.comparison_table(tests, strategies, classes)),
                            "significance.csv"))
    generator_block(blocks, csvs, store, s, trials, strategies, classes, metric, CLASS_METRICS[metric], tests)
    timing = tables.training_time(trials, strategies)
    if not timing.empty:
        csvs["training_time.csv"] = timing
        blocks.append(Table("Training seconds per trial, by strategy", timing.set_index("strategy"),
                            "training_time.csv"))
    skipped = tables.skipped_trials(trials)
    if not skipped.empty:
        csvs["skipped_trials.csv"] = skipped
        blocks.append(Table("Skipped trials and why", skipped, "skipped_trials.csv"))

    blocks.append(Heading("Figures"))
    if store.exists(layout.data.class_distribution):
        blocks.append(Figure("Images per class (real data; an image-level label counts once per image). Look for the "
                             "long tail: the rare classes are what synthetic images and class-aware sampling target.",
                             "class_distribution.png", store.read_bytes(layout.data.class_distribution)))
    rare = [c for c in s.target_classes if c in classes]
    sheets = contact_sheets(store, s)
    for key in sheets:
        blocks.append(Figure(f"Real (left) vs synthetic (right) images of one class and fold ({key}).",
                             key.replace("/", "_"), store.read_bytes(key)))
    if not sheets and rare and (rows := sample_rows(store, classes, rare, cfg.samples_per_class)):
        blocks.append(Figure("Real vs synthetic images of the rare classes", "samples.png", figures.sample_sheet(rows)))
    blocks.append(Figure(f"{CLASS_METRICS[metric]} per class and strategy (mean ± std over folds and seeds; {n_text}). "
                         "Look for bars above the baseline's on the rare classes.", "per_class.png",
                         figures.per_class_bars(stats, strategies, [ALL, *classes], CLASS_METRICS[metric])))
    metrics = _read(store, layout.evaluate.metrics)
    if metrics is not None and not metrics.empty:
        csvs["image_metrics.csv"] = metrics
        blocks.append(Heading("Synthetic image quality"))
        blocks.append(Table("Image metrics per fold and class (evaluate stage)", metrics.round(4), "image_metrics.csv"))
    return blocks, csvs
