"""lora.method: DreamBooth-LoRA with prior preservation and textual inversion on the tiny SDXL, through
the real lora stage (Ray Train, 1 worker), the real prior-image generation (Ray actors) and the real
generate stage; the recipe's prompts, tokens and prior set end up in the manifest's provenance."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_lora_ray import _run_with_one_fold
from test_lora_train import make_examples
from test_stage_settings import BASE, changed_by_settings, with_values

from t2id import layout
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
    assert method_prompt("an ultrasound scan", "vocal fold", "dreambooth_lora", db) == "an ultrasound scan, sks vocal fold"
    assert expand_prompt("a <x> scan", {"x": ["<x>", "<x>_1"]}) == "a <x> <x>_1 scan"


def test_method_config_and_settings():
    assert LoraConfig().dreambooth is None and LoraConfig(method="dreambooth_lora").dreambooth == DreamBoothConfig()
    with pytest.raises(ValueError, match="lora.dreambooth is set but lora.method is 'lora'"):
        LoraConfig(dreambooth={"identifier": "zwx"})
    with pytest.raises(ValueError, match="one word"):
        DreamBoothConfig(identifier="two words")
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
                            dreambooth=cfg.dreambooth, textual_inversion=cfg.textual_inversion)


TARGETS = [{"name": "tracheal ring", "prompts": ["ultrasound scan of the tracheal ring"]},
           {"name": "vocal fold", "prompts": ["ultrasound scan of the vocal fold"]}]


def test_dreambooth_lora_with_prior_preservation(ray_local, tmp_path):
    from t2id.generate.stage import run as run_generate
    from t2id.lora.stage import run as run_lora

    store = _run_with_one_fold(tmp_path)
    cfg = LoraConfig(**TINY, method="dreambooth_lora", target_classes=TARGETS,
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
    log = store.read_table(layout.lora.train_log(0)).to_pylist()
    assert len(log) == 2
    for row in log:
        assert row["prior_loss"] > 0 and row["instance_loss"] > 0
        assert row["loss"] == pytest.approx(row["instance_loss"] + 0.5 * row["prior_loss"], rel=1e-5)

    # Generation prompts with the identifier and records the recipe, its token and the prior set.
    run_generate(stage_ctx(store, tmp_path, "generate"), generate_settings(cfg))
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


def test_textual_inversion_stage_and_generation(ray_local, tmp_path):
    from t2id.generate.stage import run as run_generate
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

    s = generate_settings(cfg)
    run_generate(stage_ctx(store, tmp_path, "generate"), s)
    manifest = store.read_table(layout.generate.manifest(0)).to_pylist()
    assert {(r["tokens"], r["method"]) for r in manifest} == {("<tracheal-ring>", "textual_inversion"),
                                                              ("<vocal-fold>", "textual_inversion")}
    assert all(r["tokens"] in r["prompt"] and r["prior_images"] is None for r in manifest)
    assert {r["lora_sha256"] for r in manifest} == {store.sha256(layout.lora.embeddings(0))}
    # The worker loaded the learnt rows into BOTH text encoders through diffusers' textual-inversion loader.
    worker = ImageGenerator(s, store, 0, str(tmp_path / "cache"), torch_threads=1)
    for key, tokenizer, encoder in (("clip_l", worker.pipe.tokenizer, worker.pipe.text_encoder),
                                    ("clip_g", worker.pipe.tokenizer_2, worker.pipe.text_encoder_2)):
        ids = tokenizer.convert_tokens_to_ids(["<tracheal-ring>", "<vocal-fold>"])
        torch.testing.assert_close(encoder.get_input_embeddings().weight[ids].detach(), rows[key])
