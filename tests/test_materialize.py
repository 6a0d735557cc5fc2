"""A fold as an ultralytics dataset, from a local and an S3 run store, reused by content hash."""

from __future__ import annotations

import pyarrow as pa
import pytest
import yaml

from t2id import layout
from t2id.config import validate_config
from t2id.data.manifest import IMAGE_SCHEMA, SYNTHETIC_SCHEMA, load_fold_rows
from t2id.data.materialize import materialize_fold
from t2id.data.phantom import write_phantom
from t2id.data.stage import STAGE as DATA_STAGE
from t2id.runner import run_pipeline, run_store
from t2id.split.stage import STAGE as SPLIT_STAGE


@pytest.fixture
def run(store, tmp_path):
    src = write_phantom(tmp_path / "ph", subjects=4, frames_per_subject=3, size=64)
    cfg = validate_config({
        "run": {"id": "m", "stages": ["data", "split"]},
        "store": {"uri": store.root, "cache_dir": str(tmp_path / "cache")},
        "data": {"source": str(src)},
        "split": {"folds": 2},
    })
    run_pipeline(cfg, stages={"data": DATA_STAGE, "split": SPLIT_STAGE})
    return run_store(cfg)


def _synthetic(run, kept_flags):
    """Synthetic rows as the grid passes them: images stored in the run, provenance columns filled."""
    rows = []
    for i, kept in enumerate(kept_flags):
        data = f"fake png {i}".encode()
        key = layout.generate.image(0, "tracheal ring", f"{i:04d}")
        sha = run.write_bytes(key, data)
        rows.append({"image_id": f"syn{i:013d}", "uri": run.uri(key), "width": 64, "height": 64, "group": "synthetic",
                     "source": "synthetic", "boxes": [{"class_id": 2, "x": 0.5, "y": 0.4, "w": 0.3, "h": 0.3}],
                     "sha256": sha, "fold": 0, "class_id": 2, "prompt": "p", "negative_prompt": "", "seed": i,
                     "steps": 4, "guidance": 7.5, "scheduler": "ddim", "base_model": "tiny", "lora_sha256": "x",
                     "entropy": 5.0, "std": 40.0, "clip_score": 25.0, "kept": kept,
                     "reject_reason": None if kept else "std", "label_source": "teacher"})
    return pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA)


def test_fold_dataset(run, tmp_path):
    check_layout_and_reuse(run, tmp_path)
    check_synthetic_rows_join_train_only_when_kept(run, tmp_path)


def check_layout_and_reuse(run, tmp_path):
    cache = tmp_path / "mat"
    ds = materialize_fold(run, 0, cache)
    spec = yaml.safe_load(ds.data_yaml.read_text())
    assert spec["train"] == "images/train" and spec["val"] == "images/val"
    assert [spec["names"][i] for i in range(6)] == ds.names
    val_rows = load_fold_rows(run, 0, "val")
    assert sorted(ds.val_ids) == sorted(val_rows["image_id"].to_pylist())
    assert not set(ds.train_ids) & set(ds.val_ids)
    for row in val_rows.to_pylist():
        image = ds.root / "images" / "val" / f"{row['image_id']}.png"
        assert image.read_bytes() == run.read_bytes(run.key_of(row["uri"]))
        label = (ds.root / "labels" / "val" / f"{row['image_id']}.txt").read_text().splitlines()
        assert len(label) == len(row["boxes"])
        if row["boxes"]:
            assert int(label[0].split()[0]) == row["boxes"][0]["class_id"]
    assert len(list((ds.root / "images" / "train").iterdir())) == len(ds.train_ids)
    # same content -> the same folder, untouched
    stamp = ds.data_yaml.stat().st_mtime_ns
    again = materialize_fold(run, 0, cache)
    assert again.root == ds.root and again.data_yaml.stat().st_mtime_ns == stamp
    assert materialize_fold(run, 1, cache).root != ds.root
    if run.root.startswith("s3://"):
        return
    # ultralytics reads it as a detection dataset (checked once: importing ultralytics is slow)
    from ultralytics.data.utils import check_det_dataset

    info = check_det_dataset(str(ds.data_yaml))
    assert info["nc"] == 6 and info["names"][2] == "tracheal ring"


def check_synthetic_rows_join_train_only_when_kept(run, tmp_path):
    cache = tmp_path / "mat"
    real = materialize_fold(run, 0, cache)
    synthetic = _synthetic(run, [True, True, False])
    mixed = materialize_fold(run, 0, cache, synthetic=synthetic)
    assert mixed.root != real.root
    assert mixed.synthetic_ids == ["syn0000000000000", "syn0000000000001"]
    assert set(mixed.train_ids) == set(real.train_ids) | set(mixed.synthetic_ids)
    assert mixed.val_ids == real.val_ids
    image = mixed.root / "images" / "train" / "syn0000000000001.png"
    assert image.read_bytes() == b"fake png 1"
    assert (mixed.root / "labels" / "train" / "syn0000000000001.txt").read_text().startswith("2 0.500000 0.400000")
    assert not (mixed.root / "images" / "train" / "syn0000000000002.png").exists()
    # an image-rows-only table (IMAGE_SCHEMA, no `kept`) works as well
    plain = synthetic.select(IMAGE_SCHEMA.names).slice(0, 1)
    assert materialize_fold(run, 0, cache, synthetic=plain).synthetic_ids == ["syn0000000000000"]
