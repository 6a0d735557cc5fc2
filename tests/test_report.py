"""The report: Table II over folds x seeds, sign-flip p-values with an honest mark, the image-level
bootstrap from stored predictions, budgets and synthetic-image counts; a self-contained index.html.

Fixtures follow the grid/report contract (issue 15): trials.parquet with one row per (fold, strategy,
seed, class) and a predictions.parquet per trial, written here, not by the grid.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from t2id import layout
from t2id.config import validate_config
from t2id.data.manifest import IMAGE_SCHEMA
from t2id.detect import coco_map
from t2id.label.stage import CLASS_COUNTS_KEY, class_counts
from t2id.report import image_bootstrap, tables
from t2id.runner import StageContext

CLASSES = ["thyroid cartilage", "tracheal ring", "vocal fold"]
STRATEGIES = ["baseline", "cas", "noisy", "t2id_cas"]
ALL = tables.ALL
# Box-centre jitter of each strategy's predictions: cas localizes far better than baseline; noisy alike.
JITTER = {"baseline": 0.05, "cas": 0.004, "noisy": 0.05}
BOX = {"class_id": pa.int32(), "x": pa.float32(), "y": pa.float32(), "w": pa.float32(), "h": pa.float32()}
PREDICTIONS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("gt", pa.list_(pa.struct(BOX))),
    pa.field("pred", pa.list_(pa.struct({**BOX, "conf": pa.float32()}))),
])


def predictions(fold: int, strategy: str, seed: int, n_images: int = 12) -> pd.DataFrame:
    """Validation predictions of one trial: the same images and boxes for every strategy of a fold."""
    truth = np.random.default_rng(100 + fold)
    noise = np.random.default_rng([fold, seed, STRATEGIES.index(strategy)])
    rows = []
    for i in range(n_images):
        gt = [{"class_id": c, "x": float(truth.uniform(0.2, 0.8)), "y": float(truth.uniform(0.2, 0.8)),
               "w": 0.15, "h": 0.15} for c in ((i % 3,) if i % 4 else (i % 3, (i + 1) % 3))]
        pred = [{**g, "x": g["x"] + float(noise.normal(0, JITTER[strategy])),
                 "y": g["y"] + float(noise.normal(0, JITTER[strategy])), "conf": float(noise.uniform(0.3, 1.0))}
                for g in gt]
        pred.append({"class_id": int(noise.integers(3)), "x": 0.5, "y": 0.5, "w": 0.3, "h": 0.3,
                     "conf": float(noise.uniform(0.0, 0.4))})
        rows.append({"image_id": f"f{fold}-img{i:02d}", "gt": gt, "pred": pred})
    return pd.DataFrame(rows)


def scores(frame: pd.DataFrame) -> coco_map.MapResult:
    return coco_map.mean_average_precision(image_bootstrap.TrialMatches(frame, len(CLASSES)).matches)


def trials_table(folds: int = 2, seeds: tuple[int, ...] = (0, 1), store=None) -> pd.DataFrame:
    """The contract's trials.parquet; mAP from the trials' predictions (written to `store` if given)."""
    rows = []
    for fold in range(folds):
        for strategy in STRATEGIES:
            for seed in seeds:
                skipped = strategy == "t2id_cas"
                result = None
                if not skipped:
                    frame = predictions(fold, strategy, seed)
                    result = scores(frame)
                    if store is not None:
                        store.write_table(layout.grid.predictions(fold, strategy, seed),
                                          pa.Table.from_pandas(frame, schema=PREDICTIONS_SCHEMA, preserve_index=False))
                for i, name in enumerate([ALL, *CLASSES]):
                    value = (None if skipped else result.map50_95 if i == 0 else result.per_class[i - 1][0])
                    rows.append({
                        "fold": fold, "strategy": strategy, "seed": seed, "class": name,
                        "map50_95": value, "map50": value, "precision": value, "recall": value,
                        "train_seconds": None if skipped else 10.0 + fold, "n_synthetic": 0 if skipped else 6,
                        "budget_unit": "optimizer_steps", "budget": 120, "optimizer_steps": None if skipped else 120,
                        "images_seen": None if skipped else 120 * 16 + 16 * (strategy == "cas"),
                        "selection": "final",
                        "predictions": "" if skipped else layout.grid.predictions(fold, strategy, seed),
                        "status": "skipped" if skipped else "ok",
                        "reason": "needs synthetic images: none" if skipped else ""})
    return pd.DataFrame(rows)


def simple_trials(deltas: np.ndarray, base: np.ndarray) -> pd.DataFrame:
    """trials of baseline and cas for (fold, seed) arrays of values; cas = baseline + delta."""
    rows = []
    for fold in range(base.shape[0]):
        for seed in range(base.shape[1]):
            for strategy, value in (("baseline", base[fold, seed]), ("cas", base[fold, seed] + deltas[fold, seed])):
                rows.append({"fold": fold, "strategy": strategy, "seed": seed, "class": ALL, "map50_95": value,
                             "status": "ok", "train_seconds": 1.0})
    return pd.DataFrame(rows)


def test_table_ii_mean_std_over_folds_and_seeds_with_n():
    trials = trials_table()
    table = tables.table_ii(trials, "map50_95", STRATEGIES, CLASSES)
    assert list(table.index) == [ALL, *CLASSES] and list(table.columns) == STRATEGIES
    values = trials[(trials["strategy"] == "cas") & (trials["class"] == ALL)]["map50_95"].to_numpy()
    assert len(values) == 4  # 2 folds x 2 seeds
    assert table.loc[ALL, "cas"] == f"{values.mean() * 100:.1f} ± {values.std(ddof=1) * 100:.1f}"
    assert (table["t2id_cas"] == "—").all()  # skipped everywhere: shown, not dropped
    stats = tables.summary_stats(trials, "map50_95", STRATEGIES, CLASSES)
    assert tables.n_statement(stats) == "n = 2 folds × 2 seeds = 4 trials per cell"


def test_mark_appears_for_a_strong_effect_with_8_folds_and_never_with_2():
    rng = np.random.default_rng(0)
    strong = 0.10 + rng.normal(0, 0.01, (8, 2))  # +10 pp on every fold and seed
    base = rng.uniform(0.3, 0.5, (8, 2))
    tests = tables.sign_flip(simple_trials(strong, base), alpha=0.05, classes=[])
    row = tests.iloc[0]
    assert (row.n_folds, row.n_seeds, row.n_pairs) == (8, 2, 16)
    assert row.p_value == pytest.approx(2 / 2 ** 8) and row.significant
    assert row.mean_diff == pytest.approx(strong.mean())
    assert tables.comparison_table(tests, ["cas"], []).loc[ALL, "cas"].endswith("p=0.00781 *")
    # With 2 folds no effect, however large and however many seeds, can be marked: p >= 0.5.
    for seeds in (1, 3):
        two = tables.sign_flip(simple_trials(np.full((2, seeds), 0.5), base[:2, :1].repeat(seeds, 1)),
                               alpha=0.05, classes=[]).iloc[0]
        assert two.p_value == pytest.approx(0.5) and not two.significant and two.min_p == 0.5
        assert "*" not in tables.comparison_table(pd.DataFrame([two]), ["cas"], []).loc[ALL, "cas"]
    assert tables.min_p_statement(2, 0.05) == ("With 2 folds the smallest possible p is 0.5; no difference can be "
                                              "significant at alpha = 0.05, however large.")
    # a stricter alpha takes the 8-fold mark away again
    assert not tables.sign_flip(simple_trials(strong, base), alpha=0.005, classes=[]).iloc[0].significant


def test_image_bootstrap_pairs_images_and_matches_the_trials_means():
    trials = trials_table(folds=2, seeds=(0, 1))
    matches = {(f, s, seed): image_bootstrap.TrialMatches(predictions(f, s, seed), len(CLASSES))
               for f in range(2) for s in ("baseline", "cas", "noisy") for seed in (0, 1)}
    boot = image_bootstrap.bootstrap(matches, "baseline", ["baseline", "cas", "noisy"], CLASSES, resamples=300,
                                     seed=0).set_index(["strategy", "class"])
    tests = tables.sign_flip(trials, strategies=["baseline", "cas", "noisy"], classes=CLASSES)
    tests = tests.set_index(["strategy", "class"])
    for key in boot.index:  # the bootstrap's observed difference is the trials' mean paired difference
        assert boot.loc[key, "boot_mean"] == pytest.approx(tests.loc[key, "mean_diff"], abs=1e-9)
    cas = boot.loc[("cas", ALL)]
    assert cas.boot_folds == 2 and cas.boot_resamples == 300
    assert 0 < cas.boot_low <= cas.boot_mean <= cas.boot_high  # cas localizes far better
    noisy = boot.loc[("noisy", ALL)]
    assert noisy.boot_low < 0 < noisy.boot_high
    # Same seed, same interval; a strategy scored on other images cannot be paired.
    again = image_bootstrap.bootstrap(matches, "baseline", ["cas"], CLASSES, resamples=300, seed=0)
    assert again.set_index(["strategy", "class"]).loc[("cas", ALL), "boot_low"] == cas.boot_low
    matches[(0, "cas", 0)] = image_bootstrap.TrialMatches(predictions(0, "cas", 0, n_images=5), len(CLASSES))
    with pytest.raises(ValueError, match="different images"):
        image_bootstrap.bootstrap(matches, "baseline", ["cas"], CLASSES, resamples=10)


def _png(value: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _fill_run(store, trials: pd.DataFrame | None = None) -> None:
    """A run's upstream outputs as the other stages publish them (2 folds, 4 subjects)."""
    store.write_text(layout.data.classes, json.dumps({"names": CLASSES}))
    rows, folds = [], []
    for i in range(8):
        key = layout.data.image(f"real{i}", ".png")
        store.write_bytes(key, _png(40 + 20 * i))
        cls = [0, 1] if i % 2 else [0, 2]
        rows.append({"image_id": f"real{i}", "uri": store.uri(key), "width": 32, "height": 32,
                     "group": f"s{i // 2}", "source": "real",
                     "boxes": [{"class_id": c, "x": 0.5, "y": 0.5, "w": 0.2, "h": 0.2} for c in cls],
                     "sha256": "0" * 64})
        folds.append({"image_id": f"real{i}", "fold": (i // 2) % 2, "group": f"s{i // 2}"})
    store.write_table(layout.data.manifest, pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
    store.write_table(layout.split.folds, pa.Table.from_pylist(folds))
    box = [{"class_id": 2, "x": 0.5, "y": 0.5, "w": 0.2, "h": 0.2}]
    # per fold: 6 generated vocal-fold images; 1 fails the quality gate, 2 the teacher gate, 1 is memorized
    verdicts = [(True, None), (True, None), ("quality", "std,entropy"),
                ("teacher", "target class not found: no 'vocal fold' box with confidence >= 0.25"),
                ("teacher", "target class not found: no 'vocal fold' box with confidence >= 0.25"),
                ("memorized", "memorized: pixel similarity 0.990 >= 0.95 to real1")]
    for fold in (0, 1):
        train = [f["image_id"] for f in folds if f["fold"] != fold]
        store.write_text(layout.lora.train_ids(fold), json.dumps({"fold": fold, "image_ids": train}))
        synth = []
        for j, (kept, reason) in enumerate(verdicts):
            key = layout.generate.image(fold, "vocal fold", str(j))
            store.write_bytes(key, _png(200 - 30 * j))
            synth.append({"uri": store.uri(key), "class_id": 2, "kept": kept is True,
                          "boxes": box if kept is True or kept == "memorized" else [], "reject_reason": reason,
                          "label_source": "teacher", "nn_similarity": 0.5 + 0.08 * j, "memorized": kept == "memorized",
                          "round": int(j >= 4)})  # the last two came from a top-up round
        store.write_table(layout.generate.manifest(fold), pa.Table.from_pylist(synth))
        counts = json.dumps(class_counts(synth, CLASSES, target=4))
        store.write_table(layout.label.labels(fold), pa.Table.from_pylist(synth).replace_schema_metadata(
            {CLASS_COUNTS_KEY: counts}))
    store.write_table(layout.evaluate.metrics, pa.Table.from_pylist(
        [{"fold": 0, "class": "vocal fold", "fid": 12.5, "kid": 0.01, "clip_score": 28.1}]))
    trials = trials_table(store=store) if trials is None else trials
    store.write_table(layout.grid.trials, pa.Table.from_pandas(trials, preserve_index=False))
    recall = np.linspace(0, 1, 11)
    curves = [{"fold": f, "strategy": s, "seed": seed, "class": c, "recall": float(r), "precision": float(1 - 0.5 * r)}
              for f in range(2) for s in ("baseline", "cas") for seed in (0, 1) for c in CLASSES for r in recall]
    store.write_table(layout.grid.pr_curves, pa.Table.from_pylist(curves))


def _run_report(store, tmp_path, **report):
    from t2id.report.stage import STAGE

    config = validate_config({"run": {"id": "r", "description": "unit run"},
                              "grid": {"strategies": ["baseline", "cas", "t2id_cas"]},
                              "report": {"bootstrap_samples": 200, **report}})
    ctx = StageContext(store=store, stage="report", cache_dir=tmp_path / "cache")
    return STAGE.run(ctx, STAGE.settings(config))


def test_report_stage_writes_self_contained_html_with_every_figure(store, tmp_path):
    _fill_run(store)
    result = _run_report(store, tmp_path)

    page = store.read_text(layout.report.index_html)
    # Self-contained: every src is an embedded data URI, nothing links out.
    assert not re.search(r"\bhref\s*=", page)
    srcs = re.findall(r'\bsrc\s*=\s*"([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "@import" not in page
    assert not re.search(r"<script[^>]*\bsrc", page) and page.count("<script>") == 1  # the inline sort script only
    assert 'class="best"' in page  # Table II marks the best strategy per class
    figures = [k for k in store.list(layout.report.root) if k.endswith(".png")]
    names = {k.rsplit("/", 1)[-1] for k in figures}
    assert {"class_distribution.png", "samples.png", "pr_curves.png", "per_class.png", "memorization.png"} <= names
    assert len(srcs) == len(figures)
    for key in figures:  # each figure is embedded byte for byte
        assert base64.b64encode(store.read_bytes(key)).decode() in page
        Image.open(io.BytesIO(store.read_bytes(key))).verify()
    markdown = store.read_text(layout.report.report_md)
    for text in ("grouped by subject", "never saw fold k's validation images", "0 validation images",
                 "subjects in more than one fold: 0 of 4 (data manifest vs folds)",  # split.leakcheck
                 "label.method: teacher",  # the label method
                 "2 folds × 2 seeds per fold and strategy (0, 1)",  # seeds
                 "n = 2 folds × 2 seeds = 4 trials per cell", "ddof=1",  # n and the std convention
                 "Budget and compute per strategy", "optimizer_steps",  # budgets
                 "exact sign-flip permutation test", "clusters = folds",
                 "With 2 folds the smallest possible p is 0.5; no difference can be significant",
                 "image-level paired bootstrap interval", "evaluation noise only",
                 "`yolov9s.yaml` detector", "not recorded by the evaluate stage: unknown",  # networks
                 "teacher gate (overall rejection rate 40.0%",  # 2 of the 5 images that reached it
                 "In total 4 of 12 generated images were used; 2 were rejected as memorized"):
        assert text in markdown and html_text(text) in page, text
    assert "](figures/memorization.png)" in markdown
    table = pd.read_csv(io.StringIO(store.read_text(layout.report.table("table_ii.csv"))))
    assert list(table.columns) == ["class", "baseline", "cas", "t2id_cas", "noisy"]
    assert list(table["class"]) == [ALL, *CLASSES]
    # Δ table: a p-value in every compared cell, never a mark with 2 folds; the CI from the predictions
    sig = pd.read_csv(io.StringIO(store.read_text(layout.report.table("significance.csv"))))
    sig = sig.set_index(["strategy", "class"])
    assert (sig.loc["cas", "p_value"] == 0.5).all() and not sig["significant"].any()
    assert sig.loc[("cas", ALL), "boot_low"] > 0 and sig.loc[("cas", ALL), "boot_resamples"] == 200
    cells = re.findall(r"\| ([+-]\d+\.\d \[[^\]]+\] p=[0-9.e-]+)( \*)? \|", markdown)
    assert len(cells) >= 8 and not any(mark for _, mark in cells)
    budgets = pd.read_csv(io.StringIO(store.read_text(layout.report.table("budgets.csv")))).set_index("strategy")
    assert str(budgets.loc["cas", "budget"]) == "120" and str(budgets.loc["cas", "images_seen"]) == "1936"
    assert budgets.loc["cas", "budget_unit"] == "optimizer_steps"
    assert str(budgets.loc["cas", "optimizer_steps"]) == "120"
    assert budgets.loc["baseline", "selection"] == "final" and budgets.loc["baseline", "trials"] == 4
    counts = pd.read_csv(io.StringIO(store.read_text(layout.report.table("synthetic_images.csv"))))
    fold0 = counts[counts["fold"] == 0].iloc[0]
    assert (fold0["class"], fold0["generated"], fold0["quality_rejected"], fold0["teacher_rejected"],
            fold0["memorization_rejected"], fold0["used"]) == ("vocal fold", 6, 1, 2, 1, 2)
    assert (fold0["topped_up"], fold0["target"], fold0["shortfall"]) == (2, 4, 2)
    assert fold0["teacher_rejection_rate"] == pytest.approx(0.4)
    per_trial = pd.read_csv(io.StringIO(store.read_text(layout.report.table("synthetic_per_trial.csv"))))
    assert list(per_trial["cas"]) == [6, 6]
    assert "fid" in store.read_text(layout.report.table("image_metrics.csv"))
    assert "needs synthetic images" in store.read_text(layout.report.table("skipped_trials.csv"))
    assert "12.5" in page and "unit run" in page
    assert set(result.outputs) >= {layout.report.index_html, layout.report.report_md, *figures}
    assert result.outputs[layout.report.index_html] == store.sha256(layout.report.index_html)


def html_text(text: str) -> str:
    import html

    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text, quote=False))


def test_report_names_the_networks_evaluate_recorded(store, tmp_path):
    _fill_run(store)
    store.write_table(layout.evaluate.metrics, pa.Table.from_pylist(
        [{"fold": 0, "class": "vocal fold", "fid": 12.5, "networks": "stand-in, not comparable"}]))
    _run_report(store, tmp_path)
    assert "computed with: stand-in, not comparable." in store.read_text(layout.report.report_md)


def test_report_builds_from_a_trials_table_without_the_new_columns(store, tmp_path):
    """An older grid: no seed, budget or predictions columns: p-values from trials, no image-level interval."""
    old = trials_table(seeds=(0,)).drop(columns=["seed", "budget_unit", "budget", "optimizer_steps", "images_seen",
                                                 "selection", "predictions"])
    _fill_run(store, old)
    _run_report(store, tmp_path)
    markdown = store.read_text(layout.report.report_md)
    for text in ("one seed per trial, not recorded in trials.parquet", "n = 2 folds × 1 seed = 2 trials per cell",
                 "The image-level bootstrap interval is unavailable: trials.parquet has no `predictions` column",
                 "not recorded"):
        assert text in markdown, text
    sig = pd.read_csv(io.StringIO(store.read_text(layout.report.table("significance.csv")))).set_index(
        ["strategy", "class"])
    assert sig.loc[("cas", ALL), "p_value"] == 0.5 and "boot_low" not in sig
    assert re.search(r"\| [+-]\d+\.\d p=0\.5 \|", markdown)


def test_report_says_so_when_a_trials_predictions_are_missing(store, tmp_path):
    _fill_run(store)
    store.delete(layout.grid.predictions(1, "cas", 1))
    _run_report(store, tmp_path)
    assert ("image-level bootstrap interval is unavailable: the predictions of trial fold=1 strategy=cas seed=1 "
            "are missing") in store.read_text(layout.report.report_md)


def test_report_settings_name_exactly_what_the_report_prints():
    """The report's marker changes with the cross-section values it prints or draws, and only with those."""
    from t2id.report.stage import STAGE
    from t2id.runner import settings_hash

    def digest(**sections):
        return settings_hash(STAGE.settings(validate_config({"run": {"id": "r"}, **sections})))

    base = digest()
    for changed in ({"label": {"memorization": {"threshold": 0.5}}}, {"label": {"method": "inpaint"}},
                    {"grid": {"detector": {"epochs": 3}}}, {"grid": {"strategies": ["baseline", "cas"]}},
                    {"run": {"id": "r", "description": "x"}}, {"run": {"id": "r", "seed": 4}},
                    {"report": {"confidence": 0.9}}, {"report": {"alpha": 0.01}}):
        assert digest(**changed) != base, changed
    for unchanged in ({"label": {"min_confidence": 0.5}}, {"grid": {"detector": {"lr": 0.01}}},
                      {"grid": {"max_retries": 3}}, {"evaluate": {"kid_subsets": 3}},
                      {"run": {"id": "r", "seed": 4}, "report": {"seed": 1}}):
        assert digest(**unchanged) == digest(**{k: v for k, v in unchanged.items() if k == "report"}), unchanged
    # without the label stage, label values do not reach the report at all
    no_label = {"run": {"id": "r", "stages": ["data", "split", "grid", "report"]}}
    assert digest(**no_label) == digest(**no_label, label={"memorization": {"threshold": 0.5}})


def test_generator_comparison_table_reads_each_source_runs_manifests_and_evaluate_outputs(store, tmp_path):
    """Fabricated grid results: t2id_cas on this run's images (lora, no method column in its manifests) and
    t2id_cas_ddpm on another run's (synthetic_from, method ddpm, its own evaluate outputs) get a row each,
    with FID/KID as each run's evaluate stage wrote them and the paired test the report computed."""
    from t2id.report.stage import STAGE
    from t2id.store import S3Store, open_store

    trials = trials_table(store=store)
    trials["strategy"] = trials["strategy"].replace({"noisy": "t2id_cas_ddpm"})
    _fill_run(store, trials)
    if isinstance(store, S3Store):  # the other run in the same bucket, opened with this run's endpoint
        other_uri = f"s3://{store.bucket}/runs/ddpm-run"
        other = S3Store(other_uri, endpoint_url=store.endpoint_url)
    else:
        other_uri = str(tmp_path / "runs" / "ddpm-run")
        other = open_store(other_uri)
    for fold in (0, 1):
        other.write_table(layout.label.labels(fold), pa.Table.from_pylist(
            [{"image_id": f"d{fold}", "kept": True, "label_source": "teacher", "method": "ddpm"}]))
    other.write_table(layout.evaluate.metrics, pa.Table.from_pylist(
        [{"fold": f, "class": "vocal fold", "fid": fid, "kid_mean": kid, "networks": "InceptionV3 (torchvision)"}
         for f, fid, kid in ((0, 40.0, 0.02), (1, 44.0, 0.03))]))
    config = validate_config({
        "run": {"id": "r"},  # default lora.target_classes: tracheal ring, vocal fold
        "grid": {"strategies": ["baseline", "cas", "t2id_cas", "t2id_cas_ddpm"],
                 "custom_strategies": [{"name": "t2id_cas_ddpm", "sampling": "cas", "synthetic": True,
                                        "synthetic_from": other_uri}]},
        "report": {"bootstrap_samples": 50}})
    ctx = StageContext(store=store, stage="report", cache_dir=tmp_path / "cache")
    settings = STAGE.settings(config)
    assert settings.synthetic_sources == {"t2id_cas": None, "t2id_cas_ddpm": other_uri}
    assert settings.target_classes == ["tracheal ring", "vocal fold"]
    STAGE.run(ctx, settings)

    table = pd.read_csv(io.StringIO(store.read_text(layout.report.table("generators.csv"))),
                        keep_default_na=False).set_index("strategy")
    assert list(table.index) == ["t2id_cas", "t2id_cas_ddpm"]  # baseline and cas train on real images only
    ddpm, own = table.loc["t2id_cas_ddpm"], table.loc["t2id_cas"]
    assert (ddpm["generator"], ddpm["source run"]) == ("ddpm", other_uri)
    assert (own["generator"], own["source run"]) == ("lora", "this run")
    assert ddpm["synthetic images per fold"] == "fold 0: 6; fold 1: 6"
    assert own["synthetic images per fold"] == "fold 0: skipped; fold 1: skipped"
    assert ddpm["FID ↓"] == "42.00 ± 2.83 (n=2)" and ddpm["KID ×10³ ↓"] == "25.00 ± 7.07 (n=2)"
    assert own["FID ↓"] == "12.50 (n=1)" and own["KID ×10³ ↓"] == "n/a"  # this run's evaluate wrote no kid_mean
    # (t2id_cas trained on no fold: its generator and FID are still those of this run's folds)
    stats = pd.read_csv(io.StringIO(store.read_text(layout.report.table("table_ii_stats.csv"))))
    mean = stats[(stats["strategy"] == "t2id_cas_ddpm") & (stats["class"] == "vocal fold")].iloc[0]
    assert ddpm["mAP50-95 vocal fold"].startswith(f"{mean['mean'] * 100:.1f} ± ") and \
        ddpm["mAP50-95 vocal fold"].endswith("(n=4)")
    assert own["mAP50-95 all classes"] == "—"
    sig = pd.read_csv(io.StringIO(store.read_text(layout.report.table("significance.csv")))).set_index(
        ["strategy", "class"])
    assert ddpm["Δ vs baseline (pp), p"].startswith(f"{sig.loc[('t2id_cas_ddpm', ALL), 'mean_diff'] * 100:+.1f}")
    assert ddpm["Δ vs baseline (pp), p"].endswith(f"p={sig.loc[('t2id_cas_ddpm', ALL), 'p_value']:.3g}")
    assert " [" in ddpm["Δ vs baseline (pp), p"]  # the image-level interval, as in the comparison table
    markdown = store.read_text(layout.report.report_md)
    for text in ("Generator comparison", f"{other_uri}: InceptionV3 (torchvision)", "this run: not recorded",
                 f"by (label_source): this run: teacher; {other_uri}: teacher"):
        assert text in markdown, text
    # New FID/KID in the other run re-render the report (the stage's external inputs).
    before = STAGE.external_inputs(ctx, settings)
    other.write_text(layout.marker("evaluate"), json.dumps({"outputs": {layout.evaluate.metrics: "x"}}))
    after = STAGE.external_inputs(ctx, settings)
    assert [k for k in after if after[k] != before[k]] == [f"synthetic_from:{other_uri}:evaluate"]
