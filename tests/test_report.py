"""The report: Table II layout and paired bootstrap from a trials table; a self-contained index.html."""

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
from t2id.report import tables
from t2id.runner import StageContext

CLASSES = ["thyroid cartilage", "tracheal ring", "vocal fold"]
STRATEGIES = ["baseline", "cas", "noisy", "t2id_cas"]
# mAP50-95 per fold: cas is clearly better than baseline on every fold; noisy alternates around it.
BASE = [0.50, 0.55, 0.45, 0.52]
CAS = [0.80, 0.86, 0.77, 0.83]
NOISY_DELTA = [0.05, -0.05, 0.04, -0.04]


def trials_table() -> pd.DataFrame:
    rows = []
    for fold in range(4):
        for strategy in STRATEGIES:
            for i, name in enumerate(["all classes", *CLASSES]):
                value = {"baseline": BASE[fold], "cas": CAS[fold],
                         "noisy": BASE[fold] + NOISY_DELTA[fold], "t2id_cas": None}[strategy]
                status = "skipped" if strategy == "t2id_cas" else "ok"
                rows.append({"fold": fold, "strategy": strategy, "class": name,
                             "map50_95": None if value is None else value - 0.01 * i,
                             "map50": None if value is None else min(1.0, value + 0.2),
                             "precision": value, "recall": value,
                             "train_seconds": None if value is None else 10.0 + fold,
                             "n_synthetic": 0, "status": status,
                             "reason": "needs synthetic images: none" if status == "skipped" else ""})
    return pd.DataFrame(rows)


def test_table_ii_layout_mean_std_over_folds():
    table = tables.table_ii(trials_table(), "map50_95", STRATEGIES, CLASSES)
    assert list(table.index) == ["all classes", *CLASSES]  # "all classes" first, as in the paper
    assert list(table.columns) == STRATEGIES  # strategies as columns
    mean, std = np.mean(CAS) * 100, np.std(CAS, ddof=1) * 100
    assert table.loc["all classes", "cas"] == f"{mean:.1f} ± {std:.1f}"
    shifted = np.array(BASE) - 0.02  # the second class row is 0.02 below the overall value
    assert table.loc["tracheal ring", "baseline"] == f"{shifted.mean() * 100:.1f} ± {shifted.std(ddof=1) * 100:.1f}"
    assert (table["t2id_cas"] == "—").all()  # skipped everywhere: shown, not dropped


def test_paired_bootstrap_ci_excludes_zero_only_for_a_clearly_better_strategy():
    ci = tables.paired_bootstrap(trials_table(), "baseline", "map50_95", n_boot=4000, confidence=0.95, seed=0,
                                 strategies=STRATEGIES, classes=CLASSES).set_index(["strategy", "class"])
    better = ci.loc[("cas", "all classes")]
    assert better.n_folds == 4
    assert better.mean_diff == pytest.approx(np.mean(np.subtract(CAS, BASE)))
    assert 0 < better.ci_low <= better.mean_diff <= better.ci_high
    assert better.ci_low >= min(np.subtract(CAS, BASE)) - 1e-12  # a mean of fold differences cannot go below their min
    assert better.excludes_zero
    noisy = ci.loc[("noisy", "all classes")]
    assert noisy.ci_low < 0 < noisy.ci_high and not noisy.excludes_zero
    assert ci.loc[("t2id_cas", "vocal fold")].n_folds == 0 and np.isnan(ci.loc[("t2id_cas", "vocal fold")].ci_low)
    # Same seed, same interval.
    again = tables.paired_bootstrap(trials_table(), "baseline", "map50_95", n_boot=4000, seed=0,
                                    strategies=STRATEGIES, classes=CLASSES).set_index(["strategy", "class"])
    assert again.loc[("cas", "all classes")].ci_low == better.ci_low


def _png(value: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _fill_run(store) -> None:
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
    for fold in (0, 1):
        train = [f["image_id"] for f in folds if f["fold"] != fold]
        store.write_text(layout.lora.train_ids(fold), json.dumps({"fold": fold, "image_ids": train}))
        synth = []
        for j in range(3):
            key = layout.generate.image(fold, "vocal fold", str(j))
            store.write_bytes(key, _png(200 - 30 * j))
            synth.append({"uri": store.uri(key), "class_id": 2, "kept": j < 2, "boxes": [],
                          "nn_similarity": 0.5 + 0.1 * j})
        store.write_table(layout.generate.manifest(fold), pa.Table.from_pylist(synth))
        store.write_table(layout.label.labels(fold), pa.Table.from_pylist(synth))
    store.write_table(layout.evaluate.metrics, pa.Table.from_pylist(
        [{"fold": 0, "class": "vocal fold", "fid": 12.5, "kid": 0.01, "clip_score": 28.1}]))
    trials = trials_table()
    store.write_table(layout.grid.trials, pa.Table.from_pandas(trials, preserve_index=False))
    recall = np.linspace(0, 1, 11)
    curves = [{"fold": f, "strategy": s, "class": c, "recall": float(r), "precision": float(1 - 0.5 * r)}
              for f in range(4) for s in ("baseline", "cas") for c in CLASSES for r in recall]
    store.write_table(layout.grid.pr_curves, pa.Table.from_pylist(curves))


def test_report_stage_writes_self_contained_html_with_every_figure(store, tmp_path):
    from t2id.report.stage import STAGE

    _fill_run(store)
    config = validate_config({"run": {"id": "r", "description": "unit run"},
                              "grid": {"strategies": ["baseline", "cas", "t2id_cas"]},
                              "report": {"bootstrap_samples": 500}})
    ctx = StageContext(store=store, stage="report", cache_dir=tmp_path / "cache")
    result = STAGE.run(ctx, STAGE.settings(config))

    page = store.read_text(layout.report.index_html)
    # Self-contained: every src is an embedded data URI, nothing links out.
    assert not re.search(r"\bhref\s*=", page)
    srcs = re.findall(r'\bsrc\s*=\s*"([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    figures = [k for k in store.list(layout.report.root) if k.endswith(".png")]
    names = {k.rsplit("/", 1)[-1] for k in figures}
    assert {"class_distribution.png", "samples.png", "pr_curves.png", "per_class.png", "memorization.png"} <= names
    assert len(srcs) == len(figures)
    for key in figures:  # each figure is embedded byte for byte
        assert base64.b64encode(store.read_bytes(key)).decode() in page
        Image.open(io.BytesIO(store.read_bytes(key))).verify()
    # The method statement: subject-grouped folds, checked generator/validation separation.
    markdown = store.read_text(layout.report.report_md)
    for text in ("grouped by subject", "never saw fold k's validation images", "0 validation images",
                 "label.method: teacher"):
        assert text in markdown and text in page
    # Tables: Table II CSV in the paper's layout, CI CSV, image metrics, skipped trials with reasons.
    assert "](figures/memorization.png)" in markdown  # figures linked beside report.md
    table = pd.read_csv(io.StringIO(store.read_text(layout.report.table("table_ii.csv"))))
    # config order first; strategies found only in the trials table follow
    assert list(table.columns) == ["class", "baseline", "cas", "t2id_cas", "noisy"]
    assert list(table["class"]) == ["all classes", *CLASSES]
    ci = pd.read_csv(io.StringIO(store.read_text(layout.report.table("bootstrap_ci.csv"))))
    assert bool(ci.set_index(["strategy", "class"]).loc[("cas", "all classes"), "excludes_zero"])
    assert "fid" in store.read_text(layout.report.table("image_metrics.csv"))
    assert "needs synthetic images" in store.read_text(layout.report.table("skipped_trials.csv"))
    assert "12.5" in page and "unit run" in page
    assert set(result.outputs) >= {layout.report.index_html, layout.report.report_md, *figures}
    assert result.outputs[layout.report.index_html] == store.sha256(layout.report.index_html)


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
                    {"report": {"confidence": 0.9}}):
        assert digest(**changed) != base, changed
    for unchanged in ({"label": {"min_confidence": 0.5}}, {"grid": {"detector": {"lr": 0.01}}},
                      {"grid": {"max_retries": 3}}, {"evaluate": {"kid_subsets": 3}},
                      {"run": {"id": "r", "seed": 4}, "report": {"seed": 1}}):
        assert digest(**unchanged) == digest(**{k: v for k, v in unchanged.items() if k == "report"}), unchanged
    # without the label stage, label values do not reach the report at all
    no_label = {"run": {"id": "r", "stages": ["data", "split", "grid", "report"]}}
    assert digest(**no_label) == digest(**no_label, label={"memorization": {"threshold": 0.5}})
