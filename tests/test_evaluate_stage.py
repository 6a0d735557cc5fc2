"""Stage `evaluate` end to end on a hand-built run (real Ray Data, S3 test server, tiny weights)."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from t2id import layout
from t2id.config import validate_config
from t2id.data.manifest import FOLDS_SCHEMA, IMAGE_SCHEMA, SYNTHETIC_SCHEMA
from t2id.errors import UserError
from t2id.evaluate import cache
from t2id.evaluate.config import EvaluateConfig
from t2id.evaluate.core import real_rows_of_class
from t2id.evaluate.ray_layer import FeatureBatch
from t2id.evaluate.stage import STAGE
from t2id.runner import StageContext
from t2id.store import open_store

METRICS_KEY, TABLE_CSV_KEY, TABLE_MD_KEY = (layout.evaluate.metrics, layout.evaluate.table1_csv,
                                           layout.evaluate.table1_md)

NAMES = ["thyroid lobe", "tracheal ring", "vocal fold"]
PROMPTS = {1: "High-resolution ultrasound scan of the human tracheal ring",
           2: "High-resolution ultrasound scan of the human vocal fold"}
SIZE = 48


def _speckle(rng: np.random.Generator, bright: float = 0.0) -> bytes:
    """An ultrasound-ish grey image: speckle noise around a darker band; `bright` shifts the distribution."""
    img = rng.gamma(2.0, 30.0, (SIZE, SIZE)) + bright
    img[SIZE // 3: SIZE // 2] *= 0.4
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def build_run(store, folds: int = 2, subjects: int = 4, frames: int = 4, synthetic: int = 5) -> None:
    """data/ + split/ + generate/ artifacts as the upstream stages write them (schemas from t2id.data.manifest)."""
    rng = np.random.default_rng(0)
    store.write_text(layout.data.classes, json.dumps({"names": NAMES}))
    rows, fold_rows = [], []
    for subject in range(subjects):
        for frame in range(frames):
            data = _speckle(rng)
            sha = hashlib.sha256(data).hexdigest()
            key = layout.data.image(sha[:16], ".png")
            store.write_bytes(key, data)
            # every image shows the thyroid lobe; tracheal ring in 3 of 4 frames, vocal fold in half
            boxes = [{"class_id": 0, "x": 0.5, "y": 0.5, "w": 0.2, "h": 0.2}]
            boxes += [{"class_id": 1, "x": 0.3, "y": 0.3, "w": 0.1, "h": 0.1}] if frame < 3 else []
            boxes += [{"class_id": 2, "x": 0.7, "y": 0.7, "w": 0.1, "h": 0.1}] if frame % 2 == 0 else []
            rows.append({"image_id": sha[:16], "uri": store.uri(key), "width": SIZE, "height": SIZE,
                         "group": f"s{subject}", "source": "real", "boxes": boxes, "sha256": sha})
            fold_rows.append({"image_id": sha[:16], "fold": subject % folds, "group": f"s{subject}"})
    store.write_table(layout.data.manifest, pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
    store.write_table(layout.split.folds, pa.Table.from_pylist(fold_rows, schema=FOLDS_SCHEMA))
    for fold in range(folds):
        syn = []
        for class_id in (1, 2):
            # tracheal ring: drawn like the real images; vocal fold: a clearly shifted distribution
            bright = 0.0 if class_id == 1 else 120.0
            for i in range(synthetic + 1):
                data = _speckle(rng, bright)
                sha = hashlib.sha256(data).hexdigest()
                key = layout.generate.image(fold, NAMES[class_id], f"{i:04d}")
                store.write_bytes(key, data)
                kept = i < synthetic  # the last one failed the quality gate: must not be counted
                syn.append({"image_id": sha[:16], "uri": store.uri(key), "width": SIZE, "height": SIZE,
                            "group": f"synthetic-fold{fold}", "source": "synthetic", "boxes": [], "sha256": sha,
                            "fold": fold, "class_id": class_id, "prompt": PROMPTS[class_id], "negative_prompt": "",
                            "seed": i, "steps": 4, "guidance": 7.5, "scheduler": "euler", "base_model": "tiny",
                            "lora_sha256": "0" * 64, "entropy": 6.0, "std": 40.0, "clip_score": None,
                            "kept": kept, "reject_reason": None if kept else "std<=30", "label_source": None})
        store.write_table(layout.generate.manifest(fold), pa.Table.from_pylist(syn, schema=SYNTHETIC_SCHEMA))


NO_LABEL = ["data", "split", "lora", "generate", "evaluate"]


def _run(store, tmp_path, force: bool = False, stages=NO_LABEL, **evaluate):
    """The stage as the runner calls it: its settings from a config, a context without the config."""
    cfg = validate_config({"run": {"id": "evaltest", "stages": stages}, "cluster": {"num_cpus": 2},
                           "grid": {"detector": {"imgsz": 32}},
                           "evaluate": {"kid_subsets": 20, "batch_size": 8, "is_splits": 5, **evaluate}})
    ctx = StageContext(store=store, stage="evaluate", cache_dir=tmp_path / "cache", cluster=cfg.cluster,
                       endpoint_url=cfg.store.endpoint_url, force=force)
    return STAGE.run(ctx, STAGE.settings(cfg))


@pytest.fixture
def s3_run_store(s3_bucket, s3_server):
    return open_store(f"s3://{s3_bucket}/runs", endpoint_url=s3_server).child("evaltest")


def test_feature_batch_call_without_ray(tmp_path):
    store = open_store(str(tmp_path / "store"))
    build_run(store, folds=2, subjects=2, frames=1, synthetic=1)
    syn = store.read_table(layout.generate.manifest(0)).to_pylist()[:2]
    fn = FeatureBatch(store, EvaluateConfig(batch_size=4), str(tmp_path / "cache"), "cpu")
    out = fn({"uri": np.array([r["uri"] for r in syn]), "prompt": np.array([r["prompt"] for r in syn]),
              "score_clip": np.array([True, False])})
    assert out["pool3"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert 0 <= out["clip"][0] <= 100 and math.isnan(out["clip"][1])
    assert list(out["uri"]) == [r["uri"] for r in syn]


def test_evaluate_stage_on_s3_with_ray_and_real_feature_cache(s3_run_store, tmp_path, ray_local):
    store = s3_run_store
    build_run(store)
    result = _run(store, tmp_path)
    assert set(result.outputs) == {METRICS_KEY, TABLE_CSV_KEY, TABLE_MD_KEY}
    assert all(store.sha256(k) == v for k, v in result.outputs.items())
    table = store.read_table(METRICS_KEY)
    for column in ("fold", "class", "fid", "kid_mean", "kid_std", "is_mean", "is_std", "clip_score",
                   "n_real", "n_synthetic"):
        assert column in table.column_names
    rows = {(r["fold"], r["class"]): r for r in table.to_pylist()}
    assert set(rows) == {(f, c) for f in (0, 1) for c in ("tracheal ring", "vocal fold")}

    # sample sizes: the fold's VALIDATION images holding the class (2 subjects x frames with it), kept synthetic only
    from t2id.data.manifest import load_fold_rows

    for fold in (0, 1):
        val = load_fold_rows(store, fold, "val")
        assert rows[(fold, "tracheal ring")]["n_real"] == real_rows_of_class(val, 1).num_rows == 6
        assert rows[(fold, "vocal fold")]["n_real"] == real_rows_of_class(val, 2).num_rows == 4
        assert rows[(fold, "vocal fold")]["synthetic_source"] == "generate: kept text-to-image samples"
        assert rows[(fold, "vocal fold")]["imgsz"] == 32
        assert rows[(fold, "tracheal ring")]["n_synthetic"] == rows[(fold, "vocal fold")]["n_synthetic"] == 5
        near, far = rows[(fold, "tracheal ring")], rows[(fold, "vocal fold")]
        assert np.isfinite([near["fid"], far["fid"], near["kid_mean"], near["is_mean"]]).all()
        assert far["fid"] > 2 * near["fid"]  # the shifted synthetic set is measurably further from real
        assert far["kid_mean"] > near["kid_mean"]
        assert 1.0 <= near["is_mean"] <= 5.0  # IS is bounded by the number of images per split
        assert 0.0 <= near["clip_score"] <= 100.0
    assert result.summary["cache_hits"] == [] and result.summary["extracted_images"] == 12 + 20
    for fold in (0, 1):
        for kind in cache.KINDS:
            assert store.exists(layout.evaluate.features(fold, kind))
            assert store.exists(layout.memo(layout.evaluate.cache(fold, kind)))

    md = store.read_text(TABLE_MD_KEY)
    assert "| tracheal ring |" in md and "16.112 / 18.184 / 30.4036" in md  # ours beside paper Table I
    # tiny stand-in networks: every metrics row and every table row says so
    assert set(table["networks"].to_pylist()) == {"stand-in, not comparable (random InceptionV3 and CLIP)"}
    assert all("[stand-in, not comparable]" in line for line in md.splitlines() if "| tracheal ring |" in line
               or "| vocal fold |" in line)
    assert "stand-in, not comparable (random InceptionV3 and CLIP)" in store.read_text(TABLE_CSV_KEY)
    assert "tracheal ring" in store.read_text(TABLE_CSV_KEY)

    # A rerun (e.g. other KID settings) reuses every cached feature: no Ray pass, same FID/IS/CLIP.
    again = _run(store, tmp_path, kid_subsets=5)
    assert again.summary["cache_hits"] == [0, 1] and again.summary["extracted_images"] == 0
    before, after = table.to_pandas(), store.read_table(METRICS_KEY).to_pandas()
    for column in ("fid", "is_mean", "clip_score", "n_real", "n_synthetic"):
        np.testing.assert_allclose(after[column], before[column], rtol=1e-6)

    # A unit's identity covers the weights and every image's sha256: a changed image or weight misses.
    syn = store.read_table(layout.evaluate.features(1, "synthetic"))
    images = list(zip(syn["id"].to_pylist(), syn["sha256"].to_pylist(), strict=True))
    weights = cache.unit_weights("synthetic", "tiny-seed0", "tiny-seed0", 32)
    assert not cache.feature_memo(store, 1, "synthetic", {**weights, "imgsz": "64"}, images).done()  # other resize
    assert cache.feature_memo(store, 1, "synthetic", weights, images).done()
    assert not cache.feature_memo(store, 1, "synthetic", weights, [(images[0][0], "0" * 64)] + images[1:]).done()
    assert not cache.feature_memo(store, 1, "synthetic", {**weights, "clip": "other"}, images).done()
    assert cache.feature_memo(store, 1, "real", cache.unit_weights("real", "tiny-seed0", "other", 32),
                              _real_images(store, 1)).done()  # real features never depend on CLIP
    # A cache output that changed under its memo is not trusted: that fold's unit is extracted again.
    store.write_table(layout.evaluate.features(1, "synthetic"), syn.slice(0, 3))
    third = _run(store, tmp_path)
    assert third.summary["cache_hits"] == [0] and third.summary["extracted_images"] == 10
    # --force evaluate ignores every memo.
    forced = _run(store, tmp_path, force=True)
    assert forced.summary["cache_hits"] == [] and forced.summary["extracted_images"] == 12 + 20


def _real_images(store, fold: int) -> list[tuple[str, str]]:
    table = store.read_table(layout.evaluate.features(fold, "real"))
    return list(zip(table["id"].to_pylist(), table["sha256"].to_pylist(), strict=True))


def test_evaluate_stage_errors_name_what_to_fix(tmp_path):
    store = open_store(str(tmp_path / "store"))
    build_run(store, subjects=2, frames=1, synthetic=1)
    with pytest.raises(UserError, match=r"evaluate\.inception_weights: .*missing\.pt not found"):
        _run(store, tmp_path, inception_weights=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match=r"evaluate\.clip_weights: .* not found"):
        _run(store, tmp_path, clip_weights=str(tmp_path / "no-clip"))
    for fold in (0, 1):
        store.delete(layout.generate.manifest(fold))
    with pytest.raises(UserError, match="run the generate stage first"):
        _run(store, tmp_path)


# ------------------------------------------------------------------ `t2id models cache`
def _run_cli(argv: list[str]) -> int:
    from t2id.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_models_cache_refuses_without_allow_network(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("run: {id: x}\nevaluate: {inception_weights: s3://b/models/inception.pth}\n")
    assert _run_cli(["models", "cache", str(config)]) == 1
    err = capsys.readouterr().err
    assert "evaluate.allow_network is false" in err and "Traceback" not in err
    # with network allowed and only tiny stand-ins, there is nothing to download (and nothing is)
    config.write_text("run: {id: x}\nevaluate: {allow_network: true}\n")
    assert _run_cli(["models", "cache", str(config), "--out", str(tmp_path / "models")]) == 0
    assert "nothing to fetch" in capsys.readouterr().out
    assert not (tmp_path / "models").exists()


def test_models_cache_plan_follows_the_config_values(tmp_path):
    from t2id.config import builtin_config, load_config
    from t2id.evaluate.cli import plan_fetches

    local = tmp_path / "have.pth"
    local.write_bytes(b"x")
    cfg = load_config(builtin_config("t2id-cas"))
    fetches, skipped = plan_fetches(cfg)
    by_key = {f.config_key: f for f in fetches}
    # s3 destinations: download from the hub default, upload to exactly the configured URI
    assert by_key["evaluate.inception_weights"].source.endswith("weights-inception-2015-12-05-6726825d.pth")
    assert by_key["evaluate.inception_weights"].upload_to == cfg.evaluate.inception_weights
    assert by_key["evaluate.clip_weights"].source == "openai/clip-vit-large-patch14"
    assert by_key["lora.base_model"].source == "stabilityai/stable-diffusion-xl-base-1.0"
    assert by_key["lora.base_model"].upload_to == "s3://my-bucket/models/stable-diffusion-xl-base-1.0"
    # a hub id is itself the source; an existing local file is left alone
    cfg.evaluate.clip_weights = "laion/CLIP-ViT-g-14"
    cfg.evaluate.inception_weights = str(local)
    fetches, skipped = plan_fetches(cfg)
    by_key = {f.config_key: f for f in fetches}
    assert by_key["evaluate.clip_weights"].source == "laion/CLIP-ViT-g-14" and by_key["evaluate.clip_weights"].upload_to is None
    assert "evaluate.inception_weights" not in by_key and any("exists locally" in s for s in skipped)


def test_small_sets_give_nan_not_errors_and_the_table_says_n_a():
    from t2id.evaluate.core import METRICS_SCHEMA, class_metrics, table1

    rng = np.random.default_rng(0)
    real = rng.normal(size=(6, 2048))
    none = class_metrics(real, np.zeros((0, 2048)), np.zeros((0, 1008)), np.zeros(0), 10, 1000, 10, seed=0)
    one = class_metrics(real, rng.normal(size=(1, 2048)), rng.normal(size=(1, 1008)), np.array([31.0]), 10, 1000, 1,
                        seed=0)
    with pytest.raises(UserError, match=r"is_splits=10 but only 1 synthetic image\(s\).*is_splits <= 1"):
        class_metrics(real, rng.normal(size=(1, 2048)), rng.normal(size=(1, 1008)), np.array([31.0]), 10, 1000, 10,
                      seed=0)
    assert none["n_synthetic"] == 0 and math.isnan(none["fid"]) and math.isnan(none["is_mean"])
    assert math.isnan(one["fid"]) and math.isnan(one["kid_mean"]) and one["is_mean"] == pytest.approx(1.0)
    assert one["clip_score"] == 31.0 and one["n_real"] == 6
    from t2id.evaluate.core import REAL_NETWORKS, networks_note
    assert networks_note("/w/inception.pth", "/w/clip") == REAL_NETWORKS
    assert networks_note("/w/inception.pth", "tiny") == "stand-in, not comparable (random CLIP)"
    table = pa.Table.from_pylist([{"fold": 0, "class": "vocal fold", "class_id": 5, **none,
                                   "networks": REAL_NETWORKS}], schema=METRICS_SCHEMA)
    csv_text, md = table1(table, "SDXL-LoRA")
    assert "| SDXL-LoRA | vocal fold | 1 | n/a |" in md and "5.54 / 17.623 / 29.8079" in md
    assert "stand-in" not in md and REAL_NETWORKS in csv_text
    assert csv_text.splitlines()[0].startswith("model,class,folds,fid_mean")


# ------------------------------------------------------------------ what re-runs the stage
def test_settings_name_exactly_the_cross_section_inputs():
    """evaluate's marker changes with lora.base_model (Table I's model label) and run.seed, not with
    other lora values, and with the weights' content (external inputs), not just their path."""
    from t2id.runner import settings_hash

    def digest(**sections):
        return settings_hash(STAGE.settings(validate_config({"run": {"id": "x"}, **sections})))

    base = digest()
    real_nets = {"inception_weights": "s3://b/models/inception.pth", "clip_weights": "s3://b/models/clip"}
    assert digest(lora={"base_model": "s3://b/models/sdxl"}, evaluate=real_nets) != digest(evaluate=real_nets)
    assert digest(run={"id": "x", "seed": 7}) != base
    assert digest(evaluate={"kid_subsets": 3}) != base
    assert digest(lora={"epochs": 3}) == base and digest(grid={"seed": 3}) == base
    assert digest(grid={"detector": {"imgsz": 64}}) != base  # images are resized to the detector's input
    assert digest(label={"method": "inpaint"}) != base  # the measured rows are label's, and it says how labelled
    no_label = ["data", "split", "generate", "evaluate"]
    assert digest(run={"id": "x", "stages": no_label}, label={"method": "inpaint"}) == \
        digest(run={"id": "x", "stages": no_label})  # label off: generate's rows, whatever label.method says


def test_weights_fingerprint_follows_content_not_path(tmp_path, s3_bucket, s3_server):
    local = tmp_path / "inception.pth"
    assert cache.weights_fingerprint(str(local)) == "missing"
    local.write_bytes(b"one")
    first = cache.weights_fingerprint(str(local))
    local.write_bytes(b"two")
    assert cache.weights_fingerprint(str(local)) != first
    assert cache.weights_fingerprint("tiny") == "tiny-seed0"
    remote = open_store(f"s3://{s3_bucket}/models", endpoint_url=s3_server)
    remote.write_bytes("inception.pth", b"one")
    remote.write_bytes("clip/config.json", b"{}")
    assert cache.weights_fingerprint(f"s3://{s3_bucket}/models/inception.pth") == remote.sha256("inception.pth")
    assert cache.weights_fingerprint(f"s3://{s3_bucket}/models/clip/") not in ("missing", first)
    assert cache.weights_fingerprint(f"s3://{s3_bucket}/models/none") == "missing"


def test_table1_std_over_folds_is_the_sample_std():
    from t2id.evaluate.core import METRICS_SCHEMA, REAL_NETWORKS, table1

    rows = [{"fold": f, "class": "vocal fold", "class_id": 5, "fid": fid, "kid_mean": 0.0, "kid_std": 0.0,
             "kid_subset_size": 2, "is_mean": 1.0, "is_std": 0.0, "clip_score": 30.0, "n_real": 3,
             "n_synthetic": 3, "networks": REAL_NETWORKS} for f, fid in ((0, 1.0), (1, 3.0))]
    csv_text, md = table1(pa.Table.from_pylist(rows, schema=METRICS_SCHEMA), "SDXL-LoRA")
    assert "| 2.00 ± 1.41 |" in md and "ddof=1" in md  # sqrt(2): ddof=1 (ddof=0 would give 1.00)


def test_label_rows_are_measured_when_label_runs_and_images_are_resized(tmp_path):
    """With the label stage on, the synthetic set is label's kept rows WITH boxes (what the detector
    trains on), and both sets are first resized to grid.detector.imgsz."""
    from PIL import Image

    from t2id.evaluate.core import gather_sets
    from t2id.evaluate.features import detector_resize
    from t2id.label.stage import LABELS_SCHEMA

    store = open_store(str(tmp_path / "store"))
    build_run(store)
    for fold in (0, 1):
        syn = store.read_table(layout.generate.manifest(fold)).to_pylist()
        rows = []
        for i, r in enumerate(syn):
            boxed = i % 3 != 0  # every third row got no box from the labeller: not trained on, not measured
            rows.append({**{n: r.get(n) for n in LABELS_SCHEMA.names}, "label_source": "inpaint",
                         "boxes": [{"class_id": r["class_id"], "x": 0.5, "y": 0.5, "w": 0.2, "h": 0.2}] if boxed else []})
        store.write_table(layout.label.labels(fold), pa.Table.from_pylist(rows, schema=LABELS_SCHEMA))
    sets = gather_sets(store, [0, 1], NAMES, from_label=True)
    for st in sets:
        assert st.synthetic.num_rows > 0 and all(b for b in st.synthetic["boxes"].to_pylist())
        assert all(st.synthetic["kept"].to_pylist())
    generated = gather_sets(store, [0, 1], NAMES)
    assert sum(st.synthetic.num_rows for st in sets) < sum(st.synthetic.num_rows for st in generated)

    assert detector_resize(Image.new("L", (64, 48)), 32).size == (32, 24)  # long side -> imgsz, aspect kept
    assert detector_resize(Image.new("RGB", (20, 10)), 40).size == (40, 20)
    assert detector_resize(Image.new("RGB", (32, 32)), 32).mode == "RGB"
