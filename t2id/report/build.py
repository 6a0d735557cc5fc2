"""The report's content: text, tables and figures from the run's store and the report settings.

Reads grid/trials.parquet (required), grid/pr_curves.parquet and each trial's predictions.parquet
(its store key in the trials' `predictions` column) and, when present, the data stage's class
counts, the split, the LoRA train ids, generate's images/contact sheets, label's labels.parquet
(kept, reject_reason, memorization similarities) and evaluate's image metrics (every other key from
t2id.layout). Older trials tables (no seed, budget or predictions columns) still give a report:
one seed per fold, budgets "not recorded", p-values from the trials alone and no image-level
interval. Rendering and writing are the stage's (t2id.report.html, t2id.report.stage).
"""

from __future__ import annotations

import io
import json

import pandas as pd
from PIL import Image

from t2id import layout
from t2id.report import figures, image_bootstrap, tables
from t2id.report.html import Block, Figure, Heading, Para, Table
from t2id.report.settings import ReportSettings
from t2id.store import Store

ALL = tables.ALL
METRIC_LABELS = {"map50_95": "mAP50-95", "map50": "mAP50", "precision": "precision", "recall": "recall"}
LABEL_METHODS = {
    "teacher": "pseudo-labelled by a detector trained on the fold's real training images (label.method: teacher)",
    "inpaint": "inherited from the real training image whose target-class boxes were inpainted "
               "(label.method: inpaint)",
    "inpaint_outpaint": "inherited from the real training image whose target-class boxes were inpainted and whose "
                        "surroundings were then outpainted, for the boxes wholly inside the kept rectangle "
                        "(label.method: inpaint_outpaint; the regenerated border may hold unlabelled structures)",
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
    if store.exists(layout.data.manifest):
        from t2id.split.leakcheck import leak_check

        check = leak_check(store).describe()  # the data manifest's subjects against the folds, not folds' own copy
    else:
        groups_in_many = int((folds.groupby("group")["fold"].nunique() > 1).sum())
        check = (f"subjects in more than one fold: {groups_in_many}, from the split's own group column only "
                 "(no data manifest to check it against)")
    text = [
        f"Cross-validation: {per_fold.shape[0]} folds grouped by subject: every image of a subject is in "
        f"the same fold ({folds['group'].nunique()} subjects, {len(folds)} images; {check}). Each fold is "
        "validated on its own images after training on the other folds."
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

# 3b. Synthetic images: label method, gate rejections, images used ------------------------------

def _reject_kind(reason: object) -> str:
    from t2id.label.teacher import REJECT_NOT_FOUND

    text = "" if reason is None or (isinstance(reason, float) and pd.isna(reason)) else str(reason)
    if text.startswith("memorized"):
        return "memorization"
    if text.startswith(REJECT_NOT_FOUND):
        return "teacher"
    return "quality"


def label_counts(store: Store, classes: list[str]) -> pd.DataFrame | None:
    """Per fold x class from label/fold=<k>/labels.parquet: generated, rejections by gate, images used.

    teacher_rejection_rate = teacher-gate rejections / images that reached the teacher (not rejected
    by generate's quality gate before); topped_up = candidates made by label's top-up rounds after its
    rejections; used = kept with at least one box (what *_sdxl trials train on); target and shortfall
    from the label stage's per-class counts (schema metadata), when recorded.
    """
    from t2id.label.stage import CLASS_COUNTS_KEY

    rows = []
    for fold in _folds(store):
        key = layout.label.labels(fold)
        if not store.exists(key):
            continue
        table = store.read_table(key)
        labels = table.to_pandas()
        if labels.empty or "class_id" not in labels:
            continue
        metadata = table.schema.metadata or {}
        targets = {int(c["class_id"]): c for c in json.loads(metadata.get(CLASS_COUNTS_KEY, b"[]"))}
        labels = labels.assign(kind=[_reject_kind(r) if not k else "" for r, k in
                                     zip(labels.get("reject_reason", pd.Series([None] * len(labels))),
                                         labels["kept"].fillna(False))])
        for cid, part in labels.groupby("class_id"):
            quality = int((part["kind"] == "quality").sum())
            teacher = int((part["kind"] == "teacher").sum())
            reached = len(part) - quality
            boxes = part["boxes"] if "boxes" in part else pd.Series([[1]] * len(part), index=part.index)
            used = int((part["kept"].fillna(False) & boxes.map(lambda b: b is not None and len(b) > 0)).sum())
            rows.append({
                "fold": int(fold), "class": classes[int(cid)] if 0 <= int(cid) < len(classes) else str(cid),
                "generated": len(part), "quality_rejected": quality, "teacher_rejected": teacher,
                "teacher_rejection_rate": round(teacher / reached, 3) if reached else float("nan"),
                "memorization_rejected": int((part["kind"] == "memorization").sum()),
                "memorization_flagged": int(part["memorized"].fillna(False).sum()) if "memorized" in part else 0,
                "topped_up": int((part["round"].fillna(0) > 0).sum()) if "round" in part else 0,
                "used": used,
                "target": targets.get(int(cid), {}).get("target", float("nan")),
                "shortfall": targets.get(int(cid), {}).get("shortfall", float("nan")),
                "label_source": ", ".join(str(v) for v in dict.fromkeys(part.get("label_source", pd.Series()).dropna()))
                                or "not recorded",
            })
    return pd.DataFrame(rows) if rows else None


def layout_fidelity(store: Store) -> pd.DataFrame | None:
    """Per fold x class from label/fold=<k>/layout_fidelity.json (lora.method layout_lora): requested boxes,
    those the fold's real-data teacher found as their class with IoU >= lora.layout.fidelity_iou, the fraction."""
    rows = []
    for fold in _folds(store):
        key = layout.label.layout_fidelity(fold)
        if store.exists(key):
            for c in json.loads(store.read_text(key))["classes"]:
                rows.append({"fold": int(fold), "class": c["class"], "images": c["images"],
                             "requested_boxes": c["requested"], "matched": c["matched"],
                             "layout_fidelity": c["fidelity"]})
    return pd.DataFrame(rows) if rows else None


def networks_note(metrics: pd.DataFrame | None, raw) -> str:
    """Which networks computed the image metrics: evaluate's `networks` column or schema note, else unknown."""
    notes: list[str] = []
    if metrics is not None and "networks" in metrics:
        notes = [str(v) for v in dict.fromkeys(metrics["networks"].dropna())]
    elif raw is not None and raw.schema.metadata and b"networks" in raw.schema.metadata:
        notes = [raw.schema.metadata[b"networks"].decode()]
    if notes:
        return "Image metrics (FID/KID/IS/CLIP score) were computed with: " + "; ".join(notes) + "."
    return ("Image metrics (FID/KID/IS/CLIP score): which networks computed them (real weights or random stand-ins) "
            "is not recorded by the evaluate stage: unknown; do not compare them with published values.")


# 3c. Per-image predictions for the image-level bootstrap -----------------------------------------

def trial_predictions(store: Store, trials: pd.DataFrame, n_classes: int,
                      ) -> tuple[dict[image_bootstrap.Key, image_bootstrap.TrialMatches], str | None]:
    """Every trained trial's predictions, matched; or ({}, why the image-level bootstrap is unavailable)."""
    rows = tables.with_seeds(trials[trials["class"] == ALL])
    if "status" in rows:
        rows = rows[rows["status"].fillna("ok") == "ok"]
    if "predictions" not in rows:
        return {}, "trials.parquet has no `predictions` column (a grid from before per-image predictions were stored)"
    out = {}
    for r in rows.itertuples():
        key = r.predictions
        if not isinstance(key, str) or not key or not store.exists(key):
            return {}, f"the predictions of trial fold={r.fold} strategy={r.strategy} seed={r.seed} are missing"
        frame = store.read_table(key).to_pandas()
        out[(int(r.fold), str(r.strategy), int(r.seed))] = image_bootstrap.TrialMatches(frame, n_classes)
    return (out, None) if out else ({}, "no trained trial has predictions")


def comparison(store: Store, s: ReportSettings, trials: pd.DataFrame, strategies: list[str],
               classes: list[str]) -> tuple[pd.DataFrame, str | None]:
    """Sign-flip p-values (always) joined with the image-level bootstrap interval (when possible)."""
    cfg = s.report
    tests = tables.sign_flip(trials, cfg.baseline, cfg.metric, cfg.alpha, strategies, classes, s.seed)
    if cfg.metric not in image_bootstrap.METRICS:
        return tests, f"the image-level bootstrap recomputes mAP only, not {cfg.metric}"
    matches, why = trial_predictions(store, trials, len(classes))
    if why is not None:
        return tests, why
    try:
        boot = image_bootstrap.bootstrap(matches, cfg.baseline, strategies, classes, cfg.metric,
                                         cfg.bootstrap_samples, cfg.confidence, s.seed)
    except ValueError as exc:  # e.g. two strategies scored on different images: no pairs to keep
        return tests, str(exc)
    return tests.merge(boot, on=["strategy", "class"], how="left"), None


# 4. The report ----------------------------------------------------------------------------------

def _seeds_text(seeds: list[int]) -> str:
    if seeds == [tables.NO_SEED]:
        return "one seed per trial, not recorded in trials.parquet (a grid from before seeds were a grid axis)"
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} per fold and strategy ({', '.join(map(str, seeds))})"


def training_blocks(blocks: list, csvs: dict, trials, strategies: list[str], per_fold, synthetic_caption: str,
                    budget_note: str) -> None:
    """What every trial trained on and with (both tasks' reports): synthetic images per trial, images and subjects
    per fold, and the compute budget per strategy, each with its CSV."""
    used = tables.synthetic_per_trial(trials, strategies)
    if not used.empty:
        csvs["synthetic_per_trial.csv"] = used.reset_index()
        blocks.append(Table(synthetic_caption, used, "synthetic_per_trial.csv"))
    if per_fold is not None:
        blocks.append(Table("Images and subjects per fold", per_fold.set_index("fold"), "folds.csv"))
        csvs["folds.csv"] = per_fold
    budget = tables.budgets(trials, strategies)
    if not budget.empty:
        csvs["budgets.csv"] = budget
        blocks.append(Para(budget_note))
        blocks.append(Table("Budget and compute per strategy", budget.set_index("strategy"), "budgets.csv"))


def generator_block(blocks: list, csvs: dict, store: Store, s: ReportSettings, trials, strategies: list[str],
                    classes: list[str], metric: str, label: str, tests) -> None:
    """The generator comparison table (both tasks' reports) when the grid trains on synthetic images."""
    from t2id.report.generators import generator_table

    found = generator_table(store, s.synthetic_sources, trials, strategies, classes, s.target_classes, metric,
                            label, tests, s.report.baseline, s.task)
    if found is not None:
        table, caption = found
        csvs["generators.csv"] = table.reset_index()
        blocks.append(Table(caption, table, "generators.csv"))


def build_report(store: Store, s: ReportSettings) -> tuple[list[Block], dict[str, pd.DataFrame]]:
    """The report's blocks (text, tables, figures) and the CSV tables, from the run's store."""
    cfg = s.report
    trials = tables.with_seeds(store.read_table(layout.grid.trials).to_pandas())
    curves = _read(store, layout.grid.pr_curves)
    classes = class_names(store, trials)
    strategies = [name for name in s.strategies if name in set(trials["strategy"])]
    strategies += [name for name in dict.fromkeys(trials["strategy"]) if name not in strategies]
    metric, label = cfg.metric, METRIC_LABELS[cfg.metric]
    folds, seeds = tables.design(trials)

    table = tables.table_ii(trials, metric, strategies, classes)
    stats = tables.summary_stats(trials, metric, strategies, classes)
    n_text = tables.n_statement(stats)
    csvs: dict[str, pd.DataFrame] = {"table_ii.csv": table.reset_index(), "table_ii_stats.csv": stats}
    blocks: list[Block] = []
    if s.description:
        blocks.append(Para(s.description))
    detector = s.detector
    blocks += [Para(f"Run `{s.run_id}`, store `{store.root}`. Detector `{detector.model}` at "
                    f"{detector.imgsz} px, batch {detector.batch} (grid.detector.epochs = {detector.epochs}; the "
                    f"compute each trial used is in the budget table); strategies: {', '.join(strategies)}. "
                    f"Trials: {len(folds)} fold{'s' if len(folds) != 1 else ''} × {_seeds_text(seeds)}.")]

    blocks.append(Heading("Method"))
    fold_text, per_fold = fold_statement(store)
    blocks += [Para(t) for t in fold_text]
    blocks.append(Para(
        f"Networks: every detection number comes from a `{detector.model}` detector trained in that trial "
        f"(fold, strategy, seed). " + networks_note(_read(store, layout.evaluate.metrics),
                                                    store.read_table(layout.evaluate.metrics)
                                                    if store.exists(layout.evaluate.metrics) else None)))
    counts_table = label_counts(store, classes)
    if s.label_method is not None and counts_table is not None:
        blocks.append(Para(f"Boxes of the synthetic images: {LABEL_METHODS[s.label_method]}."))
    elif counts_table is not None:
        blocks.append(Para("Boxes of the synthetic images: label method not in this run's settings; "
                           f"labels.parquet records: {', '.join(sorted(set(counts_table['label_source'])))}."))
    if counts_table is not None:
        csvs["synthetic_images.csv"] = counts_table
        rate = counts_table["teacher_rejected"].sum() / max(1, (counts_table["generated"]
                                                                - counts_table["quality_rejected"]).sum())
        blocks.append(Para(
            "Synthetic images per fold and class (label stage): generated, rejected by generate's quality gate, "
            f"by the teacher gate (overall rejection rate {rate:.1%} of the images that reached it; per class "
            "below) and by the memorization check; the candidates label's top-up rounds made after those "
            "rejections (until the target was used or label.max_attempts_factor x target were tried); the images "
            "actually used for training (kept with boxes) and the shortfall against the target. "
            f"In total {int(counts_table['used'].sum())} of {int(counts_table['generated'].sum())} generated images "
            f"were used; {int(counts_table['memorization_rejected'].sum())} were rejected as memorized; "
            f"{int(counts_table['topped_up'].sum())} were made by top-up; total shortfall "
            f"{int(counts_table['shortfall'].fillna(0).sum())}."))
        blocks.append(Table("Synthetic images per fold and class: rejections and images used",
                            counts_table.set_index("fold"), "synthetic_images.csv"))
    fidelity = layout_fidelity(store)
    if fidelity is not None:
        csvs["layout_fidelity.csv"] = fidelity
        blocks.append(Para(
            "Layout fidelity (lora.method: layout_lora): each synthetic image was asked for boxes in its prompt "
            "(location tokens, GeoDiffusion) and keeps them as its labels; a requested box counts as drawn when the "
            "fold's teacher, a detector trained on the fold's real training images only, detects its class with "
            "IoU >= lora.layout.fidelity_iou (0.5 by default, as mAP50). Fidelity = drawn / requested."))
        blocks.append(Table("Layout fidelity per fold and class", fidelity.set_index("fold"), "layout_fidelity.csv"))
    training_blocks(blocks, csvs, trials, strategies, per_fold,
                    synthetic_caption="Synthetic images in each trial's training set (grid n_synthetic, per fold and "
                                      "strategy; the maximum over seeds)",
                    budget_note="Compute budget: each trial trains for its budget (budget_unit: optimizer steps or "
                                "images seen) and reports the optimizer steps and images it actually used; equal "
                                "budgets across strategies make their differences a comparison of data, not of "
                                "training length. selection = which checkpoint was scored (final: the last epoch's "
                                "model, never chosen on the reported fold). Ranges are over folds and seeds.")

    blocks.append(Heading(f"Detection results ({label}, Table II layout)"))
    blocks.append(Table(f"{label} (%) per class and strategy, mean ± std over folds and seeds (sample std, ddof=1); "
                        f"{n_text}; the best mean per class is highlighted", tables.paper_headers(table),
                        "table_ii.csv", best="max"))
    trained = tables.ok_rows(trials, metric)
    if not trained.empty and float(trained[metric].max()) == 0.0:
        blocks.append(Para(f"Every {label} is 0: no detector found any object on its validation fold. The "
                           f"training schedule is too short to learn (grid.detector.epochs = {detector.epochs}); "
                           "raise it for informative numbers."))
    tests = None
    if cfg.baseline in strategies and len(strategies) > 1:
        tests, unavailable = comparison(store, s, trials, strategies, classes)
        csvs["significance.csv"] = tests
        k = int(tests.loc[tests["n_pairs"] > 0, "n_folds"].max()) if (tests["n_pairs"] > 0).any() else 0
        interval = (f"[low, high] is the {cfg.confidence:.0%} image-level paired bootstrap interval of the "
                    f"difference ({cfg.bootstrap_samples} resamples of each fold's validation images, the same "
                    "images for both strategies and every seed; percentile interval). It reflects evaluation "
                    "noise only (which validation images were drawn), not training noise, and never sets the mark."
                    if unavailable is None else f"The image-level bootstrap interval is unavailable: {unavailable}.")
        blocks.append(Para(
            f"Difference to `{cfg.baseline}` in percentage points: mean of the paired (fold, seed) differences. "
            "p is the two-sided p-value of an exact sign-flip permutation test over those differences, the seeds "
            f"of a fold flipping together (clusters = folds, so its n is the number of folds); * marks p <= alpha "
            f"= {cfg.alpha:g} (report.alpha), and only those. {tables.min_p_statement(k, cfg.alpha)} " + interval))
        blocks.append(Table(f"Δ {label} vs {cfg.baseline} (pp) [image-level CI] p (sign-flip test); {n_text}",
                            tables.paper_headers(tables.comparison_table(tests, strategies, classes)),
                            "significance.csv"))
    else:
        blocks.append(Para(f"No paired comparison: strategy `{cfg.baseline}` is not in the grid."))
    generator_block(blocks, csvs, store, s, trials, strategies, classes, metric, label, tests)
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
        blocks.append(Figure("Fig. 2: instances and images per class (real data). Look for the long tail: the rare classes "
                             "(few instances) are the ones synthetic images and class-aware sampling target.",
                             "class_distribution.png", png))
    rare = rare_classes(s, classes, counts)
    sheets = contact_sheets(store, s)
    if sheets:
        for key in sheets:
            blocks.append(Figure(f"Fig. 3: real (left) vs synthetic (right) images of one class and fold ({key}). Look "
                                 "for the class's shape and echo texture in the synthetic column, and for exact "
                                 "copies of real images (memorization).", key.replace("/", "_"),
                                 store.read_bytes(key)))
    else:
        rows = sample_rows(store, classes, rare, cfg.samples_per_class)
        if rows:
            blocks.append(Figure("Fig. 3: real vs synthetic images of the rare classes", "samples.png",
                                 figures.sample_sheet(rows)))
    if curves is not None and not curves.empty and rare:
        blocks.append(Figure(f"Fig. 4: PR curves of {', '.join(rare)} per strategy (mean over folds and seeds, IoU 0.5). "
                             "Look for curves above the baseline's: more of the rare class found at the same "
                             "precision.",
                             "pr_curves.png", figures.pr_curves(curves, rare, strategies)))
    blocks.append(Figure(f"{label} per class and strategy (mean ± std over folds and seeds, ddof=1; {n_text}). Look "
                         "for bars above the baseline's on the rare classes, and whether the error bars overlap.",
                         "per_class.png", figures.per_class_bars(stats, strategies, [ALL, *classes], label)))

    # The label stage draws this figure (label/memorization_hist.png); redraw it with the same code only
    # for a run whose label stage predates it.
    png = store.read_bytes(layout.label.memorization_hist) if store.exists(layout.label.memorization_hist) else None
    if png is None:
        label_keys = [k for k in (layout.label.labels(fold) for fold in _folds(store)) if store.exists(k)]
        similarity = [store.read_table(k).to_pandas() for k in label_keys]
        similarity = [t["nn_similarity"] for t in similarity if "nn_similarity" in t]
        if similarity and s.memorization_threshold is not None:
            from t2id.label.memorization import histogram_png

            png = histogram_png(pd.concat(similarity).to_numpy(dtype=float), s.memorization_threshold)
    if png is not None:
        blocks.append(Figure("Memorization check: similarity of each synthetic image to its nearest real "
                             "training image. Look for mass near the threshold line: images right of it are "
                             "flagged as copies of a training image.", "memorization.png", png))
    metrics = _read(store, layout.evaluate.metrics)
    if metrics is not None and not metrics.empty:
        csvs["image_metrics.csv"] = metrics
        blocks.append(Heading("Synthetic image quality"))
        blocks.append(Table("Image metrics per fold and class (evaluate stage)", metrics.round(4),
                            "image_metrics.csv"))
    return blocks, csvs
