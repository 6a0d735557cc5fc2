"""lora.method: DreamBooth-LoRA with prior preservation, textual inversion and layout LoRA on the tiny SDXL,
through the real lora stage (Ray Train, 1 worker), the real prior-image generation (Ray actors) and the
generate stage's fold core with its worker in-process (the Ray pool itself is tests/test_generate_ray.py's);
each recipe's prompts, tokens, prior set or requested boxes end up in the manifest's provenance."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_lora_ray import _run_with_one_fold
from test_lora_train import make_examples
from test_stage_settings import BASE, changed_by_settings, with_values

from t2id import layout
from t2id.config import validate_config
from t2id.data.manifest import load_classes
from t2id.generate.config import GenerateConfig
from t2id.generate.settings import GenerateSettings
from t2id.lora.config import LoraConfig
from t2id.lora.data import build_cache
from t2id.lora.methods import DreamBoothConfig, TextualInversionConfig, method_prompt
from t2id.lora.models import load_sdxl_pipeline
from t2id.lora.prior import prior_digest
from t2id.lora.settings import LoraSettings
from t2id.lora.textual_inversion import add_tokens, expand_prompt
from t2id.lora.train import fit, setup_training
from t2id.runner import StageContext
from t2id.store import open_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = dict(rank=4, alpha=4, resolution=64, epochs=1, batch_size=4, lr=1e-3, mixed_precision="no",
            num_workers=1, validation_images=0, folds=[0])


def test_method_prompts_follow_each_paper():
    db, ti = DreamBoothConfig(), TextualInversionConfig()
    prompt = "High-resolution ultrasound scan of the human tracheal ring"
    assert method_prompt(prompt, "tracheal ring", "lora") == prompt
    assert method_prompt(prompt, "tracheal ring", "dreambooth_lora", db) == \
        "High-resolution ultrasound scan of the human sks tracheal ring"  # "a [V] [class noun]"
    assert method_prompt(prompt, "tracheal ring", "textual_inversion", textual_inversion=ti) == \
        "High-resolution ultrasound scan of the human <tracheal-ring>"
    assert method_prompt("an ultrasound scan", "vocal fold", "dreambooth_lora", db) == \
        "an ultrasound scan, sks vocal fold"
    assert expand_prompt("a <x> scan", {"x": ["<x>", "<x>_1"]}) == "a <x> <x>_1 scan"


def test_method_config_and_settings():
    assert LoraConfig().dreambooth is None and LoraConfig(method="dreambooth_lora").dreambooth == DreamBoothConfig()
    assigned = LoraConfig()
    assigned.method = "textual_inversion"  # an assignment fills the section too, as a validated section
    assert assigned.textual_inversion == TextualInversionConfig()
    assert LoraConfig(method="layout_lora").train_text_encoder  # GeoDiffusion tunes the text encoder
    with pytest.raises(ValueError, match="lora.dreambooth is set but lora.method is 'lora'"):
        LoraConfig(dreambooth={"identifier": "zwx"})
    with pytest.raises(ValueError, match="one word"):
        DreamBoothConfig(identifier="two words")
    with pytest.raises(Exception, match="layout_lora but label.method is inpaint"):  # would drop the layout images
        validate_config({"lora": {"method": "layout_lora"}, "label": {"method": "inpaint"}})
    # The recipe re-runs what it changes; only the chosen method's settings are hashed.
    db = with_values(BASE, lora__method="dreambooth_lora")
    assert changed_by_settings(BASE, db) == {"lora", "generate", "label"}
    assert changed_by_settings(db, with_values(db, lora__dreambooth__identifier="zwx")) == {"lora", "generate", "label"}
    assert with_values(BASE, run__stages=["data", "split", "generate"]).lora.dreambooth is None


def stage_ctx(store, tmp_path, stage: str) -> StageContext:
    return StageContext(store=store, stage=stage, cache_dir=tmp_path / "cache")


def generate_settings(cfg: LoraConfig) -> GenerateSettings:
    g = GenerateConfig(images_per_class=1, width=64, height=64, steps=2, batch_size=2, concurrency=1,
                       quality={"min_std": 0, "min_entropy": 0}, contact_sheet_images=1, contact_sheet_thumb=16)
    return GenerateSettings(generate=g, target_classes=cfg.target_classes, base_model="tiny", allow_network=False,
                            run_seed=0, use_adapter=True, folds=[0], clip_weights=None, method=cfg.method,
                            dreambooth=cfg.dreambooth, textual_inversion=cfg.textual_inversion, layout=cfg.layout)


TARGETS = [{"name": "tracheal ring", "prompts": ["ultrasound scan of the tracheal ring"]},
           {"name": "vocal fold", "prompts": ["ultrasound scan of the vocal fold"]}]


@pytest.mark.slow
def test_dreambooth_lora_with_prior_preservation(ray_local, tmp_path):
    from t2id.generate.core import LocalExecutor, generate_fold
    from t2id.generate.plan import method_classes
    from t2id.generate.worker import ImageGenerator
    from t2id.lora.stage import run as run_lora

    store = _run_with_one_fold(tmp_path)
    # 2 gloo workers: real DDP over the instance + prior loss (both halves in one UNet forward).
    cfg = LoraConfig(**{**TINY, "num_workers": 2}, method="dreambooth_lora", target_classes=TARGETS,
                     dreambooth={"prior_images_per_class": 2, "prior_steps": 2, "prior_loss_weight": 0.5})
    result = run_lora(stage_ctx(store, tmp_path, "lora"), LoraSettings(lora=cfg, run_seed=3))

    # The base model drew 2 class-prior images per class from the plain class prompt, under the fold's folder.
    record = json.loads(store.read_text(layout.lora.train_ids(0)))
    prior = record["prior"]
    assert prior["count"] == 4 and record["method"] == "dreambooth_lora"
    assert record["tokens"] == {"tracheal ring": "sks", "vocal fold": "sks"}
    assert {p["prompt"] for p in prior["images"]} == {t["prompts"][0] for t in TARGETS}  # no identifier
    assert all(e["prompt"].endswith(("sks tracheal ring", "sks vocal fold")) for e in record["examples"])
    pngs = [k for k in store.list(layout.lora.prior_images(0)) if k.endswith(".png")]
    assert sorted(pngs) == sorted(p["key"] for p in prior["images"])
    assert prior["digest"] == prior_digest([(p["key"], store.sha256(p["key"])) for p in prior["images"]])
    assert all(p["key"] in result.outputs for p in prior["images"])  # published with the adapter
    # Both loss terms were computed every step: loss = instance + lambda x prior (Ruiz et al. eq. 2).
    ranks = [json.loads(store.read_text(layout.lora.rank(0, r))) for r in (0, 1)]
    assert ranks[0]["lora_digest"] == ranks[1]["lora_digest"]  # DDP kept both replicas equal
    log = store.read_table(layout.lora.train_log(0)).to_pylist()
    assert len(log) == 2
    for row in log:
        assert row["prior_loss"] > 0 and row["instance_loss"] > 0
        assert row["loss"] == pytest.approx(row["instance_loss"] + 0.5 * row["prior_loss"], rel=1e-5)

    # Generation (in-process: one worker, the stage's fold core) prompts with the identifier and records the
    # recipe, its token and the prior set.
    s = generate_settings(cfg)
    worker = ImageGenerator(s, store, None, str(tmp_path / "cache"), torch_threads=1)
    generate_fold(store, s, 0, method_classes(s, load_classes(store)), LocalExecutor(worker, 2))
    rows = store.read_table(layout.generate.manifest(0)).to_pylist()
    assert len(rows) == 2
    for row in rows:
        assert row["method"] == "dreambooth_lora" and row["tokens"] == "sks"
        assert " sks " in row["prompt"]
        assert row["prior_images"] == {"count": 4, "digest": prior["digest"]}
        assert row["lora_sha256"] == store.sha256(layout.lora.adapter(0))


def test_textual_inversion_trains_only_the_new_embeddings(tmp_path):
    """Gal et al.: base model frozen, one new embedding per class in both text encoders; every other
    parameter, including every other embedding row, is bit-identical after training."""
    store = open_store(str(tmp_path / "store"))
    cfg = LoraConfig(**{**TINY, "lr": 1e-2}, method="textual_inversion", target_classes=TARGETS,
                     textual_inversion={"vectors": 2})
    pipe = load_sdxl_pipeline("tiny", tmp_path / "cache")
    token_set = add_tokens(pipe, cfg.textual_inversion, [t.name for t in cfg.target_classes])
    assert token_set.tokens["tracheal ring"] == ["<tracheal-ring>", "<tracheal-ring>_1"]
    examples = [e.__class__(e.image_id, e.key, e.sha256, e.class_name,
                            expand_prompt(method_prompt(e.prompt, e.class_name, "textual_inversion",
                                                        textual_inversion=cfg.textual_inversion), token_set.tokens))
                for e in make_examples(store, n=4)]
    cache = build_cache(pipe, examples, store.read_bytes, 64, hflip=True)
    state = setup_training(pipe, cfg, len(cache), seed=0, token_set=token_set)
    before = {f"{name}.{k}": v.detach().clone() for name in ("unet", "vae", "text_encoder", "text_encoder_2")
              for k, v in getattr(pipe, name).state_dict().items()}
    fit(state, cache, cfg, seed=0)
    assert state.step == 1
    new_rows = {}  # state-dict key of each encoder's token-embedding matrix -> the new tokens' rows
    for name, ids in zip(("text_encoder", "text_encoder_2"), token_set.ids):
        encoder = getattr(pipe, name)
        weight = encoder.get_input_embeddings().weight
        [key] = [k for k, v in encoder.state_dict().items() if v.data_ptr() == weight.data_ptr()]
        new_rows[f"{name}.{key}"] = ids
    after = {f"{name}.{k}": v for name in ("unet", "vae", "text_encoder", "text_encoder_2")
             for k, v in getattr(pipe, name).state_dict().items()}
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key in new_rows:
            frozen = torch.ones(value.shape[0], dtype=torch.bool)
            frozen[new_rows[key]] = False
            assert torch.equal(after[key][frozen], value[frozen]), key
            assert not torch.equal(after[key][~frozen], value[~frozen]), key  # the new tokens learnt
        else:
            assert torch.equal(after[key], value), key


@pytest.mark.slow
def test_textual_inversion_stage_and_generation(ray_local, tmp_path):
    from t2id.generate.core import LocalExecutor, generate_fold
    from t2id.generate.plan import method_classes
    from t2id.generate.worker import ImageGenerator
    from t2id.lora.stage import run as run_lora

    store = _run_with_one_fold(tmp_path)
    cfg = LoraConfig(**TINY, method="textual_inversion", target_classes=TARGETS)
    result = run_lora(stage_ctx(store, tmp_path, "lora"), LoraSettings(lora=cfg, run_seed=3))
    assert not store.exists(layout.lora.adapter(0))  # no LoRA: the embeddings are the generator
    assert layout.lora.embeddings(0) in result.outputs
    rows = load_file(store.uri(layout.lora.embeddings(0)))
    assert set(rows) == {"clip_l", "clip_g"} and rows["clip_l"].shape[0] == rows["clip_g"].shape[0] == 2
    tokens = json.loads(store.read_text(layout.lora.tokens(0)))["tokens"]
    assert tokens == {"tracheal ring": ["<tracheal-ring>"], "vocal fold": ["<vocal-fold>"]}

    # Generation in-process (the Ray pool is the DreamBooth test's): one worker, the stage's fold core.
    s = generate_settings(cfg)
    worker = ImageGenerator(s, store, None, str(tmp_path / "cache"), torch_threads=1)
    generate_fold(store, s, 0, method_classes(s, load_classes(store)), LocalExecutor(worker, 2))
    manifest = store.read_table(layout.generate.manifest(0)).to_pylist()
    assert {(r["tokens"], r["method"]) for r in manifest} == {("<tracheal-ring>", "textual_inversion"),
                                                              ("<vocal-fold>", "textual_inversion")}
    assert all(r["tokens"] in r["prompt"] and r["prior_images"] is None for r in manifest)
    assert {r["lora_sha256"] for r in manifest} == {store.sha256(layout.lora.embeddings(0))}
    # The worker loaded the learnt rows into BOTH text encoders through diffusers' textual-inversion loader.
    for key, tokenizer, encoder in (("clip_l", worker.pipe.tokenizer, worker.pipe.text_encoder),
                                    ("clip_g", worker.pipe.tokenizer_2, worker.pipe.text_encoder_2)):
        ids = tokenizer.convert_tokens_to_ids(["<tracheal-ring>", "<vocal-fold>"])
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids].detach(), rows[key])


def test_location_tokens_and_fidelity_matching():
    from t2id.lora.location import from_bins, layout_prompt, matched_boxes, snap, to_bins

    box = {"class_id": 2, "x": 0.5, "y": 0.25, "w": 0.5, "h": 0.25}
    assert to_bins(box, 16) == (4, 2, 11, 5)
    assert from_bins(2, (4, 2, 11, 5), 16) == box  # bins' outer edges
    assert snap([from_bins(2, (4, 2, 11, 5), 16)], 16) == [box]  # snapping is idempotent
    assert layout_prompt("scan of the tracheal ring", "tracheal ring", [box], 16) == \
        "scan of the tracheal ring, tracheal ring at 4 2 11 5"
    shifted = {**box, "x": 0.55}  # IoU 0.82
    far = {**box, "x": 0.9}  # IoU 0.05
    assert matched_boxes([box], [shifted]) == 1
    assert matched_boxes([box], [far]) == 0
    assert matched_boxes([box], [{**shifted, "class_id": 5}]) == 0  # another class does not count
    assert matched_boxes([box, shifted], [shifted]) == 1  # a detection matches one requested box


@pytest.mark.slow
def test_layout_lora_boxes_by_construction(ray_local, tmp_path):
    """layout_lora: training prompts state each image's boxes; text-encoder LoRA is on; every generated
    image asks for one real layout of its class and its manifest row carries those boxes (label_source
    layout); the label stage's teacher keeps them and only measures whether it finds them."""
    from t2id.generate.core import LocalExecutor, generate_fold
    from t2id.generate.plan import method_classes
    from t2id.generate.worker import ImageGenerator
    from t2id.label.stage import layout_fidelity, write_layout_fidelity
    from t2id.report.build import layout_fidelity as report_layout_fidelity
    from t2id.label.teacher import Teacher, label_with_teacher
    from t2id.lora.location import snap
    from t2id.lora.stage import run as run_lora

    store = _run_with_one_fold(tmp_path)
    cfg = LoraConfig(**TINY, method="layout_lora", target_classes=TARGETS)
    assert cfg.train_text_encoder and cfg.layout.bins == 16
    run_lora(stage_ctx(store, tmp_path, "lora"), LoraSettings(lora=cfg, run_seed=3))
    record = json.loads(store.read_text(layout.lora.train_ids(0)))
    assert all(e["prompt"].endswith(f"{e['class']} at 6 6 9 9") for e in record["examples"])  # box .5 .5 .2 .2
    adapter = load_file(store.uri(layout.lora.adapter(0)))
    assert any(k.startswith("text_encoder_2.") for k in adapter)

    s = generate_settings(cfg)
    worker = ImageGenerator(s, store, None, str(tmp_path / "cache"), torch_threads=1)
    names = load_classes(store)
    generate_fold(store, s, 0, method_classes(s, names), LocalExecutor(worker, 2))
    rows = store.read_table(layout.generate.manifest(0)).to_pylist()
    real_box = {"x": .5, "y": .5, "w": .2, "h": .2}  # every real box of the fixture
    for row in rows:
        assert row["label_source"] == "layout" and row["method"] == "layout_lora"
        assert row["boxes"] == row["requested_boxes"] == snap([{"class_id": row["class_id"], **real_box}], 16)
        assert row["prompt"].endswith(row["tokens"]) and row["tokens"].endswith("at 6 6 9 9")

    # A real (untrained) YOLO as the teacher: it finds nothing, yet the layout rows keep their boxes.
    from ultralytics import YOLO

    weights = tmp_path / "teacher.pt"
    YOLO("yolov8n.yaml").save(str(weights))
    labelled = label_with_teacher(store, rows, Teacher(weights, 64), names, 0.25, True)
    for row in labelled:
        assert row["kept"] and row["boxes"] == row["requested_boxes"] and row["label_source"] == "layout"
        assert row["layout_matched"] == 0
    fidelity = layout_fidelity([{**labelled[0], "layout_matched": 1}, *labelled[1:]], names)
    assert [(f["class"], f["requested"], f["matched"], f["fidelity"]) for f in fidelity] == \
        [("tracheal ring", 1, 1, 1.0), ("vocal fold", 1, 0, 0.0)]
    # What the label stage writes is what the report's layout-fidelity table shows (fold x class).
    write_layout_fidelity(store, 0, fidelity)
    table = report_layout_fidelity(store)
    assert table[["fold", "class", "requested_boxes", "matched", "layout_fidelity"]].values.tolist() == \
        [[0, "tracheal ring", 1, 1, 1.0], [0, "vocal fold", 1, 0, 0.0]]
