"""Callable class that turns plan rows into PNGs in the store (STYLE.md item 4).

`__init__` loads the SDXL pipeline once per process; the fold's LoRA adapter is loaded and fused
into the weights when a batch of that fold arrives (`use_fold`: the fold is a column of the plan
rows), so one warm actor serves every fold and top-up round of a stage (t2id.generate.ray_layer).
`__call__` takes a batch of plan rows (all of one fold) and:
  1. renders them, by default in one pipeline call per batch with one `torch.Generator` per image
     seeded with the row's seed (generate.batched_pipeline; off: one call per image, so an image's
     bytes depend only on its seed, not on its batch);
  2. measures the quality gate (t2id.generate.quality) and, when enabled, the CLIP score;
  3. writes the PNG atomically at the row's deterministic key, then a small JSON record of
     its provenance (incl. the PNG's sha256) next to it. The record is the commit point: a
     row counts as done only when its record exists and the PNG's checksum matches it, so a
     killed actor or driver leaves at worst an orphan PNG that the retry overwrites in place;
  4. returns the provenance columns for the driver's manifest.
The class is plain Python: tests call it directly, the stage runs it on Ray actors.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2id import layout
from t2id.generate.quality import measure
from t2id.generate.settings import GenerateSettings
from t2id.store import Store

# generate.scheduler -> diffusers class name (all built with from_config on the model's scheduler config)
SCHEDULER_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}

# Columns __call__ returns (one value per input row); the driver adds the plan columns.
RESULT_COLUMNS = ("key", "sha256", "width", "height", "std", "entropy", "clip_score", "kept", "reject_reason")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def png_bytes(pixels_hwc: np.ndarray) -> bytes:
    """Deterministic PNG encoding (no timestamps or text chunks): same pixels -> same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels_hwc).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def pipeline_negative_prompt(negatives: list[str]) -> list[str] | None:
    """The pipeline's `negative_prompt`: None when every one is empty. SDXL then uses zeroed
    negative embeddings (its `force_zeros_for_empty_prompt` default), as diffusers does when no
    negative prompt is given; encoding the empty string instead gives different images."""
    return None if not any(n.strip() for n in negatives) else negatives


class ImageGenerator:
    """Callable class for `Dataset.map_batches`: plan rows in, PNGs in the store, provenance out.

    It builds itself from the stage settings (re-validated here, on the actor that received them)
    and the fold; the rest says where it runs: the run's store, the local cache, the S3 endpoint of
    weights outside the store, the device its actor was placed on.
    """

    # read by __call__; "fold" picks the adapter
    PLAN_COLUMNS = ("key", "record_key", "params_digest", "prompt", "negative_prompt", "seed", "fold")

    def __init__(self, settings: GenerateSettings, store: Store, fold: int | None, cache_dir: str,
                 endpoint_url: str | None = None, device: str = "cpu", torch_threads: int | None = None) -> None:
        """`fold`: the adapter to load now (None: load it with the first batch, which names its fold)."""
        from t2id.lora.models import load_sdxl_pipeline, speed_up_pipeline

        s = GenerateSettings.model_validate(settings.model_dump())
        if torch_threads:
            torch.set_num_threads(torch_threads)  # one actor per reserved CPU: no oversubscription
        g = s.generate
        self.store = store
        self.device = device
        self.steps, self.guidance, self.width, self.height = g.steps, g.guidance, g.width, g.height
        self.gate = g.quality
        self.batched_pipeline = g.batched_pipeline
        self.use_adapter = s.use_adapter
        self.method = s.method
        self.settings = s
        self.cache = Path(cache_dir).expanduser()
        self.provenance = {"base_model": s.base_model, "lora_sha256": "", "scheduler": g.scheduler}
        self.pipe = load_sdxl_pipeline(s.base_model, self.cache, allow_network=s.allow_network,
                                       torch_dtype=resolve_dtype(g.dtype, device), device=device,
                                       endpoint_url=endpoint_url)
        # What this process did, for the stage's facts and the warm-pool tests: one pipeline load per
        # process, one adapter load per fold switch.
        self.stats = {"pid": os.getpid(), "pipeline_loads": 1, "adapter_loads": 0}
        if g.scheduler != "default":
            import diffusers

            cls = getattr(diffusers, SCHEDULER_CLASSES[g.scheduler])
            self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config)
        speed_up_pipeline(self.pipe, g.channels_last, g.compile)
        self.fold: int | None = None  # the fold whose adapter is fused into the weights now
        self._base_weights: dict[tuple[str, str], torch.Tensor] = {}
        if fold is not None:
            self.use_fold(fold)
        self.clip = None
        if self.gate.min_clip_score is not None:
            from t2id.evaluate.clip_score import ClipScorer

            self.clip = ClipScorer(s.clip_weights, self.cache, device=device, endpoint_url=endpoint_url)

    def use_fold(self, fold: int) -> None:
        """Make the pipeline draw with `fold`'s adapter, fused into the weights (no LoRA detour per forward).

        A switch unfuses and unloads the previous adapter, then copies back the exact base weights it had
        touched: unfusing subtracts the delta in floating point, which would leave the weights a few ulps
        off and make an image depend on which folds its actor served before."""
        if fold == self.fold:
            return
        self.fold = fold
        if not self.use_adapter:
            return
        if self.method == "textual_inversion":
            self._use_embeddings(fold)
            return
        adapter_key = layout.lora.adapter(fold)
        lora_sha256 = self.store.sha256(adapter_key)
        if self._base_weights:
            self.pipe.unfuse_lora()
            self.pipe.unload_lora_weights()
            self._restore_base_weights()
        # The adapter is content-addressed in the local cache, so every actor on a node reuses one copy.
        local_dir = self.cache / "adapters" / lora_sha256[:16]
        local_file = local_dir / layout.lora.adapter_file
        if not local_file.exists():
            self.store.read_file(adapter_key, local_file)
        from diffusers.utils import logging as diffusers_logging

        # The lora stage adapts the UNet only unless lora.train_text_encoder (then the file also holds
        # both encoders' LoRA, loaded here too); without this, a UNet-only adapter makes diffusers log
        # one "no LoRA keys for text_encoder(_2)" line per actor.
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            self.pipe.load_lora_weights(str(local_dir))
        finally:
            diffusers_logging.set_verbosity(level)
        self._save_base_weights()
        self.pipe.fuse_lora()
        self.provenance["lora_sha256"] = lora_sha256
        self.stats["adapter_loads"] += 1

    def _use_embeddings(self, fold: int) -> None:
        """lora.method textual_inversion: the fold's learnt pseudo-words in both text encoders. The first fold
        goes through diffusers' `load_textual_inversion` (the file is its SDXL format: clip_l, clip_g); a later
        fold has the same tokens, so only their embedding rows are overwritten."""
        from safetensors.torch import load_file

        from t2id.lora.textual_inversion import FILE_KEYS, class_rows

        key = self.settings.generator_key(fold)
        sha = self.store.sha256(key)
        local_file = self.cache / "embeddings" / sha[:16] / "learned_embeds.safetensors"
        if not local_file.exists():
            self.store.read_file(key, local_file)
        tokens = json.loads(self.store.read_text(layout.lora.tokens(fold)))["tokens"]
        rows = class_rows(load_file(str(local_file)), tokens)
        pairs = ((self.pipe.tokenizer, self.pipe.text_encoder), (self.pipe.tokenizer_2, self.pipe.text_encoder_2))
        for name, names in tokens.items():
            for file_key, (tokenizer, encoder) in zip(FILE_KEYS, pairs):
                vectors = rows[name][file_key]
                if names[0] not in tokenizer.get_vocab():
                    self.pipe.load_textual_inversion(vectors, token=names[0], tokenizer=tokenizer, text_encoder=encoder)
                else:
                    with torch.no_grad():
                        weight = encoder.get_input_embeddings().weight
                        weight[tokenizer.convert_tokens_to_ids(names)] = vectors.to(weight.device, weight.dtype)
        self.provenance["lora_sha256"] = sha
        self.stats["adapter_loads"] += 1

    def _lora_components(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
                if getattr(self.pipe, name, None) is not None}

    def _save_base_weights(self) -> None:
        """Copies of the base weights of every layer the loaded adapter wraps (on the CPU: they are read
        once per fold switch)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._base_weights = {}
        for component, model in self._lora_components().items():
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    for pname, param in module.get_base_layer().named_parameters(recurse=False):
                        self._base_weights[(component, f"{name}.{pname}")] = param.detach().to("cpu", copy=True)

    @torch.no_grad()
    def _restore_base_weights(self) -> None:
        models = self._lora_components()
        for (component, pname), saved in self._base_weights.items():
            models[component].get_parameter(pname).copy_(saved)
        self._base_weights = {}

    def render(self, prompts: list[str], negative_prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        """uint8 HxWx3 images; one Generator per image, so each image's initial noise comes from its seed.
        Batched (the default): one pipeline call for the batch, which is what keeps a GPU busy; batched
        matmuls round differently (~1e-6 relative), so an image's bytes may depend on the rows it was batched
        with (the same batch gives the same bytes: a retried batch rewrites the same bytes). Unbatched: one
        call per image, bytes depend only on the seed."""
        groups = [list(range(len(seeds)))] if self.batched_pipeline else [[i] for i in range(len(seeds))]
        images: list[np.ndarray] = [None] * len(seeds)  # type: ignore[list-item]
        for group in groups:
            generators = [torch.Generator(self.device).manual_seed(int(seeds[i])) for i in group]
            with torch.inference_mode():
                out = self.pipe(prompt=[prompts[i] for i in group],
                                negative_prompt=pipeline_negative_prompt([negative_prompts[i] for i in group]),
                                num_inference_steps=self.steps, guidance_scale=self.guidance,
                                width=self.width, height=self.height, generator=generators, output_type="np")
            for i, image in zip(group, out.images):
                images[i] = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        folds = {int(f) for f in batch["fold"]} if "fold" in batch else {self.fold}
        if len(folds) != 1 or None in folds:
            raise ValueError(f"a batch holds the rows of exactly one fold, got folds {sorted(map(str, folds))}")
        self.use_fold(folds.pop())
        prompts = [str(p) for p in batch["prompt"]]
        negatives = [str(p) for p in batch["negative_prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        images = self.render(prompts, negatives, seeds)
        clip_scores: list[float | None] = [None] * len(images)
        if self.clip is not None:
            clip_scores = [float(s) for s in self.clip([Image.fromarray(im) for im in images], prompts)]
        out: dict[str, list] = {name: [] for name in RESULT_COLUMNS}
        for i, image in enumerate(images):
            result = measure(image, self.gate, clip_scores[i])
            key, record_key = str(batch["key"][i]), str(batch["record_key"][i])
            sha = self.store.write_bytes(key, png_bytes(image))
            record = {
                "key": key,
                "sha256": sha,
                "params_digest": str(batch["params_digest"][i]),
                "seed": seeds[i],
                "prompt": prompts[i],
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "std": result.std,
                "entropy": result.entropy,
                "clip_score": result.clip_score,
                "kept": result.kept,
                "reject_reason": result.reject_reason,
                **self.provenance,
            }
            # The commit point, after the PNG (which is fsynced). The record needs no fsync of its own: every
            # read verifies it (parsed, params digest, the PNG's checksum; t2id.generate.core), so an OS crash
            # that loses or empties it only has its row drawn again. Saves an fsync per image.
            self.store.write_text(record_key, json.dumps(record, sort_keys=True), durable=False)
            for name in RESULT_COLUMNS:
                out[name].append(record[name])
        return {
            "key": np.array(out["key"], dtype=object),
            "sha256": np.array(out["sha256"], dtype=object),
            "width": np.array(out["width"], dtype=np.int32),
            "height": np.array(out["height"], dtype=np.int32),
            "std": np.array(out["std"], dtype=np.float64),
            "entropy": np.array(out["entropy"], dtype=np.float64),
            "clip_score": np.array([np.nan if s is None else s for s in out["clip_score"]], dtype=np.float64),
            "kept": np.array(out["kept"], dtype=bool),
            "reject_reason": np.array(out["reject_reason"], dtype=object),
        }
