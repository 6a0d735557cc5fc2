"""SDXL model sources: a tiny random SDXL built from configs, local dirs, s3:// prefixes, hub ids.

Every source ends up as a local diffusers `StableDiffusionXLPipeline` folder that
`load_sdxl_pipeline` opens with `from_pretrained`, so the tiny model takes exactly the path
real SDXL 1.0 weights take (STYLE.md item 5).

  'tiny'            built once by `build_tiny_sdxl` into `<cache_dir>/models/tiny-sdxl-<hash>`;
                    the hash covers the configs below and the seed, so a changed config is a new folder.
  /a/local/dir      used in place (must hold model_index.json).
  s3://bucket/pfx   synced once to `<cache_dir>/models/s3-<hash>`; the hash is the sha256 of the
                    object listing (key, size, ETag), so changed weights give a new cache entry
                    and unchanged weights are never downloaded twice.
  org/name          a Hugging Face hub id: downloaded only when allow_network is true; otherwise
                    only an already-cached snapshot is used.

The tiny model follows diffusers' SDXL test recipe (`get_dummy_components` in
tests/pipelines/stable_diffusion_xl/): `torch.manual_seed(seed)` before each part, a small
UNet with SDXL's text_time micro-conditioning, a small VAE, and two small CLIP text encoders
whose hidden sizes add up to the UNet's cross-attention width. Unlike the diffusers tests, the
tokenizers carry the real CLIP BPE vocabulary (49408 tokens) that open_clip ships, so prompts
tokenize exactly as with SDXL 1.0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from t2id.clip_vocab import build_clip_tokenizer, clip_vocab_and_merges, open_clip_bpe_path
from t2id.errors import UserError
from t2id.store import s3_client

TINY = "tiny"
TINY_FORMAT_VERSION = 1  # bump when the tiny recipe changes in a way the hash below cannot see

# Tiny configs. cross_attention_dim = hidden(te1) + hidden(te2); the add-embedding input is
# 6 micro-conditioning ids x addition_time_embed_dim + the pooled projection of te2 (SDXL, Podell
# et al. 2023, Sec. 2.2: original size, crop top-left, target size, each (h, w)).
TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8
TINY_UNET: dict[str, Any] = dict(
    sample_size=8,  # latent side at 64 px (VAE factor 8); only the pipeline's default size
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 1),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_PROJECTION,
    cross_attention_dim=2 * TEXT_HIDDEN,
    norm_num_groups=8,
)
# Four blocks give SDXL's 8x spatial factor, so 64 px images become 8x8x4 latents like SDXL's.
TINY_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.13025,  # SDXL's VAE scaling factor
)
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=TEXT_HIDDEN,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
    projection_dim=TEXT_PROJECTION,
    max_position_embeddings=77,
)
# SDXL 1.0's scheduler config (EulerDiscrete, scaled-linear betas).
SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


# ---------------------------------------------------------------------------------------------
# Tiny SDXL
# ---------------------------------------------------------------------------------------------


def tiny_recipe_hash(seed: int = 0) -> str:
    """Identity of the tiny model: its configs, seed, recipe version and the BPE file."""
    bpe_sha = hashlib.sha256(open_clip_bpe_path().read_bytes()).hexdigest()
    payload = json.dumps({"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT, "scheduler": SCHEDULER,
                          "seed": seed, "version": TINY_FORMAT_VERSION, "bpe": bpe_sha},
                         sort_keys=True, default=list)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """The seven SDXL pipeline components with deterministic random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = clip_vocab_and_merges()
    text_config = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                                 eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                                 **TINY_TEXT)
    # Seed before each part, as diffusers' get_dummy_components does, so each part's weights do
    # not depend on how many random numbers the parts before it drew.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer("<|endoftext|>"),
        tokenizer_2=build_clip_tokenizer("!"),  # SDXL 1.0's second tokenizer pads with '!'
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )


def build_tiny_sdxl(out_dir: Path, seed: int = 0) -> Path:
    """Build the tiny SDXL and save it as a diffusers StableDiffusionXLPipeline folder at `out_dir`.

    Written to a temp sibling and renamed, so a concurrent or killed build never leaves a
    half-written model where a reader would take it for complete.
    """
    from diffusers import StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{uuid.uuid4().hex}-{out_dir.name}")
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed))
    pipe.save_pretrained(tmp, safe_serialization=True)
    return _publish_dir(tmp, out_dir)


def _publish_dir(tmp: Path, dest: Path) -> Path:
    """Rename a finished temp folder into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, dest)
    except OSError:
        if not (dest / "model_index.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _tiny_dir(cache_dir: Path, seed: int = 0) -> Path:
    path = Path(cache_dir) / "models" / f"tiny-sdxl-{tiny_recipe_hash(seed)}"
    if not (path / "model_index.json").exists():
        build_tiny_sdxl(path, seed)
    return path


# ---------------------------------------------------------------------------------------------
# s3:// and hub sources
# ---------------------------------------------------------------------------------------------


def sync_s3_model(uri: str, cache_dir: Path, endpoint_url: str | None = None) -> Path:
    """Download the s3:// prefix `uri` once into a cache folder keyed by the listing's content.

    The key is sha256 over (relative key, size, ETag) of every object, so a re-uploaded weight
    file (new ETag) lands in a new folder and an unchanged prefix is never downloaded again.
    """
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise UserError(f"lora.base_model {uri!r}: expected s3://bucket/prefix")
    client = s3_client(endpoint_url)
    folder = f"{prefix}/" if prefix else ""
    objects: list[tuple[str, int, str]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(folder):]
            if rel and not rel.endswith("/"):
                objects.append((rel, int(obj["Size"]), obj["ETag"].strip('"')))
    if not any(rel == "model_index.json" for rel, _, _ in objects):
        raise UserError(f"lora.base_model {uri!r}: no model_index.json under that prefix; point it at a "
                        "diffusers StableDiffusionXLPipeline folder (as written by save_pretrained)")
    objects.sort()
    digest = hashlib.sha256(json.dumps(objects).encode()).hexdigest()[:16]
    dest = Path(cache_dir) / "models" / f"s3-{digest}"
    if (dest / "model_index.json").exists():
        return dest
    tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}-{dest.name}")
    for rel, _, _ in objects:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, f"{folder}{rel}", str(target))
    return _publish_dir(tmp, dest)


def resolve_model_source(source: str, cache_dir: Path, allow_network: bool = False,
                         endpoint_url: str | None = None) -> str:
    """Local folder of a diffusers SDXL pipeline for `source` ('tiny', a dir, s3://..., or a hub id)."""
    cache_dir = Path(cache_dir).expanduser()
    if source == TINY:
        return str(_tiny_dir(cache_dir))
    if source.startswith("s3://"):
        return str(sync_s3_model(source, cache_dir, endpoint_url))
    local = Path(source).expanduser()
    if local.exists() or source.startswith((".", "/", "~")):
        if not (local / "model_index.json").exists():
            raise UserError(f"lora.base_model {source!r}: no model_index.json in that folder; point it at a "
                            "diffusers StableDiffusionXLPipeline folder")
        return str(local)
    if source.count("/") != 1:
        raise UserError(f"lora.base_model {source!r}: not 'tiny', an existing folder, an s3:// URI or a "
                        "hub id like 'stabilityai/stable-diffusion-xl-base-1.0'")
    from huggingface_hub import snapshot_download

    hub_cache = cache_dir / "hub"
    try:
        return snapshot_download(source, cache_dir=hub_cache, local_files_only=True)
    except Exception:
        if not allow_network:
            raise UserError(f"lora.base_model {source!r} is a hub id that is not in the cache {hub_cache}; "
                            "set lora.allow_network: true to download it, or sync it to s3:// or a "
                            "local folder") from None
    # The diffusers folders only: not the single-file checkpoints (sd_xl_*.safetensors) or fp16 copies.
    return snapshot_download(source, cache_dir=hub_cache,
                             allow_patterns=["*.json", "*.txt", "*.safetensors"],
                             ignore_patterns=["*.fp16.safetensors", "sd_xl_*"])


def load_sdxl_pipeline(source: str, cache_dir: Path, allow_network: bool = False,
                       torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       endpoint_url: str | None = None):
    """A StableDiffusionXLPipeline from any source, loaded with `from_pretrained` (the real-weights path)."""
    from diffusers import StableDiffusionXLPipeline

    path = resolve_model_source(source, cache_dir, allow_network, endpoint_url)
    pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def speed_up(module: torch.nn.Module, channels_last: bool, compile: bool) -> None:
    """`lora.channels_last`/`compile`, `generate.channels_last`/`compile` (issue 17), both in place.

    In place matters: DDP wraps, PEFT injects LoRA layers into and diffusers fuses adapters into the
    same module object afterwards. `nn.Module.compile` compiles its forward lazily (at the first call)
    and parameters are graph inputs, so a fused or swapped adapter's weights are what the compiled
    forward reads; a changed module structure (an adapter loaded or unloaded) recompiles once.
    """
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if compile:
        module.compile()


def speed_up_pipeline(pipe: Any, channels_last: bool, compile: bool) -> None:
    """`generate.channels_last`/`compile` on a pipeline: both on the UNet (`speed_up`), where the denoising
    steps are; channels_last on the VAE too, whose decoder runs its convolutions at full resolution."""
    speed_up(pipe.unet, channels_last, compile)
    if channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
