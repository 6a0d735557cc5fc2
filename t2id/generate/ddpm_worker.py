"""lora.method ddpm in the generate stage: `DdpmGenerator`, generate's callable class drawing with the fold's
per-class unconditional DDPMs (t2id.lora.ddpm) instead of SDXL.

Same plan rows, seeds, keys, exactly-once records, quality gate and warm actor pool as every other method
(t2id.generate.core, t2id.generate.ray_layer); only the pixels come from elsewhere:
  - `use_fold` reads the fold's ddpm/models.json and loads each class's UNet2DModel + DDPMScheduler
    (content-addressed in the local cache by the weights' sha256, so actors on a node share one copy);
  - `render` samples with diffusers' DDPMPipeline (ancestral sampling, Ho et al. 2020 Alg. 2) over
    lora.ddpm.inference_steps, one torch.Generator per image seeded with the row's seed (its initial
    noise and every step's noise), the rows of one class in one call (generate.batched_pipeline) or one
    call per image (then an image's bytes depend only on its seed);
  - images are lora.ddpm.resolution square, a grey model's single channel written as grey RGB PNGs.
There is no text: a row's prompt is its class name, which picks the model. The quality gate is generate's
(generate.quality, the lung-ultrasound study's std > 30 and entropy > 4.7, eq. 4-5), on the 8-bit grey image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from t2id import layout
from t2id.generate.settings import GenerateSettings
from t2id.generate.worker import ImageGenerator
from t2id.store import Store


class DdpmGenerator(ImageGenerator):
    """generate's ImageGenerator with per-class DDPMs in place of the SDXL pipeline (module doc)."""

    PLAN_COLUMNS = (*ImageGenerator.PLAN_COLUMNS, "class_name")

    def __init__(self, settings: GenerateSettings, store: Store, fold: int | None, cache_dir: str,
                 endpoint_url: str | None = None, device: str = "cpu", torch_threads: int | None = None) -> None:
        # Not ImageGenerator.__init__: it loads an SDXL pipeline, which ddpm has none of.
        s = GenerateSettings.model_validate(settings.model_dump())
        if s.ddpm is None or not s.use_adapter:
            raise ValueError("DdpmGenerator needs generate settings of lora.method ddpm with the lora stage on")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        g = s.generate
        self.settings, self.store, self.device = s, store, device
        self.method, self.use_adapter = s.method, s.use_adapter
        self.steps, self.width, self.height = s.ddpm.inference_steps, s.ddpm.resolution, s.ddpm.resolution
        self.gate = g.quality
        self.batched_pipeline = g.batched_pipeline
        self.cache = Path(cache_dir).expanduser()
        self.provenance = {"base_model": s.base_model, "lora_sha256": "", "scheduler": "ddpm"}
        self.stats = {"pid": os.getpid(), "pipeline_loads": 0, "adapter_loads": 0}  # adapter = a fold's models
        self.pipes: dict[str, object] = {}  # class name -> DDPMPipeline of the current fold
        self.fold: int | None = None
        self._classes: list[str] = []
        self.clip = None
        if self.gate.min_clip_score is not None:  # the class name as the text, if the user asks for it
            from t2id.evaluate.clip_score import ClipScorer

            self.clip = ClipScorer(s.clip_weights, self.cache, device=device, endpoint_url=endpoint_url)
        if fold is not None:
            self.use_fold(fold)

    def use_fold(self, fold: int) -> None:
        """Load the fold's class models (ddpm/models.json); the index's sha256 is the fold's generator digest."""
        if fold == self.fold:
            return
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

        key = self.settings.generator_key(fold)
        models = json.loads(self.store.read_text(key))["classes"]
        self.pipes = {}
        for name, model in models.items():
            local = self.cache / "ddpm" / model["weights_sha256"][:16]
            for file in layout.lora.ddpm_files:
                if not (local / file).exists():
                    self.store.read_file(f"{model['dir']}/{file}", local / file)
            unet = UNet2DModel.from_pretrained(str(local)).to(self.device).eval()
            pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_pretrained(str(local)))
            pipe.set_progress_bar_config(disable=True)
            self.pipes[name] = pipe
            self.stats["pipeline_loads"] += 1
        self.fold = fold
        self.provenance["lora_sha256"] = self.store.sha256(key)
        self.stats["adapter_loads"] += 1

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._classes = [str(c) for c in batch["class_name"]]  # render() sees prompts and seeds only
        return super().__call__(batch)

    def render(self, prompts: list[str], negative_prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        """uint8 HxWx3 images of the batch's rows, each from its class's DDPM and its own seed."""
        classes = self._classes or list(prompts)  # a row's prompt is its class name
        missing = sorted({c for c in classes if c not in self.pipes})
        if missing:
            raise ValueError(f"fold {self.fold} has no DDPM of class(es) {missing}; rerun the lora stage")
        if self.batched_pipeline:
            groups = [[i for i, c in enumerate(classes) if c == name] for name in dict.fromkeys(classes)]
        else:
            groups = [[i] for i in range(len(seeds))]
        images: list[np.ndarray] = [None] * len(seeds)  # type: ignore[list-item]
        for group in groups:
            generators = [torch.Generator(self.device).manual_seed(int(seeds[i])) for i in group]
            with torch.inference_mode():
                out = self.pipes[classes[group[0]]](batch_size=len(group), generator=generators,
                                                    num_inference_steps=self.steps, output_type="np")
            for i, image in zip(group, out.images):
                pixels = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
                images[i] = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
        return images
