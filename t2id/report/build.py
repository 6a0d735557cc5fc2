"""The report's content: text, tables and figures from the run's store and the report settings.

Reads grid/trials.parquet and grid/pr_curves.parquet (required) and, when present, the data stage's
class counts, the split, the LoRA train ids, generate's images/contact sheets, label's memorization
similarities and evaluate's image metrics (every key from t2id.layout). Rendering and writing are
the stage's (t2id.report.html, t2id.report.stage).
"""

from __future__ import annotations

import io
import json

import pandas as pd
from PIL import Image

from t2id import layout
from t2id.report import figures, tables
from t2id.report.html import Block, Figure, Heading, Para, Table
from t2id.report.settings import ReportSettings
from t2id.store import Store

ALL = tables.ALL
METRIC_LABELS = {"map50_95": "mAP50-95", "map50": "mAP50", "precision": "precision", "recall": "recall"}
LABEL_METHODS = {
    "teacher": "pseudo-labelled by a detector trained on the fold's real training images (label.method: teacher)",
    "inpaint": "inherited from the real training image whose target-class boxes were inpainted "
               "(label.method: inpaint)",
}


# 1. Inputs -------------------------------------------------------------------------------------

def _read(store: Store, key: str) -> pd.DataFrame | None:
    return store.read_table(key).to_pandas() if store.exists(key) else None


def _folds(store: Store) -> list[int]:
    folds = _read(store, layout.split.folds)
    return [] if folds is None else sorted(int(f) for f in folds["fold"].unique())


def class_names(store: Store, trials: pd.DataFrame) -> list[str]:
    if store.exists(layout.data.classes):
        return list(json.loads(store.read_text(layout.data.classes))["names"])
    return [c for c in dict.fromkeys(trials["class"]) if c != ALL]


def rare_classes(s: ReportSettings, classes: list[str], counts: pd.DataFrame | None) -> list[str]:
    if s.report.rare_classes is not None:
        return [c for c in s.report.rare_classes if c in classes]
    targets = [name for name in s.target_classes if name in classes]
    if targets:
        return targets
    if counts is not None:
        return list(counts.sort_values("instances")["class"][:2])
    return classes[-2:]


def _load_image(store: Store, uri: str) -> Image.Image | None:
    try:
        return Image.open(io.BytesIO(store.read_bytes(store.key_of(uri)))).convert("L")
    except Exception:  # a missing or foreign image only thins the sample sheet
        return None


def _train_ids(store: Store, fold: int) -> set[str] | None:
    key = layout.lora.train_ids(fold)
    if not store.exists(key):
        return None
    return {str(i) for i in json.loads(store.read_text(key))["image_ids"]}


# 2. Method text ---------------------------------------------------------------------------------

def fold_statement(store: Store) -> tuple[list[str], pd.DataFrame | None]:
    """Sentences on how folds were grouped and on generator/validation separation, checked on the data."""
    folds = _read(store, layout.split.folds)
    if folds is None:
        return ["The split stage's folds are not available."], None
    per_fold = folds.groupby("fold").agg(images=("image_id", "count"), subjects=("group", "nunique")).reset_index()
    groups_in_many = int((folds.groupby("group")["fold"].nunique() > 1).sum())
    text = [
        f"Cross-validation: {per_fold.shape[0]} folds grouped by subject: every image of a subject is in "
        f"the same fold ({folds['group'].nunique()} subjects, {len(folds)} images; subjects found in more "
        f"than one fold: {groups_in_many}). Each fold is validated on its own images after training on the "
        "other folds; mean ± std in the tables are over folds (sample std)."
    ]
    checked, overlaps = [], 0
    for fold in sorted(per_fold["fold"]):
        ids = _train_ids(store, int(fold))
        if ids is None:
            continue
        val_ids = set(folds.loc[folds["fold"] == fold, "image_id"].astype(str))
        overlaps += len(ids & val_ids)
        checked.append(int(fold))
    if checked:
        text.append(
            "Per-fold generation: the LoRA generator of fold k was fine-tuned only on fold k's training part, "
            f"so it never saw fold k's validation images (checked against {layout.lora.train_ids('<k>')} for "
            f"folds {checked}: {overlaps} validation images among the generator's training images). Synthetic "
            "images of fold k are only added to fold k's training set."
        )
    else:
        text.append("Per-fold generation: each fold's generator is trained on that fold's training part only, "
                    "so it never sees that fold's validation images (no LoRA stage output in this run to check).")
    return text, per_fold


# 3. Fig. 3 inputs -------------------------------------------------------------------------------

def contact_sheets(store: Store, s: ReportSettings) -> list[str]:
    """generate's contact sheets (real vs synthetic, per fold and target class) that exist."""
    return sorted(key for fold in _folds(store) for name in s.target_classes
                  if store.exists(key := layout.generate.contact_sheet(fold, name)))


def sample_rows(store: Store, classes: list[str], rare: list[str], per_class: int) -> list[tuple]:
    manifest = _read(store, layout.data.manifest)
    synth = [t for t in (_read(store, layout.generate.manifest(fold)) for fold in _folds(store)) if t is not None]
    synthetic = pd.concat(synth) if synth else None
    rows = []
    for name in rare:
        cid = classes.index(name)
        real: list[Image.Image] = []
        if manifest is not None:
            holders = manifest[manifest["boxes"].map(lambda bs: any(int(b["class_id"]) == cid for b in bs))]
            real = [im for im in (_load_image(store, u) for u in holders["uri"][:per_class]) if im is not None]
        fake: list[Image.Image] = []
        if synthetic is not None and "class_id" in synthetic:
            sel = synthetic[(synthetic["class_id"] == cid) & synthetic.get("kept", True)]
            fake = [im for im in (_load_image(store, u) for u in sel["uri"][:per_class]) if im is not None]
        if real or fake:
            rows.append((name, real, fake))
    return rows


# 4. The report ----------------------------------------------------------------------------------

def build_report(store: Store, s: ReportSettings) -> tuple[list[Block], dict[str, pd.DataFrame]]:
    """The report's blocks (text, tables, figures) and the CSV tables, from the run's store."""
    cfg = s.report
    trials = store.read_table(layout.grid.trials).to_pandas()
    curves = _read(store, layout.grid.pr_curves)
    classes = class_names(store, trials)
    strategies = [name for name in s.strategies if name in set(trials["strategy"])]
    strategies += [name for name in dict.fromkeys(trials["strategy"]) if name not in strategies]
    metric, label = cfg.metric, METRIC_LABELS[cfg.metric]

    table = tables.table_ii(trials, metric, strategies, classes)
    stats = tables.summary_stats(trials, metric, strategies, classes)
    csvs: dict[str, pd.DataFrame] = {"table_ii.csv": table.reset_index(), "table_ii_stats.csv": stats}
    blocks: list[Block] = []
    if s.description:
        blocks.append(Para(s.description))
    detector = s.detector
    blocks += [Para(f"Run `{s.run_id}`, store `{store.root}`. Detector `{detector.model}` at "
                    f"{detector.imgsz} px, {detector.epochs} epoch{'s' if detector.epochs != 1 else ''}, "
                    f"batch {detector.batch}; strategies: {', '.join(strategies)}.")]
    blocks.append(Heading("Method"))
    fold_text, per_fold = fold_statement(store)
    blocks += [Para(t) for t in fold_text]
    label_keys = [k for k in (layout.label.labels(fold) for fold in _folds(store)) if store.exists(k)]
    if s.label_method is not None and label_keys:
        blocks.append(Para(f"Boxes of the synthetic images: {LABEL_METHODS[s.label_method]}."))
    if per_fold is not None:
        blocks.append(Table("Images and subjects per fold", per_fold.set_index("fold"), "folds.csv"))
        csvs["folds.csv"] = per_fold

    blocks.append(Heading(f"Detection results ({label}, Table II layout)"))
    blocks.append(Table(f"{label} (%) per class and strategy, mean ± std over folds",
                        tables.paper_headers(table), "table_ii.csv"))
    trained = tables.ok_rows(trials, metric)
    if not trained.empty and float(trained[metric].max()) == 0.0:
        blocks.append(Para(f"Every {label} is 0: no detector found any object on its validation fold. The "
                           f"training schedule is too short to learn (grid.detector.epochs = {detector.epochs}); "
                           "raise it for informative numbers."))
    if cfg.baseline in strategies and len(strategies) > 1:
        ci = tables.paired_bootstrap(trials, cfg.baseline, metric, cfg.bootstrap_samples, cfg.confidence, s.seed,
                                     strategies, classes)
        csvs["bootstrap_ci.csv"] = ci
        blocks.append(Para(
            f"Difference to `{cfg.baseline}` in percentage points: mean paired difference over folds and its "
            f"{cfg.confidence:.0%} paired bootstrap interval ({cfg.bootstrap_samples} resamples of the folds, "
            "pairs kept together; percentile interval). * marks intervals excluding 0. With few folds the "
            "interval is coarse: it can only take values spanned by the fold differences."))
        blocks.append(Table(f"Δ {label} vs {cfg.baseline} (pp) [{cfg.confidence:.0%} CI]",
                            tables.paper_headers(tables.bootstrap_table(ci, strategies, classes)),
                            "bootstrap_ci.csv"))
    else:
        blocks.append(Para(f"No paired comparison: strategy `{cfg.baseline}` is not in the grid."))
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
    manifest = _read(store, layout.data.manifest)
    counts = figures.class_counts(manifest, classes) if manifest is not None else None
    if store.exists(layout.data.class_distribution):
        png = store.read_bytes(layout.data.class_distribution)
    else:
        png = figures.class_distribution(counts) if counts is not None else None
    if png is not None:
        blocks.append(Figure("Fig. 2: instances and images per class (real data)", "class_distribution.png", png))
    rare = rare_classes(s, classes, counts)
    sheets = contact_sheets(store, s)
    if sheets:
        for key in sheets:
            blocks.append(Figure(f"Fig. 3: real vs synthetic ({key})", key.replace("/", "_"), store.read_bytes(key)))
    else:
        rows = sample_rows(store, classes, rare, cfg.samples_per_class)
        if rows:
            blocks.append(Figure("Fig. 3: real vs synthetic images of the rare classes", "samples.png",
                                 figures.sample_sheet(rows)))
    if curves is not None and not curves.empty and rare:
        blocks.append(Figure(f"Fig. 4: PR curves of {', '.join(rare)} per strategy (mean over folds)",
                             "pr_curves.png", figures.pr_curves(curves, rare, strategies)))
    blocks.append(Figure(f"{label} per class and strategy", "per_class.png",
                         figures.per_class_bars(stats, strategies, [ALL, *classes], label)))

    similarity = [store.read_table(k).to_pandas() for k in label_keys]
    similarity = [t["nn_similarity"] for t in similarity if "nn_similarity" in t]
    if similarity:
        blocks.append(Figure("Memorization check: similarity of each synthetic image to its nearest real "
                             "training image", "memorization.png",
                             figures.memorization_hist(pd.concat(similarity), s.memorization_threshold)))
    metrics = _read(store, layout.evaluate.metrics)
    if metrics is not None and not metrics.empty:
        csvs["image_metrics.csv"] = metrics
        blocks.append(Heading("Synthetic image quality"))
        blocks.append(Table("Image metrics per fold and class (evaluate stage)", metrics.round(4),
                            "image_metrics.csv"))
    return blocks, csvs
