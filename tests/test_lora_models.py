"""Model sources: the tiny SDXL (real CLIP BPE vocabulary), local dirs, s3:// sync, hub ids offline."""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pytest
import torch

from t2id.errors import UserError
from t2id.clip_vocab import build_clip_tokenizer
from t2id.lora.models import (
    build_tiny_sdxl,
    load_sdxl_pipeline,
    resolve_model_source,
    sync_s3_model,
)
from t2id.store import sha256_file

PROMPTS = ["High-resolution ultrasound scan of the human tracheal ring", "vocal fold, 2 cm! (B-mode)"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Path(resolve_model_source("tiny", tmp_path_factory.mktemp("cache")))


def test_tokenizer_matches_open_clip():
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    for prompt in PROMPTS:
        ours = tokenizer(prompt).input_ids
        assert ours == [49406, *reference.encode(prompt), 49407]


def test_tiny_is_deterministic_and_cached(tiny_dir, tmp_path):
    again = build_tiny_sdxl(tmp_path / "again", seed=0)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        (weights,) = sorted((tiny_dir / part).glob("*.safetensors"))
        assert sha256_file(weights) == sha256_file(again / part / weights.name), part
    stamp = (tiny_dir / "model_index.json").stat().st_mtime_ns
    assert resolve_model_source("tiny", tiny_dir.parent.parent) == str(tiny_dir)  # reused, not rebuilt
    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == stamp


def test_tiny_pipeline_generates_reproducibly(tiny_dir):
    pipe = load_sdxl_pipeline(str(tiny_dir), tiny_dir.parent.parent)
    assert pipe.tokenizer(PROMPTS[0]).input_ids == pipe.tokenizer_2(PROMPTS[0]).input_ids

    def run(seed):
        return pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                    output_type="np").images

    first = run(0)
    assert first.shape == (1, 64, 64, 3)  # default size = unet sample_size x VAE factor 8
    np.testing.assert_array_equal(first, run(0))
    assert not np.array_equal(first, run(1))


def test_s3_source_syncs_once_keyed_by_content(tiny_dir, s3_bucket, s3_server, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_server)
    for path in tiny_dir.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"models/tiny/{path.relative_to(tiny_dir)}")
    uri = f"s3://{s3_bucket}/models/tiny"
    local = Path(resolve_model_source(uri, tmp_path))
    assert (local / "model_index.json").read_bytes() == (tiny_dir / "model_index.json").read_bytes()
    stamp = (local / "model_index.json").stat().st_mtime_ns
    assert sync_s3_model(uri, tmp_path) == local and (local / "model_index.json").stat().st_mtime_ns == stamp
    # New content under the same prefix -> a new cache entry, the old one untouched.
    client.put_object(Bucket=s3_bucket, Key="models/tiny/scheduler/scheduler_config.json",
                      Body=(tiny_dir / "scheduler/scheduler_config.json").read_bytes() + b"\n")
    changed = sync_s3_model(uri, tmp_path)
    assert changed != local and changed.exists() and local.exists()
    with pytest.raises(UserError, match="model_index.json"):
        resolve_model_source(f"s3://{s3_bucket}/models/nothing-here", tmp_path)


def test_bad_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model_index.json"):
        resolve_model_source(str(tmp_path), tmp_path)
    with pytest.raises(UserError, match="allow_network"):
        resolve_model_source("stabilityai/stable-diffusion-xl-base-1.0", tmp_path)
    with pytest.raises(UserError, match="not 'tiny'"):
        resolve_model_source("no-such-model", tmp_path)
