"""Training data of one fold's adapter: which images, with which prompt, and their frozen encodings.

1. `select_examples`: the fold's TRAIN rows (`t2id.data.manifest.load_fold_rows`, i.e. all other
   folds) that hold at least one target class. An image holding several target classes is used
   once, with the prompt of the target class covering the largest box area in it; a class with
   several prompts cycles through them over its images (deterministic).
2. `preprocess_image`: resize the shorter side to the resolution (bilinear) and centre-crop, like
   diffusers' train_text_to_image_lora_sdxl.py with --center_crop; the crop's top-left corner
   and the original size feed SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2).
3. `build_cache`: the VAE and both text encoders are frozen, so their outputs are computed once
   and reused every epoch instead of re-encoding every step:
     - latents: the VAE posterior of every image is stored as (mean, std) x scaling factor, so a
       training step still draws a fresh posterior sample (mean + std * eps) as the reference
       loop's `latent_dist.sample()` does, at the cost of one randn instead of a VAE forward.
     - flips: with hflip on, both orientations are encoded up front (a flipped image's latent
       is not the flipped latent of the image: the VAE is not flip-equivariant). A step picks
       orientation 0 or 1 per image with probability 1/2. Since the crop is centred, the crop
       corner, hence add_time_ids, is the same for both orientations.
     - text: one (77 x 2048-ish) hidden-state tensor and one pooled embedding per distinct prompt,
       plus each prompt's token ids of both tokenizers: with lora.train_text_encoder the encoders
       carry trainable LoRA, so the step re-encodes the ids instead of using the cached embeddings.
   `load_or_build_cache` keys a local file by everything that changes the encodings (model
   folder, image bytes, prompts, resolution, flip, VAE dtype), so a restarted worker reuses it.
4. `SharedCache` (DDP): rank r encodes only examples r::world and puts its shard in
   the run store; after a barrier every rank assembles the whole cache from the shards. Encoding
   is done once per fold, split over the ranks, and a worker restarted on another node reads the
   shards instead of encoding again (issue 17, item 5).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from t2id import layout
from t2id.errors import UserError


@dataclass(frozen=True)
class Example:
    """One training image: where to read it and which prompt goes with it."""

    image_id: str
    key: str  # run-store key of the image file
    sha256: str
    class_name: str
    prompt: str


def select_examples(rows: pa.Table, class_names: list[str], targets: list[tuple[str, list[str]]],
                    run_store) -> list[Example]:
    """Examples of the rows holding a target class (see module doc for the prompt rule).

    `targets` = [(class name, prompts), ...] in config order; `class_names` = the run's classes.
    """
    target_ids: dict[int, tuple[str, list[str]]] = {}
    for name, prompts in targets:
        if name not in class_names:
            raise UserError(f"lora.target_classes: {name!r} is not a class of this dataset "
                            f"({layout.data.classes} has {class_names}); fix the name")
        target_ids[class_names.index(name)] = (name, prompts)
    seen_per_class: dict[str, int] = {name: 0 for name, _ in targets}
    examples = []
    for row in rows.to_pylist():
        area: dict[int, float] = {}
        for box in row["boxes"] or []:
            if box["class_id"] in target_ids:
                area[box["class_id"]] = area.get(box["class_id"], 0.0) + box["w"] * box["h"]
        if not area:
            continue
        best = max(area, key=lambda cid: (area[cid], -cid))
        name, prompts = target_ids[best]
        prompt = prompts[seen_per_class[name] % len(prompts)]
        seen_per_class[name] += 1
        examples.append(Example(row["image_id"], run_store.key_of(row["uri"]), row["sha256"], name, prompt))
    return examples


def preprocess_image(data: bytes, resolution: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Image bytes -> (float32 HxWx3 in [-1, 1], original (h, w), crop top-left (top, left))."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    original = (image.height, image.width)
    scale = resolution / min(image.height, image.width)
    new_h, new_w = max(resolution, round(image.height * scale)), max(resolution, round(image.width * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return pixels, original, (top, left)


def micro_conditioning(original_hw: tuple[int, int], crop_tl: tuple[int, int], target_hw: tuple[int, int]) -> list[int]:
    """SDXL's add_time_ids (Podell et al. 2023, Sec. 2.2): original size, crop top-left, target size."""
    return [*original_hw, *crop_tl, *target_hw]


def tokenize_prompts(tokenizers: list, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids of the prompts for each tokenizer: [P, max_length] long tensors."""
    return [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids for tokenizer in tokenizers]


def encode_ids(text_encoders: list, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding of token ids (one tensor per encoder, on the encoders' device), with
    autograd: penultimate hidden states of both encoders, concatenated, and the pooled projection of
    the second (as StableDiffusionXLPipeline.encode_prompt does without CFG)."""
    hidden_states = []
    pooled = None
    for encoder, encoder_ids in zip(text_encoders, ids):
        out = encoder(encoder_ids, output_hidden_states=True)
        hidden_states.append(out.hidden_states[-2])
        pooled = out[0]  # last encoder wins: CLIPTextModelWithProjection's text_embeds
    return torch.cat(hidden_states, dim=-1), pooled


@torch.no_grad()
def encode_prompts(tokenizers: list, text_encoders: list, prompts: list[str],
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_ids` of the tokenized prompts, without autograd.

    Returns (prompt_embeds [P, 77, D1+D2], pooled [P, proj]), float32 on CPU.
    """
    ids = [t.to(device) for t in tokenize_prompts(tokenizers, prompts)]
    embeds, pooled = encode_ids(text_encoders, ids)
    return embeds.float().cpu(), pooled.float().cpu()


@dataclass
class LatentCache:
    """Frozen encodings of a fold's examples (see module doc). F = 2 orientations with hflip, else 1."""

    image_ids: list[str]
    latent_mean: torch.Tensor  # [N, F, C, h, w] fp16, already x VAE scaling factor
    latent_std: torch.Tensor  # [N, F, C, h, w] fp16
    time_ids: torch.Tensor  # [N, 6] SDXL micro-conditioning
    prompt_index: torch.Tensor  # [N] long -> rows of prompt_embeds
    prompts: list[str]
    prompt_embeds: torch.Tensor  # [P, 77, D]
    pooled_embeds: torch.Tensor  # [P, proj]
    prompt_ids: list[torch.Tensor] = field(default_factory=list)  # per tokenizer: [P, 77] token ids
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def orientations(self) -> int:
        return self.latent_mean.shape[1]

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@torch.no_grad()
def encode_images(vae, pixels_nhwc: np.ndarray, batch: int = 8, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) x scaling factor of a stack of [-1, 1] images, float32 on CPU."""
    means, stds = [], []
    scale = vae.config.scaling_factor
    for start in range(0, len(pixels_nhwc), batch):
        x = torch.from_numpy(pixels_nhwc[start:start + batch]).permute(0, 3, 1, 2).to(device, dtype)
        dist = vae.encode(x).latent_dist
        means.append((dist.mean * scale).float().cpu())
        stds.append((dist.std * scale).float().cpu())
    return torch.cat(means), torch.cat(stds)


# Examples read, preprocessed and VAE-encoded at a time while building the cache: the images of one
# chunk are all the pixels ever held, so memory is bounded by the chunk, not by the dataset.
ENCODE_CHUNK = 8


def build_cache(pipe, examples: list[Example], read_bytes, resolution: int, hflip: bool,
                vae_fp32: bool = True, device: torch.device | str = "cpu", chunk: int = ENCODE_CHUNK) -> LatentCache:
    """Encode every example once (both orientations with hflip) and every distinct prompt once.

    Streamed: `chunk` examples at a time are read, preprocessed and encoded into preallocated latent
    tensors, stored fp16 (a posterior mean/std needs no more; gather_batch samples in fp32), so the cache
    holds 2 x F x 4 x (res/8)^2 halves per image (32 KiB at 512 px with hflip) and the pixels of one chunk.
    `read_bytes(key) -> bytes` reads an image (a run store's read_bytes).
    """
    if not examples:
        raise UserError("no training images hold a target class in this fold; check lora.target_classes "
                        f"against {layout.data.classes} and the split")
    vae_dtype = torch.float32 if vae_fp32 else pipe.vae.dtype
    vae = pipe.vae.to(device, vae_dtype)
    f = 2 if hflip else 1
    mean = std = None
    time_ids = []
    for start in range(0, len(examples), chunk):
        pixels = []
        for ex in examples[start:start + chunk]:
            image, original, crop = preprocess_image(read_bytes(ex.key), resolution)
            pixels.append(image)
            time_ids.append(micro_conditioning(original, crop, (resolution, resolution)))
        stack = np.stack(pixels)
        # [n, F, H, W, 3]: orientation 1 is the mirrored image (flip the width axis).
        stack = np.stack([stack, stack[:, :, ::-1, :]], axis=1) if hflip else stack[:, None]
        n = len(pixels)
        part_mean, part_std = encode_images(vae, np.ascontiguousarray(stack.reshape(n * f, *stack.shape[2:])),
                                            batch=chunk * f, device=device, dtype=vae_dtype)
        if mean is None:
            shape = (len(examples), f, *part_mean.shape[1:])
            mean, std = torch.empty(shape, dtype=torch.float16), torch.empty(shape, dtype=torch.float16)
        mean[start:start + n] = part_mean.reshape(n, f, *part_mean.shape[1:])
        std[start:start + n] = part_std.reshape(n, f, *part_std.shape[1:])
    prompts = sorted({ex.prompt for ex in examples})
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    embeds, pooled = encode_prompts(tokenizers, [pipe.text_encoder, pipe.text_encoder_2], prompts, device=device)
    return LatentCache(
        image_ids=[ex.image_id for ex in examples],
        latent_mean=mean,
        latent_std=std,
        time_ids=torch.tensor(time_ids, dtype=torch.float32),
        prompt_index=torch.tensor([prompts.index(ex.prompt) for ex in examples], dtype=torch.long),
        prompts=prompts,
        prompt_embeds=embeds,
        pooled_embeds=pooled,
        prompt_ids=tokenize_prompts(tokenizers, prompts),
        meta={"resolution": resolution, "hflip": hflip, "vae_fp32": vae_fp32},
    )


def cache_key(model_dir: str, examples: list[Example], resolution: int, hflip: bool, vae_fp32: bool,
              extra_tokens: tuple[str, ...] = ()) -> str:
    payload = {"model": str(model_dir), "examples": [(e.image_id, e.sha256, e.prompt) for e in examples],
               "resolution": resolution, "hflip": hflip, "vae_fp32": vae_fp32, "version": 3}
    if extra_tokens:  # textual inversion's pseudo-words change how the prompts tokenize
        payload["tokens"] = list(extra_tokens)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def load_or_build_cache(cache_dir: Path, model_dir: str, pipe, examples: list[Example], read_bytes,
                        resolution: int, hflip: bool, vae_fp32: bool = True,
                        device: torch.device | str = "cpu", extra_tokens: tuple[str, ...] = ()) -> LatentCache:
    """`build_cache`, memoized in `<cache_dir>/lora-latents/<key>.pt` (written atomically). `extra_tokens`:
    words added to the tokenizers (textual inversion), which change the prompts' token ids."""
    key = cache_key(model_dir, examples, resolution, hflip, vae_fp32, tuple(extra_tokens))
    path = Path(cache_dir) / "lora-latents" / f"{key}.pt"
    if path.exists():
        try:
            return LatentCache(**torch.load(path, weights_only=True))
        except Exception:  # a corrupt cache file is rebuilt, never trusted
            path.unlink(missing_ok=True)
    cache = build_cache(pipe, examples, read_bytes, resolution, hflip, vae_fp32, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    torch.save(cache.state(), tmp)
    os.replace(tmp, path)
    return cache


def _cache_bytes(cache: LatentCache) -> bytes:
    buffer = io.BytesIO()
    torch.save(cache.state(), buffer)
    return buffer.getvalue()


def _load_cache(data: bytes) -> LatentCache:
    return LatentCache(**torch.load(io.BytesIO(data), weights_only=True))


def _slice_cache(cache: LatentCache, rank: int, world: int) -> LatentCache:
    """Examples rank::world of a whole cache (what that rank's shard holds)."""
    return LatentCache(image_ids=cache.image_ids[rank::world], latent_mean=cache.latent_mean[rank::world].clone(),
                       latent_std=cache.latent_std[rank::world].clone(), time_ids=cache.time_ids[rank::world].clone(),
                       prompt_index=cache.prompt_index[rank::world].clone(), prompts=cache.prompts,
                       prompt_embeds=cache.prompt_embeds, pooled_embeds=cache.pooled_embeds,
                       prompt_ids=cache.prompt_ids, meta=cache.meta)


def merge_shards(shards: list[LatentCache], world: int) -> LatentCache:
    """The whole cache from shards[r] = examples r::world: latents interleaved back into example order,
    each shard's prompt rows re-indexed into the sorted union of prompts."""
    n = sum(len(s) for s in shards)
    first = shards[0]
    mean = torch.empty((n, *first.latent_mean.shape[1:]), dtype=first.latent_mean.dtype)
    std = torch.empty_like(mean)
    time_ids = torch.empty((n, first.time_ids.shape[1]), dtype=first.time_ids.dtype)
    image_ids: list[str] = [""] * n
    prompts = sorted({p for s in shards for p in s.prompts})
    rows: dict[str, tuple[LatentCache, int]] = {}
    prompt_index = torch.empty(n, dtype=torch.long)
    for r, shard in enumerate(shards):
        mean[r::world], std[r::world], time_ids[r::world] = shard.latent_mean, shard.latent_std, shard.time_ids
        image_ids[r::world] = shard.image_ids
        prompt_index[r::world] = torch.tensor([prompts.index(shard.prompts[i]) for i in shard.prompt_index.tolist()],
                                              dtype=torch.long)
        for i, prompt in enumerate(shard.prompts):
            rows.setdefault(prompt, (shard, i))
    def gather(field_of) -> torch.Tensor:
        return torch.stack([field_of(rows[p][0])[rows[p][1]] for p in prompts])
    return LatentCache(
        image_ids=image_ids, latent_mean=mean, latent_std=std, time_ids=time_ids, prompt_index=prompt_index,
        prompts=prompts, prompt_embeds=gather(lambda s: s.prompt_embeds), pooled_embeds=gather(lambda s: s.pooled_embeds),
        prompt_ids=[torch.stack([rows[p][0].prompt_ids[t][rows[p][1]] for p in prompts])
                    for t in range(len(first.prompt_ids))],
        meta=first.meta)


class SharedCache:
    """The fold's frozen encodings, made once over all DDP ranks and shared through the run store.

    `put_shard()` (every rank, before a barrier) makes sure this rank's shard, examples rank::world, is in the
    store: cut from a local whole cache when the rank has one (a restarted worker), else encoded.
    `assemble()` (after the barrier) returns the whole cache: the local one, or the shards read and merged,
    then kept on local disk. A shard that cannot be read is encoded again here, never trusted.
    `encoded` counts the examples this rank encoded."""

    def __init__(self, store, fold: int, cache_dir: Path, model_dir: str, pipe, examples: list[Example],
                 resolution: int, hflip: bool, vae_fp32: bool, device: torch.device | str, rank: int, world: int,
                 extra_tokens: tuple[str, ...] = ()):
        from t2id import layout

        self.store, self.fold, self.pipe, self.examples, self.device = store, fold, pipe, examples, device
        self.resolution, self.hflip, self.vae_fp32, self.rank, self.world = resolution, hflip, vae_fp32, rank, world
        self.key = cache_key(model_dir, examples, resolution, hflip, vae_fp32, tuple(extra_tokens))
        self.path = Path(cache_dir) / "lora-latents" / f"{self.key}.pt"
        self.shard_key = lambda r: layout.lora.latent_shard(fold, self.key, r, world)
        self.shards = min(world, len(examples))  # more ranks than examples: the extra ranks hold no shard
        self.encoded = 0
        self.local: LatentCache | None = None
        if self.path.exists():
            try:
                self.local = _load_cache(self.path.read_bytes())
            except Exception:  # a corrupt cache file is rebuilt, never trusted
                self.path.unlink(missing_ok=True)

    def _encode(self, r: int) -> LatentCache:
        part = self.examples[r::self.world]
        self.encoded += len(part)
        return build_cache(self.pipe, part, self.store.read_bytes, self.resolution, self.hflip, self.vae_fp32,
                           self.device)

    def put_shard(self) -> None:
        if self.rank < self.shards and not self.store.exists(self.shard_key(self.rank)):
            shard = (_slice_cache(self.local, self.rank, self.world) if self.local is not None
                     else self._encode(self.rank))
            self.store.write_bytes(self.shard_key(self.rank), _cache_bytes(shard))

    def assemble(self) -> LatentCache:
        if self.local is not None:
            return self.local
        parts = []
        for r in range(self.shards):
            try:
                parts.append(_load_cache(self.store.read_bytes(self.shard_key(r))))
            except Exception:  # missing or damaged shard: encode it here rather than fail or trust it
                parts.append(self._encode(r))
        cache = merge_shards(parts, self.world)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{uuid.uuid4().hex}-{self.path.name}")
        torch.save(cache.state(), tmp)
        os.replace(tmp, self.path)
        self.local = cache
        return cache
