"""lora.method ddpm: an unconditional DDPM per fold and class, from scratch (the lung-ultrasound study, Sec. 3.4
and 4.4), trained by the real lora stage on Ray Train (1 gloo worker) and drawn by the real generate stage
(its warm Ray actor pool with DdpmGenerator), with the study's std/entropy gate (t2id.generate.quality,
unit-tested in tests/test_generate_quality.py) and the manifest's provenance."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from test_generators import TARGETS, stage_ctx
from test_lora_ray import _run_with_one_fold
from test_stage_settings import BASE, changed_by_settings, with_values

from t2id import layout
from t2id.config import builtin_config, load_config, validate_config
from t2id.data.manifest import fold_ids, load_classes
from t2id.generate.config import GenerateConfig
from t2id.generate.quality import grey_entropy_bits, judge, pixel_std
from t2id.generate.settings import DDPM_BASE_MODEL, GenerateSettings
from t2id.lora.config import LoraConfig, TargetClass
from t2id.lora.methods import DdpmConfig, method_prompt
from t2id.lora.settings import LoraSettings
from t2id.plan import make_plan

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY_DDPM = dict(resolution=32, block_out_channels=[8, 16], layers_per_block=1, epochs=1, batch_size=2,
                 warmup_steps=0, lr=1e-3, inference_steps=2)


def test_ddpm_config_and_what_its_hash_holds():
    assert LoraConfig().ddpm is None and LoraConfig(method="ddpm").ddpm == DdpmConfig()
    assert DdpmConfig().resolution == 64 and DdpmConfig().inference_steps == 1000  # diffusers' example; DDPM
    with pytest.raises(ValueError, match="lora.ddpm is set but lora.method is 'lora'"):
        LoraConfig(ddpm={"epochs": 1})
    with pytest.raises(ValueError, match="multiple of 32"):  # 5 halvings of 6 levels
        DdpmConfig(resolution=48)
    with pytest.raises(ValueError, match="block_out_channels"):
        DdpmConfig(block_out_channels=[12, 24])
    with pytest.raises(ValueError, match=r"lora.ddpm.batch_size \(3\)"):
        LoraConfig(method="ddpm", num_workers=2, ddpm={"batch_size": 3})
    LoraConfig(method="ddpm", num_workers=3, ddpm={"batch_size": 6})  # lora.batch_size 16 is not ddpm's
    assert method_prompt("ultrasound scan of the vocal fold", "vocal fold", "ddpm") == "vocal fold"  # no text
    with pytest.raises(Exception, match="ddpm but label.method is inpaint"):
        validate_config({"lora": {"method": "ddpm"}, "label": {"method": "inpaint"}})
    # What ddpm reads re-runs it; the SDXL/LoRA settings and the prompts it does not read change no stage.
    ddpm = with_values(BASE, lora__method="ddpm", label__method="teacher")
    unused = with_values(ddpm, lora__rank=4, lora__lr=0.5, lora__resolution=128,
                         lora__target_classes=[{"name": t.name, "prompts": ["another prompt"]}
                                               for t in ddpm.lora.target_classes])
    assert changed_by_settings(ddpm, unused) == set()
    assert "generate" not in changed_by_settings(ddpm, with_values(ddpm, generate__steps=7, generate__width=96))
    assert {"lora", "generate"} <= changed_by_settings(ddpm, with_values(ddpm, lora__ddpm__epochs=7))
    # `t2id plan` counts ddpm's work (not timed: no measured UNet2DModel rate). The paper config's folds have
    # 630 rare TRAIN images, ~315 per class: 19 steps of 16 per epoch x 500 epochs x 2 classes.
    plan = make_plan(with_values(load_config(builtin_config("t2id-cas")), lora__method="ddpm"), "paper")
    stages = {p.stage: p for p in plan.stages}
    assert stages["lora"].counts["steps"] == [19 * 500 * 2] * 4 and stages["lora"].gpu_hours == 0.0
    assert stages["generate"].counts["unet_passes"] == 2400 * 1000


def generate_settings(cfg: LoraConfig, **quality) -> GenerateSettings:
    g = GenerateConfig(images_per_class=2, batch_size=2, concurrency=1, batched_pipeline=False,
                       max_attempts_factor=1.5, quality=quality, contact_sheet_images=1, contact_sheet_thumb=16)
    return GenerateSettings(generate=g, target_classes=[TargetClass(name=t.name, prompts=[t.name]) for t in cfg.target_classes],
                            base_model=DDPM_BASE_MODEL, allow_network=False, run_seed=0, use_adapter=True, folds=[0],
                            clip_weights=None, method="ddpm", ddpm=cfg.ddpm)


@pytest.mark.slow
def test_ddpm_per_class_from_scratch_then_generated_gated_and_recorded(ray_local, tmp_path):
    from diffusers import UNet2DModel

    from t2id.generate.core import LocalExecutor, generate_fold
    from t2id.generate.ddpm_worker import DdpmGenerator
    from t2id.generate.plan import method_classes
    from t2id.generate.stage import run as run_generate
    from t2id.lora.ddpm import weights_digest
    from t2id.lora.stage import run as run_lora

    store = _run_with_one_fold(tmp_path)  # fold 0: TRAIN = 4 tracheal-ring + 4 vocal-fold images, val = 2 others
    cfg = LoraConfig(method="ddpm", target_classes=TARGETS, folds=[0], num_workers=1, ddpm=TINY_DDPM)
    s = LoraSettings(lora=cfg, run_seed=3)
    result = run_lora(stage_ctx(store, tmp_path, "lora"), s)
    assert result.summary["folds"]["0"]["steps"] == 4  # 2 classes x 4 images / batch 2, 1 epoch

    # One model per class, from the fold's TRAIN images of that class only.
    record = json.loads(store.read_text(layout.lora.train_ids(0)))
    val = set(fold_ids(store, 0, "val"))
    assert record["method"] == "ddpm" and set(record["classes"]) == {"tracheal ring", "vocal fold"}
    for name, model in record["classes"].items():
        ids = [e["image_id"] for e in record["examples"] if e["class"] == name]
        assert model["image_ids"] == ids and len(ids) == 4 and not val & set(ids)
        weights = layout.lora.ddpm_file(0, name, layout.lora.ddpm_weights_file)
        assert model["weights_sha256"] == store.sha256(weights) and weights in result.outputs
        rank = json.loads(store.read_text(layout.lora.ddpm_rank(0, name, 0)))
        assert {i for _, used in rank["steps"] for i in used} == set(ids)  # every image of the class, no other
        unet = UNet2DModel.from_pretrained(store.uri(layout.lora.ddpm_class(0, name)))
        assert (unet.config.in_channels, unet.config.sample_size, list(unet.config.block_out_channels)) == (1, 32, [8, 16])
        assert weights_digest(unet) == rank["weights_digest"]  # what was written is what rank 0 made
        assert rank["trained_digest"] != rank["weights_digest"]  # the EMA of the weights, not the last step's
    assert all(e["prompt"] == e["class"] for e in record["examples"])  # no text conditioning
    assert record["classes"]["tracheal ring"]["seed"] != record["classes"]["vocal fold"]["seed"]
    log = store.read_table(layout.lora.train_log(0)).to_pylist()
    assert [r["class"] for r in log] == ["tracheal ring"] * 2 + ["vocal fold"] * 2
    assert all(np.isfinite(r["loss"]) for r in log)
    # A rerun reuses the trained fold, also when a setting ddpm does not read changed.
    again = run_lora(stage_ctx(store, tmp_path, "lora"), LoraSettings(lora=cfg.model_copy(update={"rank": 4}), run_seed=3))
    assert again.summary["folds"]["0"]["reused"]

    # Generation through the stage (warm Ray actor pool of DdpmGenerator); a gate every noisy image passes
    # (the study's thresholds come below).
    gs = generate_settings(cfg, min_std=0.0, min_entropy=0.0)
    ctx = stage_ctx(store, tmp_path, "generate")
    first = run_generate(ctx, gs)
    assert first.summary["generated"] == 4 and not first.summary["shortfall"]
    rows = store.read_table(layout.generate.manifest(0)).to_pylist()
    names = load_classes(store)
    assert sorted(names[r["class_id"]] for r in rows) == ["tracheal ring"] * 2 + ["vocal fold"] * 2
    for row in rows:
        name = names[row["class_id"]]
        assert row["method"] == "ddpm" and row["prompt"] == name and row["base_model"] == DDPM_BASE_MODEL
        assert row["lora_sha256"] == record["classes"][name]["weights_sha256"]
        assert (row["steps"], row["scheduler"], row["guidance"], row["width"], row["height"]) == (2, "ddpm", 0.0, 32, 32)
        pixels = png_pixels(store, row)
        assert pixels.shape == (32, 32, 3) and (pixels == pixels[..., :1]).all()  # grey as RGB
        assert (row["std"], row["entropy"]) == pytest.approx((pixel_std(pixels[..., 0]), grey_entropy_bits(pixels[..., 0])))
        assert row["kept"]

    # Bit-reproducible on CPU: the row's seed alone gives the same image in another process.
    worker = DdpmGenerator(generate_settings(cfg), store, None, str(tmp_path / "cache"), torch_threads=1)
    worker.use_fold(0)
    row = rows[0]
    worker._classes = [names[row["class_id"]]]
    [image] = worker.render([row["prompt"]], [""], [row["seed"]])
    assert png_pixels(store, row).tobytes() == image.tobytes()

    assert run_generate(ctx, gs).summary["generated"] == 0  # a rerun draws nothing

    # The study's gate (std > 30, entropy > 4.7 bits): the images are reused and re-judged, every rejection
    # keeps its values and reason, and a class short of kept images tops up with fresh seeds up to
    # ceil(1.5 x 2) = 3 attempts, as for every method; what is still short is reported.
    study = generate_settings(cfg)
    outcome = generate_fold(store, study, 0, method_classes(study, names), LocalExecutor(worker, 2))
    assert outcome.reused == 4
    gated = store.read_table(layout.generate.manifest(0)).to_pylist()
    assert len(gated) == 4 + outcome.generated
    for row in gated:
        verdict = judge(row["std"], row["entropy"], None, study.generate.quality)
        assert (row["kept"], row["reject_reason"] or "") == (verdict.kept, verdict.reject_reason)
    for c in outcome.classes.values():
        assert c.kept == 2 or (c.attempted == 3 and c.shortfall == 2 - c.kept)

    # The label stage's teacher labels ddpm rows like any text-to-image row (a real, untrained YOLO: no box).
    from ultralytics import YOLO

    from t2id.label.teacher import Teacher, label_with_teacher

    YOLO("yolov8n.yaml").save(str(tmp_path / "teacher.pt"))
    labelled = label_with_teacher(store, rows, Teacher(tmp_path / "teacher.pt", 32), names, 0.25, True)
    assert [r["label_source"] for r in labelled] == ["teacher"] * 4


def png_pixels(store, row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.read_bytes(store.key_of(row["uri"])))).convert("RGB"))
