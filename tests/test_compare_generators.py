"""Comparing generators (issue 20): a grid strategy trains on ANOTHER run's synthetic set (`synthetic_from`).

One real run (data + split on the phantom); the other run is fabricated the way a second `t2id run` with
the same data and split sections but another lora.method would leave it: the same data/ and split/
outputs, and a label manifest of its own images (method ddpm) with their markers.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from t2id import layout
from t2id.config import validate_config
from t2id.data.manifest import SYNTHETIC_SCHEMA, load_fold_rows
from t2id.errors import ConfigError, UserError
from t2id.grid.ray_layer import trial_memo
from t2id.grid.settings import settings
from t2id.runner import run_pipeline, run_store
from t2id.store import open_store

TINY_DETECTOR = {"model": "yolov8n.yaml", "imgsz": 64, "epochs": 1, "batch": 8, "warmup_epochs": 0,
                 "nominal_batch": 8, "validate_every_epoch": False}


def _config(tmp_path: Path, other_root: str, strategies=("baseline", "t2id_cas_other"), folds=(0,)) -> dict:
    return {
        "run": {"id": "gen-lora", "seed": 0, "stages": ["data", "split", "grid"]},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "data": {"source": "phantom", "phantom": {"subjects": 4, "frames_per_subject": 4, "size": 64, "seed": 0}},
        "split": {"folds": 2},
        "grid": {"detector": TINY_DETECTOR, "strategies": list(strategies), "folds": list(folds) if folds else None,
                 "max_concurrent": 1,
                 "custom_strategies": [{"name": "t2id_cas_other", "sampling": "cas", "synthetic": True,
                                        "synthetic_from": other_root}]},
        "cluster": {"num_cpus": 2},
    }


def write_other_labels(other, fold: int, n: int, method: str = "ddpm") -> list[str]:
    """The other run's label/fold=<fold>/labels.parquet: `n` kept, labelled images of its own (mirrored real
    train images holding a box, each a distinct file) plus one rejected row, and its label marker."""
    from PIL import Image, ImageOps

    rows = [r for r in load_fold_rows(other, fold, "train").to_pylist() if r["boxes"]][:n]
    out = []
    for i, r in enumerate(rows + rows[:1]):
        image = ImageOps.mirror(Image.open(io.BytesIO(other.read_bytes(other.key_of(r["uri"])))).convert("L"))
        image.putpixel((0, 0), (i * 37 + n) % 256)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = layout.generate.image(fold, "tracheal ring", f"{method}-{n}-{i:04d}")
        sha = other.write_bytes(key, buffer.getvalue())
        boxes = [{**b, "x": 1.0 - b["x"]} for b in r["boxes"]]
        out.append({"image_id": sha[:16], "uri": other.ref(key), "width": 64, "height": 64, "group": "synthetic",
                    "source": "synthetic", "boxes": boxes, "sha256": sha, "fold": fold,
                    "class_id": boxes[0]["class_id"], "prompt": "p", "negative_prompt": "", "seed": i, "steps": 2,
                    "guidance": 1.0, "scheduler": "ddpm", "base_model": "tiny", "lora_sha256": "x", "entropy": 5.0,
                    "std": 40.0, "clip_score": None, "kept": i < len(rows),
                    "reject_reason": None if i < len(rows) else "std", "label_source": "teacher", "method": method})
    digest = other.write_table(layout.label.labels(fold), pa.Table.from_pylist(out, schema=SYNTHETIC_SCHEMA))
    other.write_text(layout.marker("label"), json.dumps({"outputs": {layout.label.labels(fold): digest}}))
    return [r["image_id"] for r in out[:len(rows)]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(this run's store, the other run's store, tmp): data + split done; the other run copies them."""
    from t2id.data.stage import STAGE as DATA
    from t2id.split.stage import STAGE as SPLIT

    tmp = tmp_path_factory.mktemp("compare")
    other_root = tmp / "store" / "gen-ddpm"
    cfg = validate_config(_config(tmp, str(other_root)))
    run_pipeline(cfg, stages={"data": DATA, "split": SPLIT})
    this = run_store(cfg)
    for stage in ("data", "split"):
        shutil.copytree(Path(this.root) / stage, other_root / stage)
    return this, open_store(str(other_root)), tmp


def test_synthetic_from_is_checked_before_any_trial(runs, tmp_path):
    """Config: synthetic_from needs synthetic: true. Plan: the other run's split must be this run's; its
    synthetic set feeds only the strategies that name it, keyed by its sha256; a fold without one is skipped."""
    from t2id.grid.core import plan_trials
    from t2id.grid.sources import external_inputs

    this, other, tmp = runs
    with pytest.raises(ConfigError, match=r"custom_strategies.*'x'.*synthetic is false.*synthetic: true"):
        validate_config({"grid": {"custom_strategies": [{"name": "x", "synthetic_from": "runs/b"}]}})
    with pytest.raises(ConfigError, match=r"s3://bucket"):
        validate_config({"grid": {"custom_strategies": [{"name": "x", "synthetic": True,
                                                          "synthetic_from": "gs://b/r"}]}})

    ids = write_other_labels(other, 0, 3)
    s = settings(validate_config(_config(tmp, other.root, ("baseline", "t2id_cas", "t2id_cas_other"), folds=None)))
    inputs = {"data": "d", "split": "s"}
    trials, skipped, folds, _ = plan_trials(this, s, inputs)
    assert folds == [0, 1]
    by_name = {t["name"]: t for t in trials}
    assert set(by_name) == {"fold=0-baseline-seed=0", "fold=1-baseline-seed=0", "fold=0-t2id_cas_other-seed=0"}
    other_trial = by_name["fold=0-t2id_cas_other-seed=0"]
    assert other_trial["synthetic_from"] == other.root and other_trial["n_synthetic"] == len(ids)
    assert other_trial["identity"]["synthetic"] == other.sha256(layout.label.labels(0))
    assert "synthetic_from" not in by_name["fold=0-baseline-seed=0"]["identity"]["strategy"]  # old memos hold
    # This run has no label stage (t2id_cas skipped, as before); the other run has no fold 1 set (skipped, why).
    reasons = {(r["fold"], r["strategy"]): r["reason"] for r in skipped}
    assert "label stage is not enabled" in reasons[(0, "t2id_cas")]
    assert f"{layout.label.labels(1)} does not exist in synthetic_from run {other.root}" in reasons[(1, "t2id_cas_other")]

    # A regenerated other run changes that trial's memo, and nothing else; and the grid stage's inputs.
    memo = {t["name"]: trial_memo(this, t).digest for t in trials}
    before = external_inputs(this, s)
    write_other_labels(other, 0, 2)
    again = {t["name"]: trial_memo(this, t).digest for t in plan_trials(this, s, inputs)[0]}
    assert [n for n in memo if memo[n] != again[n]] == ["fold=0-t2id_cas_other-seed=0"]
    after = external_inputs(this, s)
    assert [k for k in after if after[k] != before[k]] == [f"synthetic_from:{other.root}:label"]

    # Another split, other images or other classes: one error naming both runs, the file and the fix.
    third = open_store(str(tmp_path / "gen-other-split"))
    for stage in ("data", "split"):
        shutil.copytree(Path(this.root) / stage, Path(third.root) / stage)
    folds_table = third.read_table(layout.split.folds)
    flipped = pa.array([1 - f for f in folds_table["fold"].to_pylist()], pa.int32())
    third.write_table(layout.split.folds, folds_table.set_column(1, "fold", flipped))
    s3 = settings(validate_config(_config(tmp, third.root)))
    with pytest.raises(UserError, match=r"'t2id_cas_other'.*gen-other-split.*another split/folds.parquet than this "
                                        r"run gen-lora.*same data and split sections"):
        plan_trials(this, s3, inputs)
    third.write_table(layout.split.folds, folds_table)
    manifest = third.read_table(layout.data.manifest)
    third.write_table(layout.data.manifest, manifest.slice(1))
    with pytest.raises(UserError, match=r"another data/manifest.parquet.*0 row\(s\) only there, 1 only here"):
        plan_trials(this, s3, inputs)
    third.write_table(layout.data.manifest, manifest)
    third.write_text(layout.data.classes, json.dumps({"names": ["a", "b"]}))
    with pytest.raises(UserError, match=r"another data/classes.json"):
        plan_trials(this, s3, inputs)
    with pytest.raises(UserError, match=r"has no data/classes.json; run its data and split stages first"):
        plan_trials(this, settings(validate_config(_config(tmp, str(tmp_path / "nowhere")))), inputs)


def test_grid_trains_on_the_other_runs_images_and_a_regenerated_set_retrains_only_its_trial(runs, ray_local,
                                                                                           torch_one_thread):
    """Real tiny YOLO, one fold, one seed: baseline + a T2ID-CAS on the other run's set. The synthetic trial's
    dataset holds the other run's images (bytes from its store); a new set there retrains that trial only."""
    from t2id.data.stage import STAGE as DATA
    from t2id.grid.stage import STAGE as GRID
    from t2id.split.stage import STAGE as SPLIT

    this, other, tmp = runs
    ids = write_other_labels(other, 0, 3)
    cfg = validate_config(_config(tmp, other.root))
    stages = {"data": DATA, "split": SPLIT, "grid": GRID}
    grid = next(o for o in run_pipeline(cfg, stages=stages) if o.stage == "grid")
    assert grid.status == "ran" and grid.summary["trials"] == 2 and grid.summary["reused"] == 0
    metrics = json.loads(this.read_text(layout.grid.trial_metrics(0, "t2id_cas_other", 0)))
    assert metrics["n_synthetic_train"] == 3
    datasets = sorted((tmp / "cache" / "datasets").glob("fold0-*"))
    with_ids = [d for d in datasets if all((d / "images" / "train" / f"{i}.png").is_file() for i in ids)]
    assert len(datasets) == 2 and len(with_ids) == 1  # the baseline's dataset has no synthetic image
    labels = other.read_table(layout.label.labels(0)).to_pylist()
    for row in labels[:3]:
        assert (with_ids[0] / "images" / "train" / f"{row['image_id']}.png").read_bytes() == \
            other.read_bytes(other.key_of(row["uri"]))
    assert not (with_ids[0] / "images" / "train" / f"{labels[3]['image_id']}.png").exists()  # rejected row
    assert not this.exists(labels[0]["uri"])  # the images live in the other run only

    # The other run regenerated (its label marker changed): the grid stage reruns and retrains that trial only.
    write_other_labels(other, 0, 2)
    grid = next(o for o in run_pipeline(cfg, stages=stages) if o.stage == "grid")
    assert grid.status == "ran" and grid.summary["trials"] == 2 and grid.summary["reused"] == 1
    trials = this.read_table(layout.grid.trials).to_pandas()
    overall = trials[trials["class"] == "all classes"].set_index("strategy")
    assert overall.loc["t2id_cas_other", "n_synthetic"] == 2 and overall.loc["baseline", "n_synthetic"] == 0
    assert (overall["status"] == "ok").all()
