"""Classifier trials (issue 21): each strategy for one epoch on the tiny phantom (CPU), then the grid on Ray Tune."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from t2id import layout
from t2id.classify.config import ClassifierConfig
from t2id.classify.models import build_classifier
from t2id.classify.train import class_weights, make_sampler
from t2id.classify.trial import classify_on_store
from t2id.config import validate_config
from t2id.data.manifest import load_classes, load_fold_rows
from t2id.detect.config import PRESETS, BudgetConfig
from t2id.runner import run_pipeline, run_store

TINY = {"model": "tiny", "imgsz": 32, "epochs": 1, "batch": 8, "lr": 3e-3}


def _config(tmp_path, run_id="cg", **grid):
    return validate_config({
        "run": {"id": run_id, "task": "classify", "stages": ["data", "split", "grid"]},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "data": {"source": "phantom", "phantom": {"subjects": 4, "frames_per_subject": 12, "size": 32}},
        "split": {"folds": 2},
        "grid": {"strategies": ["baseline", "cas"], "classifier": TINY, **grid},
        "cluster": {"num_cpus": 2},
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with the data and split stages done on the image-level phantom."""
    from t2id.data.stage import STAGE as DATA
    from t2id.split.stage import STAGE as SPLIT

    tmp = tmp_path_factory.mktemp("cls")
    cfg = _config(tmp)
    run_pipeline(cfg, stages={"data": DATA, "split": SPLIT})
    return cfg, run_store(cfg), tmp


def synthetic_rows(store, fold: int, class_id: int, n: int) -> pa.Table:
    """Stand-in generated rows written into the store as the generate stage would (real PNGs, kept flags):
    flipped copies of the fold's train images of `class_id`, plus one rejected row that must be ignored."""
    from PIL import Image, ImageOps
    import io

    rows = load_fold_rows(store, fold, "train").to_pylist()
    of_class = [r for r in rows if r["boxes"][0]["class_id"] == class_id]
    picked = (of_class * n)[:n]
    out = []
    for i, r in enumerate(picked + picked[:1]):
        image = ImageOps.mirror(Image.open(io.BytesIO(store.read_bytes(store.key_of(r["uri"])))))
        image.putpixel((0, 0), i)  # each a distinct file
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = layout.generate.image(fold, "tracheal ring plane", f"{i:04d}")
        store.write_bytes(key, buffer.getvalue())
        out.append({"uri": store.ref(key), "class_id": class_id, "kept": i < len(picked)})
    return pa.Table.from_pylist(out)


def test_each_strategy_trains_one_epoch_on_equal_budget_and_reports_the_final_model(run, torch_one_thread):
    cfg, store, tmp = run
    classes = load_classes(store)
    ring = classes.index("tracheal ring plane")
    from t2id.classify.trial import kept_synthetic
    synthetic = kept_synthetic(synthetic_rows(store, 0, ring, 3))
    assert synthetic.num_rows == 3
    classifier = ClassifierConfig(**TINY)
    records = {}
    for name in ("baseline", "rfs", "cas", "class_weights", "t2id_cas"):
        spec = PRESETS[name]
        records[name] = classify_on_store(store, 0, spec, classifier, classes, tmp / "cache", seed=0,
                                          synthetic=synthetic if spec.synthetic else None, budget=BudgetConfig())
    n_real = load_fold_rows(store, 0, "train").num_rows
    n_val = load_fold_rows(store, 0, "val").num_rows
    for name, rec in records.items():
        assert rec["images_seen"] == n_real and rec["budget"] == n_real, name  # equal budget: real images x 1 epoch
        assert rec["optimizer_steps"] == records["baseline"]["optimizer_steps"], name
        assert rec["selection"] == "final"
        assert 0.0 <= rec["overall"]["accuracy"] <= 1.0 and 0.0 <= rec["overall"]["balanced_accuracy"] <= 1.0
        assert set(rec["per_class"]) == set(classes)
        predictions = store.read_table(rec["predictions"])
        assert predictions.num_rows == n_val
        np.testing.assert_allclose([sum(p) for p in predictions["probs"].to_pylist()], 1.0, rtol=1e-4)
        assert store.exists(layout.grid.weights(0, name, 0))
    assert records["t2id_cas"]["n_synthetic_train"] == 3 and records["baseline"]["n_synthetic_train"] == 0
    assert records["t2id_cas"]["synthetic_label_source"] == "prompt"
    # The same seed and data give the same final model; another strategy trains another one.
    again = classify_on_store(store, 0, PRESETS["baseline"], classifier, classes, tmp / "cache", seed=0)
    assert again["overall"] == records["baseline"]["overall"]
    assert records["cas"]["final_loss"] != records["baseline"]["final_loss"]
    assert records["class_weights"]["final_loss"] != records["baseline"]["final_loss"]


def test_samplers_and_class_weights_rebalance_single_label_images():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    drawn = {name: Counter(labels[make_sampler(PRESETS[name], labels, 3, seed=1, epoch_size=3000).epoch_indices(0)])
             for name in ("baseline", "rfs", "cas")}
    assert drawn["baseline"][2] == 300  # uniform: the data's 10%
    assert 900 < drawn["cas"][2] < 1100  # CAS: a class uniformly, 1/3 each
    # RFS with t = 0.5: r = max(1, sqrt(0.5 / f)) = 1, 1.29, 2.24 -> rare share 22.4 / (60 + 38.7 + 22.4)
    assert abs(drawn["rfs"][2] / 3000 - 22.36 / 121.09) < 0.02
    w = class_weights(labels, 4).numpy()
    assert w[3] == 0.0 and np.isclose(w[labels].mean(), 1.0) and np.isclose(w[2] / w[0], 6.0)


def test_torchvision_classifiers_take_a_state_dict_file_and_get_a_new_head(tmp_path):
    import torch

    source = build_classifier("resnet18", 1000, 32)  # a stand-in for ImageNet weights: same architecture
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    model = build_classifier("resnet18", 5, 32, tmp_path / "r18.pth")
    assert model.fc.out_features == 5
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    torch.save(build_classifier("tiny", 3, 32).state_dict(), tmp_path / "tiny.pth")
    from t2id.errors import UserError
    with pytest.raises(UserError, match="does not fit"):
        build_classifier("resnet18", 5, 32, tmp_path / "tiny.pth")


def test_grid_runs_classifier_trials_on_ray_tune_and_the_report_tabulates_them(run, ray_local):
    from t2id.data.stage import STAGE as DATA
    from t2id.grid.stage import STAGE as GRID
    from t2id.report.stage import STAGE as REPORT
    from t2id.split.stage import STAGE as SPLIT

    _, store, tmp = run
    cfg = _config(tmp, folds=[1])  # the same run, one fold: two trials side by side on 2 CPUs
    cfg.run.stages = ["data", "split", "grid", "report"]
    cfg.report.bootstrap_samples = 50
    outcome = run_pipeline(cfg, stages={"data": DATA, "split": SPLIT, "grid": GRID, "report": REPORT})
    trials = store.read_table(layout.grid.trials).to_pandas()
    classes = load_classes(store)
    assert len(trials) == 2 * (1 + len(classes))  # strategies x (all classes + each class)
    assert set(trials["status"]) == {"ok"}
    overall = trials[trials["class"] == "all classes"]
    assert overall["accuracy"].between(0, 1).all() and overall["balanced_accuracy"].notna().all()
    per_class = trials[trials["class"] != "all classes"]
    assert per_class["recall"].notna().all() and (per_class["support"] > 0).all()  # every plane in every fold
    result = json.loads(store.read_text(layout.grid.result(1, "cas", 0)))
    assert result["selection"] == "final" and result["images_seen"] == result["budget"]
    assert outcome[-2].summary["trials"] == 2

    # The report: strategies x metrics per class, n stated, the paired comparison with the image-level interval.
    report = store.read_text(layout.report.report_md)
    assert "n = 1 fold × 1 seed = 1 trial per cell" in report
    for table in ("overall.csv", "table_ii.csv", "table_f1.csv", "table_auc.csv", "significance.csv"):
        assert store.exists(layout.report.table(table)), table
    import io
    import pandas as pd
    recall = pd.read_csv(io.StringIO(store.read_text(layout.report.table("table_ii.csv"))), dtype=str).set_index("class")
    assert list(recall.index) == ["all classes", *classes] and list(recall.columns) == ["baseline", "cas"]
    expected = trials[(trials["strategy"] == "cas") & (trials["class"] == classes[0])]["recall"].iloc[0]
    assert recall.loc[classes[0], "cas"] == f"{expected * 100:.1f}"
    tests = pd.read_csv(io.StringIO(store.read_text(layout.report.table("significance.csv"))))
    assert tests["boot_resamples"].gt(0).any() and set(tests["strategy"]) == {"cas"}


def test_synthetic_images_load_from_the_store_of_the_run_that_made_them(run, tmp_path):
    """grid synthetic_from with run.task classify: another run's generated rows load from that run's store."""
    import torch

    from t2id.classify.train import decode, fold_images
    from t2id.classify.trial import kept_synthetic
    from t2id.errors import UserError
    from t2id.store import open_store

    _, store, _ = run
    other = open_store(str(tmp_path / "other-run"))
    table = kept_synthetic(synthetic_rows(store, 0, 2, 3))
    for uri in table["uri"].to_pylist():  # the images move to the other run
        other.write_bytes(uri, store.read_bytes(store.key_of(uri)))
        store.delete(store.key_of(uri))
    data = fold_images(store, 0, 32, table, synthetic_store=other)
    assert data.train.shape[0] == data.n_real + 3 and list(data.train_labels[-3:]) == [2, 2, 2]
    assert torch.equal(data.train[-1], decode(other.read_bytes(table["uri"][-1].as_py()), 32))
    with pytest.raises(UserError):
        fold_images(store, 0, 32, table)  # not in this run's store
