"""Pure LoRA training core on the tiny SDXL (no Ray): loss maths, batching, caching, learning,
adapter save/load, checkpoint resume, per-fold data selection."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from t2id import layout
from t2id.data.manifest import FOLDS_SCHEMA, IMAGE_SCHEMA
from t2id.lora.config import LoraConfig
from t2id.lora.data import (
    Example,
    build_cache,
    encode_images,
    encode_prompts,
    load_or_build_cache,
    preprocess_image,
)
from t2id.lora.models import load_sdxl_pipeline
from t2id.lora.train import (
    diffusion_loss,
    fit,
    gather_batch,
    lora_state_dict,
    make_schedule,
    min_snr_weights,
    restore_checkpoint,
    save_adapter,
    save_checkpoint,
    setup_training,
    step_batches,
    step_generator,
    train_step,
)
from t2id.store import open_store


def make_examples(store, n: int = 8, size: int = 72, seed: int = 0) -> list[Example]:
    """n grey images with a bright bar whose place depends on the class, written to `store`."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        pixels = (rng.random((size, size + 16)) * 60).astype(np.uint8)
        row = 10 if i % 2 else size // 2
        pixels[row:row + 14, 8 + 4 * i:40 + 4 * i] = 230
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        key = layout.data.image(f"img{i:02d}", ".png")
        digest = store.write_bytes(key, buffer.getvalue())
        name = "tracheal ring" if i % 2 else "vocal fold"
        examples.append(Example(f"img{i:02d}", key, digest, name, f"ultrasound scan of the {name}"))
    return examples


CFG = dict(rank=4, alpha=4, resolution=64, batch_size=4, lr=1e-2, mixed_precision="no", num_workers=1)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-cache")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory, cache_dir):
    store = open_store(str(tmp_path_factory.mktemp("store")))
    examples = make_examples(store)
    pipe = load_sdxl_pipeline("tiny", cache_dir)
    cache = build_cache(pipe, examples, store.read_bytes, 64, hflip=True)
    return store, examples, cache


def eval_loss(state, cache, draws: int = 4) -> float:
    """Loss over all examples with fixed noise/timesteps (same draws before and after training)."""
    state.unet.eval()
    total = 0.0
    with torch.no_grad():
        for d in range(draws):
            gen = step_generator(123, 0, d)
            batch = gather_batch(cache, list(range(len(cache))), gen, False, "cpu")
            total += diffusion_loss(state.unet, state.noise_scheduler, batch["latents"], batch["prompt_embeds"],
                                    batch["pooled_embeds"], batch["time_ids"], gen).item()
    state.unet.train()
    return total / draws


@pytest.fixture(scope="module")
def trained(tiny_set, cache_dir):
    _, _, cache = tiny_set
    cfg = LoraConfig(**CFG, epochs=20)
    pipe = load_sdxl_pipeline("tiny", cache_dir)
    state = setup_training(pipe, cfg, len(cache), seed=0)
    before = eval_loss(state, cache)
    fit(state, cache, cfg, seed=0)
    return pipe, state, cfg, before, eval_loss(state, cache)


def test_min_snr_weights_follow_hang_et_al():
    alphas_cumprod = torch.tensor([0.999, 0.5, 0.01])  # SNR = 999, 1, ~0.0101
    t = torch.tensor([0, 1, 2])
    w = min_snr_weights(alphas_cumprod, t, gamma=5.0)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    torch.testing.assert_close(w, torch.stack([5.0 / snr[0], torch.tensor(1.0), torch.tensor(1.0)]))
    wv = min_snr_weights(alphas_cumprod, t, gamma=5.0, prediction_type="v_prediction")
    torch.testing.assert_close(wv, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_preprocess_and_micro_conditioning():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((72, 88), np.uint8)).save(buffer, format="PNG")
    pixels, original, crop = preprocess_image(buffer.getvalue(), 64)
    assert pixels.shape == (64, 64, 3) and pixels.min() >= -1 and pixels.max() <= 1
    assert original == (72, 88)
    assert crop == (0, (round(88 * 64 / 72) - 64) // 2)  # centre crop of the resized 64 x 78 image


def test_step_batches_disjoint_and_cover_epoch():
    cfg = LoraConfig(**{**CFG, "batch_size": 4, "num_workers": 2, "grad_accum": 2}, epochs=2)
    schedule = make_schedule(10, cfg, world=2)
    assert (schedule.micro_batch, schedule.steps_per_epoch) == (1, 2)
    for epoch in range(2):
        per_rank = [[i for s in range(2) for mb in step_batches(schedule, epoch * 2 + s, 3, r) for i in mb]
                    for r in range(2)]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert len(set(per_rank[0] + per_rank[1])) == 8  # drop-last: 8 of 10 used, none twice
    assert step_batches(schedule, 0, 3, 0) != step_batches(schedule, 2, 3, 0)  # new order each epoch


def test_cache_holds_both_orientations(tiny_set, cache_dir):
    store, examples, cache = tiny_set
    assert cache.latent_mean.shape == (8, 2, 4, 8, 8)
    assert len(cache.prompts) == 2 and cache.prompt_embeds.shape == (2, 77, 64)
    pipe = load_sdxl_pipeline("tiny", cache_dir)
    pixels, _, _ = preprocess_image(store.read_bytes(examples[0].key), 64)
    flipped_mean, _ = encode_images(pipe.vae, np.ascontiguousarray(pixels[None, :, ::-1]))
    assert cache.latent_mean.dtype == torch.float16  # half the memory; fp16's rounding below
    torch.testing.assert_close(cache.latent_mean[0, 1].float(), flipped_mean[0], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(cache.latent_mean[0, 0], cache.latent_mean[0, 1])
    # The disk cache returns the same tensors without re-encoding.
    first = load_or_build_cache(cache_dir, "m", pipe, examples, store.read_bytes, 64, True)
    again = load_or_build_cache(cache_dir, "m", None, examples, store.read_bytes, 64, True)  # no pipe needed
    torch.testing.assert_close(first.latent_mean, again.latent_mean)


def test_loss_goes_down(trained):
    _, state, _, before, after = trained
    assert len(state.log) == 40
    assert after < 0.95 * before, (before, after)  # deterministic draws: 1.079 -> 1.006 here


def test_saved_adapter_loads_into_fresh_pipeline(trained, cache_dir, tmp_path):
    pipe, state, _, _, _ = trained
    save_adapter(state.unet, tmp_path)
    assert (tmp_path / layout.lora.adapter_file).exists()

    def image(p):
        return p("ultrasound scan of the vocal fold", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="np").images[0]

    fresh = load_sdxl_pipeline("tiny", cache_dir)
    base = image(fresh)
    fresh.load_lora_weights(str(tmp_path))
    adapted = image(fresh)
    assert np.abs(adapted - base).max() > 1e-3  # the adapter changes the output
    state.unet.eval()
    np.testing.assert_allclose(adapted, image(pipe), atol=1e-4)  # and equals the trained model's output


def test_resume_from_checkpoint_equals_uninterrupted(tiny_set, cache_dir, tmp_path):
    _, _, cache = tiny_set
    cfg = LoraConfig(**CFG, epochs=3, dropout=0.1, min_snr_gamma=5.0, noise_offset=0.05, warmup_steps=2,
                     lr_scheduler="cosine")

    def fresh_state():
        return setup_training(load_sdxl_pipeline("tiny", cache_dir), cfg, len(cache), seed=1)

    full = fit(fresh_state(), cache, cfg, seed=1)
    part = fresh_state()
    part_cfg = cfg.model_copy(update={"epochs": 1})
    fit(part, cache, part_cfg, seed=1)
    save_checkpoint(part, tmp_path)
    resumed = fresh_state()
    restore_checkpoint(resumed, tmp_path)
    assert resumed.step == 2
    fit(resumed, cache, cfg, seed=1)
    a, b = lora_state_dict(full.unet), lora_state_dict(resumed.unet)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in resumed.log] == [r["step"] for r in full.log]


def test_config_checks_name_the_fix():
    with pytest.raises(ValueError, match="multiple of lora.num_workers"):
        LoraConfig(batch_size=6, num_workers=4)
    assert LoraConfig().train_text_encoder is False  # the paper adapts the UNet only
    assert LoraConfig(train_text_encoder=True).train_text_encoder is True


def test_settings_take_run_seed_only_when_lora_seed_is_unset():
    from t2id.config import validate_config
    from t2id.lora.settings import settings
    from t2id.runner import settings_hash

    def hashed(**sections):
        return settings_hash(settings(validate_config(sections)))

    assert hashed(run={"seed": 1}) != hashed(run={"seed": 2})  # each fold's seed derives from run.seed
    assert hashed(run={"seed": 1}, lora={"seed": 5}) == hashed(run={"seed": 2}, lora={"seed": 5})
    assert hashed(split={"folds": 2}) == hashed(split={"folds": 3})  # other sections: not an input


def test_fold_examples_never_hold_validation_images(tmp_path):
    from t2id.lora.stage import fold_examples

    store = open_store(str(tmp_path))
    names = ["thyroid cartilage", "cricoid cartilage", "tracheal ring", "strap muscle", "thyroid lobe", "vocal fold"]
    store.write_text(layout.data.classes, json.dumps({"names": names}))
    rows, folds = [], []
    for i in range(12):
        key = layout.data.image(f"{i:02d}", ".png")
        store.write_bytes(key, b"x")
        cls = [2, 5, 3][i % 3]  # tracheal ring, vocal fold, strap muscle (not a target)
        rows.append({"image_id": f"{i:02d}", "uri": store.uri(key), "width": 64, "height": 64, "group": f"s{i // 4}",
                     "source": "real", "boxes": [{"class_id": cls, "x": .5, "y": .5, "w": .2, "h": .2}],
                     "sha256": "0"})
        folds.append({"image_id": f"{i:02d}", "fold": (i // 4) % 2, "group": f"s{i // 4}"})
    store.write_table(layout.data.manifest, pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
    store.write_table(layout.split.folds, pa.Table.from_pylist(folds, schema=FOLDS_SCHEMA))
    targets = [(c.name, c.prompts) for c in LoraConfig().target_classes]
    for fold in (0, 1):
        examples = fold_examples(store, fold, names, targets)
        val = {f["image_id"] for f in folds if f["fold"] == fold}
        train = {e.image_id for e in examples}
        assert train and not train & val
        expected = {r["image_id"] for r in rows
                    if r["image_id"] not in val and r["boxes"][0]["class_id"] in (2, 5)}
        assert train == expected
        assert {e.prompt for e in examples} == {p for _, ps in targets for p in ps}
    with pytest.raises(Exception, match="not a class of this dataset"):
        fold_examples(store, 0, names, [("trachea", ["x"])])


# Text-encoder LoRA (lora.train_text_encoder) ----------------------------------------------------

PROMPT = "ultrasound scan of the vocal fold"


def _encoders(p):
    return [p.tokenizer, p.tokenizer_2], [p.text_encoder, p.text_encoder_2]


@pytest.fixture(scope="module")
def trained_te(tiny_set, cache_dir):
    _, _, cache = tiny_set
    cfg = LoraConfig(**CFG, epochs=5, train_text_encoder=True)
    pipe = load_sdxl_pipeline("tiny", cache_dir)
    state = setup_training(pipe, cfg, len(cache), seed=0)
    init = [{k: v.clone() for k, v in lora_state_dict(e).items()} for e in state.text_encoders]
    fit(state, cache, cfg, seed=0)
    for e in state.text_encoders:
        e.eval()
    return pipe, state, cfg, init


def test_text_encoder_lora_trains(trained_te, tiny_set):
    pipe, state, _, init = trained_te
    _, _, cache = tiny_set
    assert len(state.log) == 10 and all(np.isfinite(r["loss"]) for r in state.log)
    assert state.text_encoders == [pipe.text_encoder, pipe.text_encoder_2]
    n_unet = sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad)
    assert sum(p.numel() for p in state.params) > n_unet  # the encoders' LoRA is in the optimizer
    for before, encoder in zip(init, state.text_encoders):
        after = lora_state_dict(encoder)
        assert after.keys() == before.keys() and any("q_proj" in k for k in after)
        assert all(v.dtype == torch.float32 for v in after.values())  # fp32 master weights
        changed = [k for k in after if not torch.equal(after[k], before[k])]
        assert any("lora_B" in k for k in changed), "text-encoder LoRA did not move from its zero init"
    # The prompts are encoded through the trained encoders, so they no longer match the cache.
    embeds, pooled = encode_prompts(*_encoders(pipe), cache.prompts)
    assert not torch.allclose(embeds, cache.prompt_embeds, atol=1e-4)
    assert not torch.allclose(pooled, cache.pooled_embeds, atol=1e-4)


def test_text_encoder_lora_saved_and_loaded_by_diffusers(trained_te, cache_dir, tmp_path):
    from safetensors.torch import load_file

    pipe, state, _, _ = trained_te
    save_adapter(state.unet, tmp_path, state.text_encoders)
    keys = load_file(str(tmp_path / layout.lora.adapter_file)).keys()
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in keys), prefix
    fresh = load_sdxl_pipeline("tiny", cache_dir)

    def each_encoder(p):  # (hidden states, pooled) of each encoder on its own
        return [encode_prompts([tok], [enc], [PROMPT]) for tok, enc in zip(*_encoders(p))]

    base = each_encoder(fresh)
    fresh.load_lora_weights(str(tmp_path))
    adapted = each_encoder(fresh)
    trained = each_encoder(pipe)
    for b, a, t in zip(base, adapted, trained):  # text_encoder, text_encoder_2
        assert (a[0] - b[0]).abs().max() > 1e-4  # the loaded adapter changes this encoder's output
        torch.testing.assert_close(a[0], t[0], rtol=1e-4, atol=1e-5)  # ... to exactly the trained one
    torch.testing.assert_close(adapted[1][1], trained[1][1], rtol=1e-4, atol=1e-5)  # pooled of text_encoder_2


def test_text_encoder_lora_in_checkpoint(trained_te, tiny_set, cache_dir, tmp_path):
    _, state, cfg, _ = trained_te
    _, _, cache = tiny_set
    save_checkpoint(state, tmp_path)
    restored = setup_training(load_sdxl_pipeline("tiny", cache_dir), cfg, len(cache), seed=5)
    restore_checkpoint(restored, tmp_path)
    assert restored.step == state.step
    for saved, loaded in zip(state.text_encoders, restored.text_encoders):
        a, b = lora_state_dict(saved), lora_state_dict(loaded)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key])
    with pytest.raises(RuntimeError, match="text-encoder"):
        (tmp_path / "lora_text_encoder.safetensors").unlink()
        restore_checkpoint(restored, tmp_path)


def test_bf16_training_keeps_frozen_weights_bf16_and_lora_state_fp32(tiny_set, cache_dir):
    """mixed_precision bf16 (on CPU too): the frozen UNet in bf16, LoRA parameters and AdamW's moments in
    fp32, SDPA attention, and a step runs with a finite loss that changes the LoRA weights."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    _, _, cache = tiny_set
    cfg = LoraConfig(**{**CFG, "mixed_precision": "bf16"}, epochs=1)
    pipe = load_sdxl_pipeline("tiny", cache_dir)
    state = setup_training(pipe, cfg, len(cache), seed=0)
    lora = {n for n, p in pipe.unet.named_parameters() if p.requires_grad}
    frozen = [p for n, p in pipe.unet.named_parameters() if n not in lora]
    assert lora and frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in state.params} == {torch.float32} and state.autocast_dtype == torch.bfloat16
    assert {type(a) for a in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    before = [p.detach().clone() for p in state.params]
    loss = train_step(state, cache, cfg, make_schedule(len(cache), cfg, 1), seed=0, rank=0)
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, state.params))
    moments = [s[k] for s in state.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}


def test_shared_cache_is_encoded_once_over_ranks_and_assembled_from_the_store(tiny_set, cache_dir, tmp_path):
    """Rank r encodes examples r::world into a store shard; every rank assembles the whole cache (issue 17)."""
    from t2id.lora.data import SharedCache

    store, examples, whole = tiny_set
    pipe = load_sdxl_pipeline("tiny", cache_dir)

    def rank(r: int, disk: str, pipe=pipe) -> SharedCache:  # one local disk per rank, as on separate nodes
        return SharedCache(store, 0, tmp_path / disk, "m", pipe, examples, 64, True, True, "cpu", r, 3)

    ranks = [rank(r, f"node{r}") for r in range(3)]
    for r in ranks:  # before the barrier
        r.put_shard()
    caches = [r.assemble() for r in ranks]  # after it
    assert [r.encoded for r in ranks] == [3, 3, 2]  # 8 examples split over 3 ranks, nothing encoded twice
    assert len(store.list("lora/fold=0/latents")) == 3
    for cache in caches:
        assert cache.image_ids == whole.image_ids and cache.prompts == whole.prompts
        torch.testing.assert_close(cache.latent_mean, whole.latent_mean, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(cache.prompt_embeds, whole.prompt_embeds)
        assert torch.equal(cache.prompt_index, whole.prompt_index)
    # A worker restarted on a fresh node reads the shards and encodes nothing (no pipeline needed) ...
    fresh = rank(0, "fresh", pipe=None)
    fresh.put_shard()
    assert fresh.assemble().image_ids == whole.image_ids and fresh.encoded == 0
    # ... and re-encodes a damaged shard instead of trusting it.
    store.write_bytes(next(k for k in store.list("lora/fold=0/latents") if k.endswith("rank=1-of-3.pt")), b"bad")
    again = rank(0, "fresh2")
    again.put_shard()
    again.assemble()
    assert again.encoded == 3


def test_channels_last_trains_the_same_adapter_and_compile_is_applied_in_place(tiny_set, cache_dir):
    """lora.channels_last (issue 17): NHWC conv weights, the same losses and LoRA weights as the default layout
    up to summation order. lora.compile compiles the UNet's forward in place, so DDP, PEFT and the adapter's
    key names see the same module (the compiled forward itself is checked by bench_gpu.py --compile: compiling
    even the tiny UNet takes about a minute on a CPU)."""
    _, _, cache = tiny_set
    runs = {}
    for channels_last in (False, True):
        cfg = LoraConfig(**CFG, epochs=1, channels_last=channels_last)
        state = setup_training(load_sdxl_pipeline("tiny", cache_dir), cfg, len(cache), seed=0)
        losses = [train_step(state, cache, cfg, make_schedule(len(cache), cfg, 1), seed=0, rank=0) for _ in range(2)]
        runs[channels_last] = state, losses
    convs = [m.weight for m in runs[True][0].unet.modules()
             if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]  # 1x1: both layouts are one
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert runs[True][1] == pytest.approx(runs[False][1], rel=1e-4)
    plain, nhwc = lora_state_dict(runs[False][0].unet), lora_state_dict(runs[True][0].unet)
    assert plain.keys() == nhwc.keys()
    for key in plain:
        torch.testing.assert_close(nhwc[key], plain[key], rtol=1e-3, atol=1e-4)  # Adam steps are ~lr = 1e-2

    cfg = LoraConfig(**CFG, epochs=1, compile=True)
    state = setup_training(load_sdxl_pipeline("tiny", cache_dir), cfg, len(cache), seed=0)
    assert state.unet._compiled_call_impl is not None  # nn.Module.compile: same object, compiled __call__
    assert lora_state_dict(state.unet).keys() == plain.keys()
