"""Label stage on the phantom: teacher gate, inpaint-in-box through Ray Data, memorization check."""

from __future__ import annotations

import importlib
import io
import json

import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image

from t2id import layout
from t2id.config import builtin_config, load_config, validate_config
from t2id.data.manifest import SYNTHETIC_SCHEMA, load_fold_rows, load_manifest
from t2id.errors import ConfigError
from t2id.label.memorization import WORK_SIDE, grey, nearest_neighbours, score_rows
from t2id.detect.config import DetectorConfig
from t2id.label.settings import settings
from t2id.label.stage import CLASS_COUNTS_KEY, topup_ranges
from t2id.label.teacher import REJECT_NOT_FOUND, PredBox, gate_boxes, train_teacher
from t2id.runner import run_pipeline, settings_hash
from t2id.store import open_store

TRACHEAL_RING, STRAP_MUSCLE, VOCAL_FOLD = 2, 3, 5
TINY_DETECTOR = {"model": "yolov8n.yaml", "imgsz": 64, "epochs": 1, "batch": 8}


def stages(*names: str) -> dict:
    return {n: importlib.import_module(f"t2id.{n}.stage").STAGE for n in names}


def make_config(tmp, **label) -> dict:
    return {
        "run": {"id": "lab", "seed": 0, "stages": ["data", "split", "label"]},
        "store": {"uri": str(tmp / "store"), "cache_dir": str(tmp / "cache")},
        "data": {"source": "phantom", "phantom": {"subjects": 4, "frames_per_subject": 8, "size": 128}},
        "split": {"folds": 2},
        "generate": {"images_per_class": 2, "width": 64, "height": 64, "steps": 3, "concurrency": 1,
                     "batch_size": 2},
        "grid": {"detector": TINY_DETECTOR},
        "lora": {"base_model": "tiny"},  # top-up rounds draw with the tiny SDXL (lora not run: no adapter)
        "label": label,
    }


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    """A run store with the data and split stages done on a small phantom."""
    tmp = tmp_path_factory.mktemp("label")
    cfg = validate_config(make_config(tmp))
    run_pipeline(cfg, stages=stages("data", "split"))
    return tmp, open_store(str(tmp / "store")).child("lab")


def read_pixels(store, uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.read_bytes(store.key_of(uri)))).convert("RGB"))


# --- config ----------------------------------------------------------------------------------------

def test_label_config_checks_and_defaults():
    cfg = validate_config({"label": {"method": "inpaint", "memorization": {"threshold": 0.9}}})
    assert cfg.label.memorization_threshold == 0.9  # what the report draws on the histogram
    with pytest.raises(ConfigError, match="label.memorization.feature"):
        validate_config({"label": {"memorization": {"feature": "clip"}}})
    with pytest.raises(ConfigError, match="label.teacher.sorce"):
        validate_config({"label": {"teacher": {"sorce": "grid"}}})
    assert load_config(builtin_config("demo")).label.method == "inpaint"  # tiny SDXL draws no anatomy
    assert load_config(builtin_config("t2id-cas")).label.method == "teacher"
    with pytest.raises(ConfigError, match="label.teacher.cpus"):
        validate_config({"label": {"teacher": {"cpus": 0}}})
    with pytest.raises(ConfigError, match="label.outpaint.strength"):
        validate_config({"label": {"method": "inpaint_outpaint", "outpaint": {"strength": 0}}})
    with pytest.raises(ConfigError, match="layout_lora but label.method is inpaint_outpaint"):  # as for inpaint
        validate_config({"lora": {"method": "layout_lora"}, "label": {"method": "inpaint_outpaint"}})


def test_settings_hold_the_cross_section_inputs_of_the_labeler_in_use():
    """A value of another section re-runs label exactly when the labeler in use depends on it."""
    def digest(**sections) -> str:
        return settings_hash(settings(validate_config(sections)))

    teacher = {"method": "teacher"}
    assert settings(validate_config({"label": teacher})).teacher_detector == validate_config({}).grid.detector
    assert digest(label=teacher, grid={"detector": {"epochs": 3}}) != digest(label=teacher)
    # the teacher's top-up draws with generate's generator and sampling, but not its folds or contact sheets
    assert digest(label=teacher, generate={"steps": 3}) != digest(label=teacher)
    for unused in ({"generate": {"folds": [0]}}, {"generate": {"contact_sheet_thumb": 64}}):
        assert digest(label=teacher, **unused) == digest(label=teacher), unused
    no_topup = {**teacher, "max_attempts_factor": 1.0}  # without top-up, generate's marker covers its settings
    assert settings(validate_config({"label": no_topup})).topup is None
    assert digest(label=no_topup, generate={"steps": 3}) == digest(label=no_topup)
    own = {**teacher, "teacher": {"detector": {"epochs": 5}}}  # the teacher's own detector: grid's no longer matters
    assert digest(label=own, grid={"detector": {"epochs": 3}}) == digest(label=own)

    inpaint = {"method": "inpaint"}
    assert settings(validate_config({"label": inpaint})).teacher_detector is None
    assert digest(label=inpaint, grid={"detector": {"epochs": 3}}) == digest(label=inpaint)
    real_nets = {"inception_weights": "/w/inception.pth", "clip_weights": "/w/clip"}  # a real base model needs them
    for changed in ({"generate": {"steps": 3}}, {"lora": {"base_model": "/other"}, "evaluate": real_nets},
                    {"run": {"seed": 4}},
                    {"lora": {"target_classes": [{"name": "vocal fold", "prompts": ["a fold"]}]}}):
        assert digest(label=inpaint, **changed) != digest(label=inpaint), changed
    # not used by inpainting: generate.folds (label.folds picks folds), the CLIP gate, contact sheets
    for unused in ({"generate": {"folds": [0]}}, {"generate": {"contact_sheet_thumb": 64}},
                   {"generate": {"quality": {"min_clip_score": 10}}}, {"evaluate": {"clip_weights": "/x"}}):
        assert digest(label=inpaint, **unused) == digest(label=inpaint), unused
    # label.inpaint overrides generate's value: then generate's no longer matters
    assert digest(label={**inpaint, "inpaint": {"steps": 4}}, generate={"steps": 3}) == \
        digest(label={**inpaint, "inpaint": {"steps": 4}})
    # label.outpaint re-runs label for inpaint_outpaint only
    both, outpaint = {"method": "inpaint_outpaint"}, {"outpaint": {"keep_margin": 0.3}}
    assert digest(label={**both, **outpaint}) != digest(label=both) != digest(label=inpaint)
    assert digest(label={**inpaint, **outpaint}) == digest(label=inpaint)


# --- teacher gate ------------------------------------------------------------------------------------

def test_gate_keeps_confident_boxes_and_requires_the_target_class():
    preds = [PredBox(TRACHEAL_RING, 0.8, 0.5, 0.5, 0.2, 0.1), PredBox(STRAP_MUSCLE, 0.6, 0.2, 0.2, 0.1, 0.1),
             PredBox(VOCAL_FOLD, 0.1, 0.5, 0.5, 0.1, 0.1)]
    ok = gate_boxes(preds, TRACHEAL_RING, 0.25, True, "tracheal ring")
    assert ok.kept and ok.confidence == pytest.approx(0.8)
    assert [b["class_id"] for b in ok.boxes] == [TRACHEAL_RING, STRAP_MUSCLE]  # 0.1 < min_confidence dropped
    missing = gate_boxes(preds, VOCAL_FOLD, 0.25, True, "vocal fold")  # only below-threshold vocal fold
    assert not missing.kept and missing.reject_reason.startswith(REJECT_NOT_FOUND)
    assert "'vocal fold'" in missing.reject_reason
    assert gate_boxes(preds, VOCAL_FOLD, 0.25, False).kept  # gate off: kept with the other boxes


def test_teacher_stage_rejects_images_without_target_class_and_flags_copies(phantom_run, ray_local):
    """A real teacher (trained on fold 0's TRAIN images only, in a Ray task with the CPUs its settings
    ask for) labels a hand-made generate manifest: a flat image and an other-class image must be rejected
    by the class-consistency gate; an exact copy of a training image must be flagged as memorized."""
    tmp, store = phantom_run
    train = load_fold_rows(store, 0, "train").to_pylist()
    val_ids = set(load_fold_rows(store, 0, "val")["image_id"].to_pylist())
    other = next(r for r in train if not any(b["class_id"] == VOCAL_FOLD for b in r["boxes"]))
    flat = np.full((64, 64, 3), 90, np.uint8)
    synthetic = {"flat": flat, "other": read_pixels(store, other["uri"]), "copy": read_pixels(store, train[0]["uri"])}
    rows = []
    for i, (name, pixels) in enumerate(synthetic.items()):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        key = f"generate/fold=0/images/vocal-fold/{name}.png"
        sha = store.write_bytes(key, buf.getvalue())
        row = dict.fromkeys(SYNTHETIC_SCHEMA.names)
        row.update(image_id=sha[:16], uri=store.uri(key), width=pixels.shape[1], height=pixels.shape[0],
                   group="synthetic-fold0-vocal-fold", source="synthetic", boxes=[], sha256=sha, fold=0,
                   class_id=VOCAL_FOLD, prompt="ultrasound of the vocal fold", seed=i, kept=True)
        rows.append(row)
    store.write_table("generate/fold=0/manifest.parquet", pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA))

    cfg = validate_config({**make_config(tmp, method="teacher", folds=[0], min_confidence=0.25,
                                         teacher={"cpus": 2})})
    outcome = run_pipeline(cfg, only="label", stages=stages("data", "split", "label"))
    facts = outcome[0].summary["folds"]["0"]
    # Ray work, not the driver: the task held the 2 CPUs of label.teacher.cpus (default 1) and no GPU.
    assert facts["teacher_resources"]["CPU"] == 2 and "GPU" not in facts["teacher_resources"]
    assert facts["teacher_weights"] == "trained" and facts["teacher_device"] == "cpu"

    labels = store.read_table("label/fold=0/labels.parquet")
    for column in (*SYNTHETIC_SCHEMA.names, "confidence", "nn_similarity", "memorized", "nn_image_id"):
        assert column in labels.column_names
    by_name = {r["uri"].rsplit("/", 1)[-1][:-4]: r for r in labels.to_pylist()}
    for name in ("flat", "other"):
        assert by_name[name]["kept"] is False
        assert by_name[name]["reject_reason"].startswith(REJECT_NOT_FOUND)
        assert by_name[name]["label_source"] == "teacher"
    copy = by_name["copy"]
    assert copy["memorized"] is True and copy["nn_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert copy["nn_image_id"] == train[0]["image_id"]
    assert by_name["flat"]["memorized"] is False

    # Top-up after label's rejections: the tiny SDXL draws noise, which the teacher rightly rejects, so every
    # target class gets new candidates (under label/fold=0/topup/, seeds of their own) until
    # ceil(max_attempts_factor 2 x target 2) = 4 were tried; the shortfall is what is left.
    counts = {c["class"]: c for c in json.loads(labels.schema.metadata[CLASS_COUNTS_KEY])}
    assert counts["vocal fold"]["rows"] == 4 and counts["vocal fold"]["topped_up"] == 1
    assert counts["tracheal ring"]["rows"] == 4 and counts["tracheal ring"]["topped_up"] == 4
    topup = [r for r in labels.to_pylist() if r["round"] > 0]
    assert len(topup) == 5 and all(r["uri"].startswith("label/fold=0/topup/images/") for r in topup)
    assert all(store.exists(store.key_of(r["uri"])) and r["label_source"] in ("teacher", None) for r in topup)
    assert len({r["seed"] for r in topup}) == 5 and all(r["seed"] is not None for r in topup)
    for c in counts.values():
        assert c["used"] + c["shortfall"] == 2 and c["used"] == sum(
            1 for r in labels.to_pylist() if r["class_id"] == c["class_id"] and r["kept"] and r["boxes"])
    assert facts["topup_rounds"] >= 1 and facts["topped_up"] == 5
    # One pool of top-up generators for the stage; here the teacher's task needs both of the cluster's 2 CPUs,
    # so the pool gave its actor back before each teacher run and the next round started a new one.
    assert facts["topup_pool"] == {"actors_started": facts["topup_rounds"], "warm": False}

    # The teacher never saw fold 0's validation images: its data yaml validates on the TRAIN split.
    teacher_yaml = next((tmp / "cache" / "label-teacher").glob("fold0-*/teacher-data.yaml"))
    spec = yaml.safe_load(teacher_yaml.read_text())
    assert spec["val"] == spec["train"] == "images/train"
    train_files = {p.stem for p in (teacher_yaml.parent.parent.parent / "datasets").glob("fold0-*/images/train/*")}
    assert train_files and not train_files & val_ids
    assert store.exists("label/fold=0/teacher/best.pt") and store.exists("label/memorization_hist.png")

    # A rerun reuses the trained teacher (same data, settings, seed: its memo) instead of training again.
    sentinel = teacher_yaml.parent / "sentinel"
    sentinel.write_text("a retrain would wipe this folder")
    weights_sha = store.sha256("label/fold=0/teacher/best.pt")
    detector = DetectorConfig(**TINY_DETECTOR)
    assert train_teacher(store, 0, detector, tmp / "cache", seed=0) == ("label/fold=0/teacher/best.pt", True)
    assert sentinel.exists() and store.sha256("label/fold=0/teacher/best.pt") == weights_sha
    # The memo vouches for these very weights (a changed file is not trusted: t2id.resume re-checks it).
    memo = json.loads(store.read_text(layout.memo(layout.label.teacher(0))))
    assert memo["outputs"] == {"label/fold=0/teacher/best.pt": weights_sha}


def test_teacher_user_error_on_the_ray_worker_stays_one_line(phantom_run, ray_local):
    """label.teacher.source: grid without grid weights fails inside the fold's Ray task; the driver
    re-raises the UserError itself, not Ray's wrapper with the worker's traceback."""
    from t2id.errors import UserError

    tmp, store = phantom_run
    key = layout.generate.manifest(1)
    store.write_table(key, SYNTHETIC_SCHEMA.empty_table())
    try:
        cfg = validate_config(make_config(tmp, method="teacher", folds=[1], teacher={"source": "grid"}))
        with pytest.raises(UserError) as caught:
            run_pipeline(cfg, only="label", stages=stages("data", "split", "label"))
        assert type(caught.value) is UserError
        assert str(caught.value).startswith("label.teacher.source is 'grid' but ") and "\n" not in str(caught.value)
    finally:
        store.delete(key)


# --- memorization --------------------------------------------------------------------------------------

def test_exact_copy_is_flagged_other_subject_frame_is_not(store, phantom_run):
    _, run = phantom_run
    manifest = load_manifest(run).to_pylist()
    subject_a = [r for r in manifest if r["group"] == manifest[0]["group"]]
    subject_b = next(r for r in manifest if r["group"] != manifest[0]["group"])
    training = []
    for r in subject_a:  # the generator's training images, in the parametrized store (local and S3)
        key = f"data/images/{r['image_id']}.png"
        store.write_bytes(key, run.read_bytes(run.key_of(r["uri"])))
        training.append({"image_id": r["image_id"], "uri": store.uri(key)})
    store.write_bytes("syn/copy.png", run.read_bytes(run.key_of(subject_a[2]["uri"])))
    store.write_bytes("syn/other.png", run.read_bytes(run.key_of(subject_b["uri"])))
    rows = [{"uri": store.uri("syn/copy.png"), "kept": True, "reject_reason": None},
            {"uri": store.uri("syn/other.png"), "kept": True, "reject_reason": None}]
    for feature in ("pixels", "ssim"):
        copy, other = score_rows(store, rows, training, feature, 64, 0.95, reject=True)
        assert copy["memorized"] and copy["nn_image_id"] == subject_a[2]["image_id"]
        assert copy["kept"] is False and copy["reject_reason"].startswith("memorized")
        assert not other["memorized"] and other["kept"] and other["nn_similarity"] < 0.95


def test_region_similarity_compares_only_the_rectangle():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 255, (WORK_SIDE, WORK_SIDE)).astype(np.float32)
    changed = base.copy()
    changed[64:128, 64:128] = rng.uniform(0, 255, (64, 64))  # new content inside the rectangle only
    rect = (0.25, 0.25, 0.5, 0.5)
    whole, _ = nearest_neighbours([changed], [base], "pixels", 64)
    inside, _ = nearest_neighbours([changed], [base], "pixels", 64, rects=[rect])
    assert whole[0] > 0.8 and inside[0] < 0.3
    flat, _ = nearest_neighbours([grey(np.full((32, 32), 7, np.uint8), WORK_SIDE)], [base], "pixels", 64)
    assert flat[0] == 0.0


# --- inpaint-in-box ---------------------------------------------------------------------------------

def test_inpaint_stage_keeps_source_boxes_changes_only_the_mask_and_runs_once(phantom_run, ray_local):
    from t2id.data.materialize import materialize_fold
    from t2id.label.inpaint import mask_array, source_pixels

    tmp, store = phantom_run
    cfg = validate_config(make_config(tmp, method="inpaint", folds=[1],
                                      inpaint={"box_margin": 0.1, "images_per_class": 1}))
    run_pipeline(cfg, only="label", stages=stages("data", "split", "label"))
    table = store.read_table("label/fold=1/labels.parquet")
    labels = table.to_pylist()
    assert len(labels) == 2  # 2 target classes x label.inpaint.images_per_class 1; nothing rejected: no top-up
    assert all(r["round"] == 0 for r in labels)
    counts = json.loads(table.schema.metadata[CLASS_COUNTS_KEY])  # per-class shortfall, for the report
    assert len(counts) == 2 and all(c["target"] == 1 and c["rows"] == 1 for c in counts)
    assert all(c["used"] + c["shortfall"] == 1 and c["used"] + c["rejected_gate"] + c["rejected_memorization"]
               + c["kept_without_boxes"] == 1 for c in counts)
    train = {r["image_id"]: r for r in load_fold_rows(store, 1, "train").to_pylist()}
    for row in labels:
        assert row["label_source"] == "inpaint" and row["source"] == "synthetic"
        assert row["method"] == "inpaint" and row["adapter_method"] == "lora"  # the generator; its adapter's recipe
        source = train[row["source_image_id"]]  # a real TRAIN image of the fold holding the target class
        assert row["boxes"] == source["boxes"]  # inherited exactly
        assert any(b["class_id"] == row["class_id"] for b in row["boxes"])
        image = read_pixels(store, row["uri"]).astype(int)
        src = source_pixels(store, store.key_of(source["uri"]), 64, 64).astype(int)
        mask = mask_array([tuple(r) for r in json.loads(row["mask_rects"])], 64, 64) > 0
        assert mask.any() and not mask.all()
        assert np.abs(image - src)[~mask].max() == 0  # outside the mask: the real image
        assert np.abs(image - src)[mask].mean() > 5  # inside: new content
        assert row["nn_similarity"] is not None
    # The grid's *_sdxl strategies: kept rows with boxes go into the fold's train split.
    usable = pa.Table.from_pylist([r for r in labels if r["kept"] and r["boxes"]])
    assert usable.num_rows > 0
    data = materialize_fold(store, 1, tmp / "cache", synthetic=usable)
    assert set(data.synthetic_ids) == set(usable["image_id"].to_pylist())

    # Exactly once: a forced rerun reuses every image (same bytes, no new objects).
    before = {k: store.sha256(k) for k in store.list("label/fold=1/inpaint/images")}
    outcome = run_pipeline(cfg, only="label", force="label", stages=stages("data", "split", "label"))
    assert outcome[0].summary["folds"]["1"]["reused"] == 2 and outcome[0].summary["folds"]["1"]["made"] == 0
    assert {k: store.sha256(k) for k in store.list("label/fold=1/inpaint/images")} == before


def test_class_counts_show_the_shortfall_after_label_rejections():
    from t2id.label.stage import class_counts

    box = [{"class_id": 1, "x": 0.5, "y": 0.5, "w": 0.1, "h": 0.1}]
    rows = ([{"class_id": 1, "kept": True, "boxes": box, "reject_reason": None}] * 2
            + [{"class_id": 1, "kept": False, "boxes": [], "reject_reason": "std<=30"}]
            + [{"class_id": 1, "kept": False, "boxes": box, "reject_reason": "memorized: pixels similarity 0.99"}]
            + [{"class_id": 1, "kept": True, "boxes": [], "reject_reason": None}]
            + [{"class_id": 0, "kept": True, "boxes": box, "reject_reason": None}] * 4)
    by_class = {c["class"]: c for c in class_counts(rows, ["a", "b"], target=4)}
    rows[1] = {**rows[1], "round": 1}  # made by a top-up round
    by_class = {c["class"]: c for c in class_counts(rows, ["a", "b"], target=4)}
    assert by_class["b"] == {"class_id": 1, "class": "b", "target": 4, "rows": 5, "rejected_gate": 1,
                             "rejected_memorization": 1, "kept_without_boxes": 1, "topped_up": 1, "used": 2,
                             "shortfall": 2}
    assert by_class["a"]["used"] == 4 and by_class["a"]["shortfall"] == 0


def test_topup_ranges_ask_for_the_shortfall_within_the_attempt_budget():
    from t2id.generate.plan import PlanClass

    box = [{"class_id": 0, "x": 0.5, "y": 0.5, "w": 0.1, "h": 0.1}]
    a, b, c = PlanClass("a", 0, ("p",)), PlanClass("b", 1, ("p",)), PlanClass("c", 2, ("p",))
    good = {"class_id": 0, "kept": True, "boxes": box}
    rows = ([good] * 2 + [{**good, "kept": False}] * 2  # a: 2 of 4 usable, 4 tried
            + [{"class_id": 1, "kept": True, "boxes": []}] * 3  # b: 0 of 4 usable, 3 tried
            + [{"class_id": 2, "kept": True, "boxes": box}] * 4)  # c: done
    assert topup_ranges(rows, [a, b, c], target=4, budget=8, start_of=len) == {"a": (4, 2), "b": (3, 4)}
    assert topup_ranges(rows, [a, b, c], target=4, budget=5, start_of=len) == {"a": (4, 1), "b": (3, 2)}
    assert topup_ranges(rows, [a, b, c], target=4, budget=4, start_of=len) == {"b": (3, 1)}  # a: budget spent


def test_inpaint_tops_up_after_memorization_rejections_then_reports_the_shortfall(phantom_run, ray_local):
    """Every inpainted image is 'memorized' at threshold -1 and rejected: label makes the next indices of the
    inpaint plan until ceil(1.5 x 2) = 3 were tried per class, records their rounds, and reports the shortfall.
    Only the new indices are rendered; a rerun with top-up off removes the top-up images again."""
    tmp, store = phantom_run
    label = {"method": "inpaint", "folds": [0], "inpaint": {"images_per_class": 2}, "max_attempts_factor": 1.5,
             "memorization": {"threshold": -1.0}}
    cfg = validate_config(make_config(tmp, **label))
    outcome = run_pipeline(cfg, only="label", stages=stages("data", "split", "label"))
    facts = outcome[0].summary["folds"]["0"]
    labels = store.read_table("label/fold=0/labels.parquet").to_pylist()
    assert facts["topup_rounds"] == 1 and facts["topped_up"] == 2 and facts["usable"] == 0
    by_class: dict[int, list] = {}
    for r in labels:
        by_class.setdefault(r["class_id"], []).append(r)
    assert sorted(len(v) for v in by_class.values()) == [3, 3]
    for rows in by_class.values():
        assert sorted(r["round"] for r in rows) == [0, 0, 1]
        assert all(r["kept"] is False and r["reject_reason"].startswith("memorized") for r in rows)
        assert len({r["seed"] for r in rows}) == 3
    counts = json.loads(store.read_table("label/fold=0/labels.parquet").schema.metadata[CLASS_COUNTS_KEY])
    assert all(c["shortfall"] == 2 and c["topped_up"] == 1 and c["rows"] == 3 for c in counts)
    assert len(store.list("label/fold=0/inpaint/images")) == 6

    cfg = validate_config(make_config(tmp, **{**label, "max_attempts_factor": 1.0}))
    outcome = run_pipeline(cfg, only="label", stages=stages("data", "split", "label"))
    facts = outcome[0].summary["folds"]["0"]
    assert facts["topup_rounds"] == 0 and facts["made"] == 0 and facts["removed_stale"] == 4  # 2 PNG + 2 JSON
    assert len(store.list("label/fold=0/inpaint/images")) == 4


# --- inpaint then outpaint ----------------------------------------------------------------------------

def test_inpaint_outpaint_keeps_step1_regenerates_the_border_drops_its_boxes_and_runs_once(phantom_run, ray_local):
    """Step 1 is the inpaint method's image (same seed, source, masks: the inpaint run's images are the
    reference, reused when the inpaint test ran first); inside keep it stays pixel-exact, outside keep it is
    regenerated; boxes are kept/dropped by a hand computation of keep; a forced rerun redoes nothing."""
    from t2id.label.inpaint import mask_array, plan_inpaint
    from t2id.label.outpaint import outpaint_seed
    from t2id.generate.plan import PlanClass

    tmp, store = phantom_run
    names = {TRACHEAL_RING: "tracheal ring", VOCAL_FOLD: "vocal fold"}  # lora.target_classes' default
    inpaint, margin, keep_margin = {"box_margin": 0.1, "images_per_class": 1}, 0.1, 0.75
    run_pipeline(validate_config(make_config(tmp, method="inpaint", folds=[1], inpaint=inpaint)), only="label",
                 stages=stages("data", "split", "label"))
    step1 = {r["class_id"]: r for r in store.read_table("label/fold=1/labels.parquet").to_pylist()}
    label = {"method": "inpaint_outpaint", "folds": [1], "inpaint": inpaint, "outpaint": {"keep_margin": keep_margin}}
    cfg = validate_config(make_config(tmp, **label))
    outcome = run_pipeline(cfg, only="label", stages=stages("data", "split", "label"))
    facts = outcome[0].summary["folds"]["1"]
    labels = store.read_table("label/fold=1/labels.parquet").to_pylist()
    assert len(labels) == 2 and facts["made"] == 2 and len(store.list("label/fold=1/inpaint_outpaint/images")) == 2
    train = {r["image_id"]: r for r in load_fold_rows(store, 1, "train").to_pylist()}
    kept_others = dropped_total = 0
    for row in labels:
        ref = step1[row["class_id"]]
        assert (row["seed"], row["source_image_id"], row["mask_rects"]) == \
            (ref["seed"], ref["source_image_id"], ref["mask_rects"])
        assert row["method"] == row["label_source"] == "inpaint_outpaint" and row["adapter_method"] == "lora"
        seeds = json.loads(row["step_seeds"])
        assert seeds == {"inpaint": row["seed"], "outpaint": outpaint_seed(row["seed"], 1, names[row["class_id"]], 0)}
        assert seeds["outpaint"] != row["seed"]  # distinct sub-seeds
        # keep by hand: the target boxes grown by box_margin (clipped), their bounding box grown by keep_margin
        source = train[row["source_image_id"]]
        grown = [(max(0, b["x"] - b["w"] * (0.5 + margin)), max(0, b["y"] - b["h"] * (0.5 + margin)),
                  min(1, b["x"] + b["w"] * (0.5 + margin)), min(1, b["y"] + b["h"] * (0.5 + margin)))
                 for b in source["boxes"] if b["class_id"] == row["class_id"]]
        x0, y0 = min(g[0] for g in grown), min(g[1] for g in grown)
        x1, y1 = max(g[2] for g in grown), max(g[3] for g in grown)
        keep = (max(0, x0 - keep_margin * (x1 - x0)), max(0, y0 - keep_margin * (y1 - y0)),
                min(1, x1 + keep_margin * (x1 - x0)), min(1, y1 + keep_margin * (y1 - y0)))
        assert json.loads(row["keep_rect"]) == pytest.approx(list(keep), abs=1e-9)
        inside = [b["x"] - b["w"] / 2 >= keep[0] - 1e-6 and b["x"] + b["w"] / 2 <= keep[2] + 1e-6
                  and b["y"] - b["h"] / 2 >= keep[1] - 1e-6 and b["y"] + b["h"] / 2 <= keep[3] + 1e-6
                  for b in source["boxes"]]
        assert row["boxes"] == [b for b, i in zip(source["boxes"], inside) if i]
        assert row["dropped_boxes"] == [b for b, i in zip(source["boxes"], inside) if not i]
        assert row["dropped_count"] == len(row["dropped_boxes"])
        assert all(b in row["boxes"] for b in source["boxes"] if b["class_id"] == row["class_id"])  # by construction
        kept_others += sum(1 for b in row["boxes"] if b["class_id"] != row["class_id"])
        dropped_total += row["dropped_count"]
        # pixels: inside keep = step 1 exactly; outside keep regenerated
        image, first = read_pixels(store, row["uri"]).astype(int), read_pixels(store, ref["uri"]).astype(int)
        inside_keep = mask_array([keep], 64, 64) > 0
        assert inside_keep.any() and not inside_keep.all()
        assert np.abs(image - first)[inside_keep].max() == 0
        assert np.abs(image - first)[~inside_keep].mean() > 5
    assert facts["dropped_boxes"] == dropped_total > 0 and kept_others > 0  # the rule was exercised both ways
    # A changed outpaint setting changes every row's params digest (the rows are redone); a rerun redoes nothing.
    s = settings(cfg)
    classes = [PlanClass(n, i, ("p",)) for i, n in names.items()]
    other = settings(validate_config(make_config(tmp, **{**label, "outpaint": {"keep_margin": 0.3}})))
    digests = [{r["params_digest"] for r in plan_inpaint(store, x, 1, classes, "")} for x in (s, other)]
    assert not digests[0] & digests[1]
    before = {k: store.sha256(k) for k in store.list("label/fold=1/inpaint_outpaint")}
    outcome = run_pipeline(cfg, only="label", force="label", stages=stages("data", "split", "label"))
    assert outcome[0].summary["folds"]["1"]["reused"] == 2 and outcome[0].summary["folds"]["1"]["made"] == 0
    assert {k: store.sha256(k) for k in store.list("label/fold=1/inpaint_outpaint")} == before
