"""Ray Train layer: 2 CPU workers with gloo (real DDP), checkpoints in the run store (local and the
S3 test server), a worker killed mid-run, resume equal to not stopping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_lora_train import make_examples

from t2id.lora.config import LoraConfig
from t2id.lora.ray_train import train_fold
from t2id.lora.train import ADAPTER_FILE
from t2id.store import open_store

PREFIX = "lora/fold=0"
SEED = 7


def _cfg(**overrides) -> LoraConfig:
    # 8 images, global batch 4 over 2 workers -> 2 steps per epoch, 6 steps, checkpoint every 2.
    base = dict(rank=4, alpha=4, resolution=64, epochs=3, batch_size=4, lr=1e-3, mixed_precision="no",
                num_workers=2, checkpoint_every_steps=2, max_failures=1, validation_images=1, validation_steps=2)
    return LoraConfig(**{**base, **overrides})


def _ranks(store) -> list[dict]:
    return [json.loads(store.read_text(f"{PREFIX}/ranks/rank={r}.json")) for r in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    """One uninterrupted 2-worker run on a local store (the reference for the resume test)."""
    root = tmp_path_factory.mktemp("ray-local")
    store = open_store(str(root / "store"))
    examples = make_examples(store)
    result = train_fold(store, PREFIX, examples, _cfg(), SEED, root / "cache", run_name="ref")
    return store, examples, result, root


def test_ddp_ranks_disjoint_and_identical(uninterrupted):
    store, examples, result, _ = uninterrupted
    assert result.error is None
    ranks = _ranks(store)
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["lora_digest"] == ranks[1]["lora_digest"]  # DDP kept the replicas in sync
    steps0, steps1 = dict((s, ids) for s, ids in ranks[0]["steps"]), dict((s, ids) for s, ids in ranks[1]["steps"])
    assert sorted(steps0) == sorted(steps1) == list(range(6))
    for epoch in range(3):  # within an epoch the ranks saw disjoint images, together all 8
        seen0 = [i for s in (2 * epoch, 2 * epoch + 1) for i in steps0[s]]
        seen1 = [i for s in (2 * epoch, 2 * epoch + 1) for i in steps1[s]]
        assert not set(seen0) & set(seen1)
        assert sorted(seen0 + seen1) == sorted(e.image_id for e in examples)
    log = store.read_table(f"{PREFIX}/train_log.parquet").to_pylist()
    assert [r["step"] for r in log] == list(range(1, 7))
    assert store.exists(f"{PREFIX}/{ADAPTER_FILE}")
    assert store.list(f"{PREFIX}/validation/epoch=0002")  # validation images after epochs
    assert any(k.endswith("lora.safetensors") for k in store.list("lora/_ray"))  # checkpoints in the store


def test_killed_worker_resumes_on_s3_and_matches(uninterrupted, s3_bucket, s3_server, tmp_path):
    ref_store, examples, _, ref_root = uninterrupted
    store = open_store(f"s3://{s3_bucket}/runs/r1", endpoint_url=s3_server)
    for e in examples:  # same images in the S3 run store
        store.write_bytes(e.key, ref_store.read_bytes(e.key))
    marker = tmp_path / "killed-once"
    result = train_fold(store, PREFIX, examples, _cfg(validation_images=0), SEED, ref_root / "cache",
                        run_name="killed", fault={"rank": 1, "step": 3, "marker": str(marker), "delay_s": 8})
    assert result.error is None
    assert marker.exists()  # the worker really died once
    ranks = _ranks(store)
    # The restarted group resumed from the checkpoint at step 2, not from scratch.
    assert [r["resumed_from_step"] for r in ranks] == [2, 2]
    assert [s for s, _ in ranks[1]["steps"]] == [2, 3, 4, 5]
    assert ranks[0]["lora_digest"] == ranks[1]["lora_digest"]
    ckpt_keys = open_store(f"s3://{s3_bucket}/runs/r1", endpoint_url=s3_server).list("lora/_ray/killed")
    assert any(k.endswith("trainer.pt") for k in ckpt_keys)
    # Resumed = not stopped: same adapter weights (same data order, RNG from (seed, rank, step)).
    ref = load_file(str(Path(ref_store.uri(f"{PREFIX}/{ADAPTER_FILE}"))))
    got_path = tmp_path / ADAPTER_FILE
    store.read_file(f"{PREFIX}/{ADAPTER_FILE}", got_path)
    got = load_file(str(got_path))
    assert ref.keys() == got.keys() and len(ref) > 0
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5)
    log = store.read_table(f"{PREFIX}/train_log.parquet").to_pylist()
    assert [r["step"] for r in log] == list(range(1, 7))  # the log survived the restart


def test_text_encoder_lora_under_ddp(ray_local, tmp_path):
    """lora.train_text_encoder with 2 workers: the encoders' LoRA gradients are averaged over ranks, so
    both ranks end with the same UNet and text-encoder weights (the digest covers all three)."""
    store = open_store(str(tmp_path / "store"))
    examples = make_examples(store)
    cfg = _cfg(train_text_encoder=True, epochs=1, validation_images=0)
    result = train_fold(store, PREFIX, examples, cfg, SEED, tmp_path / "cache", run_name="te")
    assert result.error is None
    ranks = _ranks(store)
    assert ranks[0]["lora_digest"] == ranks[1]["lora_digest"]
    assert any(k.endswith("lora_text_encoder_2.safetensors") for k in store.list("lora/_ray/te"))
    adapter = load_file(store.uri(f"{PREFIX}/{ADAPTER_FILE}"))
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in adapter), prefix
    assert any(v.abs().max() > 0 for k, v in adapter.items() if k.startswith("text_encoder_2.") and ".up." in k)
