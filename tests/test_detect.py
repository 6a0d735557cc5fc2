"""Detector training on a phantom fold: every preset for one real epoch of a tiny YOLO, the sampler
really drives the trainer (main images and mosaic/mixup tiles), offline, no Ray Tune side reports."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml
from ultralytics.data.augment import CopyPaste, CutMix, MixUp, Mosaic

from t2id import layout
from t2id.data.config import PAPER_CLASSES
from t2id.data.importer import copy_images
from t2id.data.manifest import FOLDS_SCHEMA, image_id_of
from t2id.data.materialize import materialize_fold
from t2id.data.phantom import write_phantom
from t2id.data.validate import scan_dataset
from t2id.detect.config import PRESETS, DetectorConfig, StrategySpec
from t2id.detect.samplers import CASSampler, RFSSampler
from t2id.detect.train import METRIC_NAMES, PR_POINTS, detect, detect_on_store, train_overrides
from t2id.detect.trainer import (
    SampledMixUp,
    SampledMosaic,
    SampledYOLODataset,
    T2IDDetectionTrainer,
    is_integration_callback,
)
from t2id.errors import UserError
from t2id.store import open_store, sha256_file

TINY = DetectorConfig(model="yolov8n.yaml", imgsz=64, epochs=1, batch=8)
N_SYNTHETIC = 4

# --- no network: an audit hook records every non-loopback socket use while `NET["on"]` ------------
NET: dict = {"on": False, "calls": []}
_LOCAL = {"127.0.0.1", "localhost", "::1", None, ""}


def _audit(event: str, args: tuple) -> None:
    if not NET["on"]:
        return
    if event == "socket.getaddrinfo" and args[0] not in _LOCAL:
        NET["calls"].append((event, args[0]))
    elif event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in _LOCAL:
        NET["calls"].append((event, args[1]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """A run store with the data + split stage outputs of a 4-subject, 64 px phantom (2 folds of 12 images),
    plus a few 'synthetic' images (another phantom) uploaded like the generate stage does."""
    base = tmp_path_factory.mktemp("detect")
    root = write_phantom(base / "phantom", subjects=4, frames_per_subject=6, size=64, seed=0)
    scan = scan_dataset(root)
    store = open_store(str(base / "store"))
    manifest = copy_images(scan, store)
    store.write_table(layout.data.manifest, manifest)
    store.write_text(layout.data.classes, json.dumps({"names": scan.names}))
    groups = sorted(set(manifest["group"].to_pylist()))
    fold_of = {g: i % 2 for i, g in enumerate(groups)}
    store.write_table(layout.split.folds, pa.table({
        "image_id": manifest["image_id"],
        "fold": pa.array([fold_of[g] for g in manifest["group"].to_pylist()], pa.int32()),
        "group": manifest["group"],
    }, schema=FOLDS_SCHEMA))

    synth_root = write_phantom(base / "synthetic", subjects=1, frames_per_subject=N_SYNTHETIC + 1, size=64, seed=9)
    rows = []
    for i, png in enumerate(sorted((synth_root / "images").glob("*.png"))):
        digest = sha256_file(png)
        key = layout.generate.image(0, "tracheal ring", png.stem)
        store.write_file(key, png)
        label_lines = (synth_root / "labels" / f"{png.stem}.txt").read_text().splitlines()
        boxes = [dict(zip(("class_id", "x", "y", "w", "h"), (int(v[0]), *map(float, v[1:]))))
                 for v in (line.split() for line in label_lines)]
        rows.append({"image_id": image_id_of(digest), "uri": store.uri(key), "sha256": digest, "boxes": boxes,
                     "kept": i < N_SYNTHETIC})  # the last one was rejected by the quality gate
    synthetic = pa.Table.from_pylist(rows)
    cache = base / "cache"
    fold = materialize_fold(store, 0, cache)
    return {"store": store, "cache": cache, "fold": fold, "synthetic": synthetic, "base": base}


def _walk(transform, seen=None):
    """Every transform of a pipeline: nested Composes and mix transforms' pre_transforms included."""
    seen = set() if seen is None else seen
    if id(transform) in seen:
        return
    seen.add(id(transform))
    yield transform
    for child in [*getattr(transform, "transforms", []), getattr(transform, "pre_transform", None)]:
        if child is not None:
            yield from _walk(child, seen)


def _train_images(run_dir: Path) -> int:
    args = yaml.safe_load((run_dir / "train" / "args.yaml").read_text())
    data = yaml.safe_load(Path(args["data"]).read_text())
    return len(list((Path(data["path"]) / data["train"]).iterdir()))


def test_strategies_are_data_presets_or_new_combinations():
    from t2id.detect.config import resolve_strategy

    assert resolve_strategy("t2id_cas") == StrategySpec(name="t2id_cas", sampling="cas", synthetic=True)
    assert resolve_strategy("baseline").augment == "plain" and resolve_strategy("mosaic_mixup").sampling == "none"
    custom = resolve_strategy({"name": "cas_mosaic_cw", "sampling": "cas", "augment": "mosaic_mixup",
                               "class_weights": True})
    assert (custom.sampling, custom.augment, custom.class_weights, custom.synthetic) == ("cas", "mosaic_mixup",
                                                                                         True, False)
    with pytest.raises(UserError, match="unknown strategy 'cass'"):
        resolve_strategy("cass")
    with pytest.raises(UserError, match="invalid strategy"):
        resolve_strategy({"name": "x", "sampling": "oversample"})
    with pytest.raises(UserError, match="invalid strategy"):
        resolve_strategy({"name": "Bad Name"})


def test_the_network_guard_sees_lookups():
    import socket

    NET.update(on=True, calls=[])
    try:
        with pytest.raises(OSError):
            socket.getaddrinfo("assets.t2id.invalid", 443)
    finally:
        NET["on"] = False
    assert NET["calls"] == [("socket.getaddrinfo", "assets.t2id.invalid")]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_trains_one_epoch_and_reports_six_classes(phantom_run, name):
    spec = PRESETS[name]
    store, cache = phantom_run["store"], phantom_run["cache"]
    NET.update(on=True, calls=[])
    try:
        result = detect_on_store(store, 0, spec, TINY, cache, seed=0, synthetic=phantom_run["synthetic"])
    finally:
        NET["on"] = False
    assert NET["calls"] == []  # nothing tried to reach the network (fonts, weights, telemetry)

    assert result.names == PAPER_CLASSES
    assert set(result.per_class) == set(PAPER_CLASSES)
    for cls in PAPER_CLASSES:
        assert result.val_instances[cls] > 0  # the phantom's val fold holds every class...
        metrics = result.per_class[cls]
        assert set(metrics) == set(METRIC_NAMES)
        assert all(0.0 <= metrics[m] <= 1.0 for m in METRIC_NAMES), (cls, metrics)  # ...so none is NaN
        curve = result.pr_curves[cls]
        assert len(curve) == PR_POINTS and curve[0][0] == 0.0 and curve[-1][0] == 1.0
        assert all(0.0 <= p <= 1.0 for _, p in curve)
    assert set(result.overall) == set(METRIC_NAMES)
    rows = result.to_rows(fold=0)
    assert len(rows) == 7 and {r["class_name"] for r in rows} == {*PAPER_CLASSES, "all"}
    assert all(r["fold"] == 0 and r["strategy"] == name for r in rows)

    # outputs in the run store
    saved = json.loads(store.read_text(layout.grid.trial_metrics(0, name, 0)))
    assert saved["per_class"].keys() == set(PAPER_CLASSES) and saved["fold"] == 0 and saved["seed"] == 0
    assert saved["weights"] == layout.grid.weights(0, name, 0) and result.weights.name == "last.pt"
    assert store.sha256(layout.grid.weights(0, name, 0)) == sha256_file(result.weights)
    # equal compute for every preset (default budget: the fold's 12 real train images x 1 epoch, synthetic
    # images not counted), counted during training; the final model is the one reported
    assert (saved["budget_unit"], saved["budget"], saved["images_seen"]) == ("images_seen", 12, 12)
    assert result.images_seen == 12 and result.optimizer_steps == 1  # 2 batches, accumulate capped at 2
    assert saved["selection"] == "final" and saved["n_real_train"] == 12
    # every val image has a predictions row; the reported mAP is computed from them
    pred = store.read_table(layout.grid.predictions(0, name, 0))
    assert sorted(pred["image_id"].to_pylist()) == sorted(phantom_run["fold"].val_ids)
    assert sum(len(g) for g in pred["gt"].to_pylist()) == sum(result.val_instances.values())
    from t2id.detect.predictions import coco_map
    assert coco_map(pred, len(PAPER_CLASSES)).map50_95 == pytest.approx(result.overall["map50_95"])

    # the strategy reached ultralytics: synthetic images, class-weighted loss
    run_dir = result.best_weights.parent.parent.parent
    assert _train_images(run_dir) == 12 + (N_SYNTHETIC if spec.synthetic else 0)
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(result.best_weights)
    weights = getattr(model, "class_weights", None)
    assert (weights is not None) == spec.class_weights
    if spec.class_weights:  # inverse frequency: the rare tracheal ring outweighs the frequent strap muscle
        assert weights[PAPER_CLASSES.index("tracheal ring")] > weights[PAPER_CLASSES.index("strap muscle")]


@pytest.mark.parametrize("sampling", ["cas", "rfs"])
def test_trainer_draws_from_the_sampler_including_mosaic_and_mixup_tiles(phantom_run, tmp_path, sampling):
    spec = StrategySpec(name=f"{sampling}_mosaic", sampling=sampling, augment="mosaic_mixup", cas_epoch_size=24)
    overrides = train_overrides(phantom_run["fold"].data_yaml, spec, TINY, TINY.model, tmp_path, seed=0,
                                device="cpu", workers=0)
    trainer = T2IDDetectionTrainer(overrides=overrides, sampling=spec.sampling, rfs_threshold=spec.rfs_threshold,
                                   cas_epoch_size=spec.cas_epoch_size)
    trainer.train()

    sampler, dataset = trainer.train_sampler, trainer.train_loader.dataset
    assert isinstance(sampler, CASSampler if sampling == "cas" else RFSSampler)
    assert isinstance(dataset, SampledYOLODataset)
    n_draws = len(sampler)
    assert trainer.images_seen == n_draws  # counted per forward pass
    if sampling == "cas":
        assert n_draws == 24 and len(trainer.train_loader) == 3  # 24 draws / batch 8, from 12 images
    else:
        assert n_draws == round(sampler.repeat_factors.sum()) > len(dataset)  # rare images repeated
    # every main image of the epoch is exactly the sampler's epoch 0
    expected = np.bincount(sampler.epoch_indices(0), minlength=len(dataset))
    assert np.array_equal(dataset.primary_draws, expected)
    # mosaic (p=1) took 3 partner tiles per image, mixup more, all through the sampler's distribution
    assert dataset.partner_draws.sum() >= 3 * n_draws
    assert SampledMosaic in {type(t) for t in dataset.transforms.transforms[0].transforms}
    assert any(isinstance(t, SampledMixUp) for t in dataset.transforms.transforms)
    # built with ultralytics' own arguments, shared sub-pipelines still shared, no uniform mix step left
    pipeline = dataset.transforms.transforms
    mosaic = next(t for t in pipeline[0].transforms if isinstance(t, SampledMosaic))
    mixup = next(t for t in pipeline if isinstance(t, SampledMixUp))
    assert (mosaic.imgsz, mosaic.n, mosaic.p, mixup.p) == (TINY.imgsz, 4, 1.0, 0.15)
    assert mixup.pre_transform is pipeline[0] and mosaic.dataset is dataset
    assert not [t for t in _walk(dataset.transforms) if type(t) in (Mosaic, MixUp, CutMix, CopyPaste)]
    # the partner distribution is the sampler's marginal, not the uniform one ultralytics uses
    before = dataset.partner_draws.copy()
    draws = np.array(dataset.draw_partners(40_000))
    freq = np.bincount(draws, minlength=len(dataset)) / draws.size
    marginal = sampler.marginal()
    assert 0.5 * np.abs(freq - marginal).sum() < 0.03
    assert 0.5 * np.abs(marginal - 1 / len(dataset)).sum() > (0.1 if sampling == "cas" else 0.02)
    assert np.array_equal(dataset.partner_draws - before, np.bincount(draws, minlength=len(dataset)))


def test_integration_callbacks_are_dropped(phantom_run, tmp_path):
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.callbacks import raytune

    assert SETTINGS["raytune"] and raytune.callbacks  # ultralytics would add its Ray Tune reporter...
    overrides = train_overrides(phantom_run["fold"].data_yaml, PRESETS["cas"], TINY, TINY.model, tmp_path, 0,
                                "cpu", 0)
    trainer = T2IDDetectionTrainer(overrides=overrides, sampling="cas")
    for event, funcs in trainer.callbacks.items():  # ...but our trainer (and its validator) never run it
        assert not any(is_integration_callback(f) for f in funcs), event
    assert raytune.on_fit_epoch_end not in trainer.callbacks["on_fit_epoch_end"]


def test_ultralytics_never_reports_into_a_ray_tune_session(phantom_run, ray_local, tmp_path):
    from ray import tune

    data_yaml = str(phantom_run["fold"].data_yaml)

    def trainable(config):
        result = detect(Path(data_yaml), PRESETS["cas"], TINY, Path(config["out"]), seed=0)
        tune.report({"t2id_map50_95": result.overall["map50_95"]})

    tuner = tune.Tuner(trainable, param_space={"out": str(tmp_path / "trial")},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="t", verbose=0))
    grid = tuner.fit()
    assert not grid.errors
    history = grid[0].metrics_dataframe
    assert len(history) == 1  # only our report: ultralytics would add one per epoch + one for best.pt
    assert not [c for c in history.columns if c.startswith("metrics/")]


def test_weights_path_trains_and_missing_models_are_user_errors(phantom_run, tmp_path):
    data_yaml = phantom_run["fold"].data_yaml
    start = detect(data_yaml, PRESETS["baseline"], TINY, tmp_path / "a", seed=0)
    NET.update(on=True, calls=[])
    try:
        tuned = detect(data_yaml, PRESETS["baseline"], TINY.model_copy(update={"model": str(start.best_weights)}),
                       tmp_path / "b", seed=0)
    finally:
        NET["on"] = False
    assert NET["calls"] == []
    assert tuned.best_weights.is_file() and not math.isnan(tuned.overall["map50"])
    for model, message in (("missing/yolov9s.pt", "does not exist"), ("yolov9s", "bare name"),
                           ("nope-v99.yaml", "neither a local model yaml")):
        with pytest.raises(UserError, match=message):
            detect(data_yaml, PRESETS["baseline"], TINY.model_copy(update={"model": model}), tmp_path / "c", seed=0)
    with pytest.raises(UserError, match="does not exist"):
        detect(tmp_path / "no-data.yaml", PRESETS["baseline"], TINY, tmp_path / "d", seed=0)


def test_s3_weights_are_fetched_into_the_cache_and_missing_ones_are_user_errors(s3_bucket, tmp_path):
    from t2id.detect.train import resolve_model

    store = open_store(f"s3://{s3_bucket}/weights")
    (tmp_path / "w.pt").write_bytes(b"not really a checkpoint")
    store.write_file("yolo/w.pt", tmp_path / "w.pt")
    local = resolve_model(f"s3://{s3_bucket}/weights/yolo/w.pt", tmp_path / "cache")
    assert Path(local).read_bytes() == b"not really a checkpoint"
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(f"s3://{s3_bucket}/weights/yolo/missing.pt", tmp_path / "cache")


def test_synthetic_strategy_without_a_synthetic_set_is_a_user_error(phantom_run):
    with pytest.raises(UserError, match="synthetic"):
        detect_on_store(phantom_run["store"], 0, "t2id_cas", TINY, phantom_run["cache"], seed=0, synthetic=None)


def test_stored_predictions_agree_with_pycocotools(phantom_run, tmp_path):
    """A real tiny YOLO trial (3 epochs, so it predicts something): COCOeval on its stored
    predictions.parquet gives the mAP50-95 the trial reports, within 0.01."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    store, cache = phantom_run["store"], phantom_run["cache"]
    detector = TINY.model_copy(update={"epochs": 3, "lr": 4e-3, "warmup_epochs": 0, "nominal_batch": 8,
                                       "validate_every_epoch": False})
    result = detect_on_store(store, 0, PRESETS["baseline"], detector, cache, seed=1)
    assert result.images_seen == 36 and result.optimizer_steps == 6
    table = store.read_table(layout.grid.predictions(0, "baseline", 1)).to_pylist()
    assert sum(len(r["pred"]) for r in table) > 0
    assert all(len(r["pred"]) <= 300 and all(p["conf"] >= 0.001 for p in r["pred"]) for r in table)
    side = 64.0
    images, anns, dets = [], [], []
    for i, row in enumerate(table):
        images.append({"id": i, "width": side, "height": side})
        for b in row["gt"]:
            w, h = b["w"] * side, b["h"] * side
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": b["class_id"], "iscrowd": 0,
                         "bbox": [b["x"] * side - w / 2, b["y"] * side - h / 2, w, h], "area": w * h})
        for p in row["pred"]:
            w, h = p["w"] * side, p["h"] * side
            dets.append({"image_id": i, "category_id": p["class_id"], "score": p["conf"],
                         "bbox": [p["x"] * side - w / 2, p["y"] * side - h / 2, w, h]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c} for c in range(len(PAPER_CLASSES))]}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.params.areaRng = [[0, 1e10]] * 4  # area range "all" only (coco_map has no area ranges)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert abs(ev.stats[0] - result.overall["map50_95"]) < 0.01
