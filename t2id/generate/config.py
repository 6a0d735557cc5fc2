"""Config section of the `generate` stage (paper Sec. III-B: 300 images per class, 512x512, CFG 7.5).

Prompts are not repeated here: each target class of `lora.target_classes` is generated with
that class's prompts (several prompts are used round-robin over the image index), so the
generator is always prompted the way its adapter was trained.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from t2id.configbase import Section

# Names accepted by `generate.scheduler`; t2id.generate.worker maps them to diffusers classes.
SCHEDULERS = ("euler", "euler_ancestral", "ddim", "dpmpp_2m", "pndm", "lms", "default")


class QualityGate(Section):
    """Per-image gate of the lung-ultrasound study (papers/lung-ultrasound-textual-inversion-ddpm.txt,
    eq. 4-5 and Fig. 10): keep a sample only if pixel std > 30 AND entropy > 4.7.

    Units: std over the 8-bit grey image (0-255 levels); entropy is the Shannon entropy of the
    256-bin grey-level histogram in bits (log2), as in the study's eq. 5."""

    min_std: float = Field(30.0, ge=0, description="Keep only if pixel std (8-bit grey levels, 0-255) > this.")
    min_entropy: float = Field(
        4.7, ge=0, le=8, description="Keep only if grey-level Shannon entropy (bits, 256 bins, max 8) > this."
    )
    min_clip_score: float | None = Field(
        None,
        description="Optional CLIP-score gate: keep only if CLIP score (100 x cosine, evaluate.clip_weights) "
        ">= this. Off (null) by default; the lung-ultrasound study has no such gate.",
    )


class GenerateConfig(Section):
    images_per_class: int = Field(300, gt=0, description="Kept images per fold and class (paper: 300).")
    width: int = Field(512, ge=32, description="Image width in pixels, a multiple of 8 (paper: 512).")
    height: int = Field(512, ge=32, description="Image height in pixels, a multiple of 8 (paper: 512).")
    guidance: float = Field(7.5, ge=0, description="Classifier-free guidance scale (paper: 7.5).")
    steps: int = Field(30, gt=0, description="Denoising steps.")
    scheduler: Literal[SCHEDULERS] = Field(  # type: ignore[valid-type]
        "euler",
        description="Sampler: euler (SDXL's default), euler_ancestral, ddim, dpmpp_2m, pndm, lms, or 'default' "
        "(whatever the base model's scheduler config says).",
    )
    negative_prompt: str = Field("", description="Negative prompt (the paper does not give one).")
    quality: QualityGate = QualityGate()
    folds: list[int] | None = Field(
        None, description="Folds to generate for (default: every fold of split/folds.parquet)."
    )
    batch_size: int = Field(4, gt=0, description="Plan rows per Ray Data batch (the unit of work and retry).")
    batched_pipeline: bool = Field(
        True,
        description="One pipeline call per batch (one torch.Generator per image, so each image's noise comes "
        "from its seed): what keeps a GPU busy (12x the images/s of one call per image on an H200). Batched "
        "matmuls round differently (~1e-6), so a pixel may change by one grey level with the batch composition; "
        "false: one call per image, and an image's bytes depend only on its seed.",
    )
    channels_last: bool = Field(
        False,
        description="UNet and VAE in channels-last memory format (faster tensor-core convolutions on a GPU; "
        "a different summation order, so bytes may differ from the default by a grey level).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet's forward in place on each actor (compiled once per actor and "
        "adapter swap; worth it for thousands of images on a GPU). Checked by bench/bench_gpu.py --compile.",
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="Generation actors. Default: the cluster's GPU count (one GPU each); without GPUs, "
        "CPU actors = cluster CPUs // cpus_per_actor.",
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per generation actor.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device of the actors: auto = cuda when the cluster has GPUs, else cpu."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Pipeline dtype: auto = float16 on cuda (paper: fp16), float32 on cpu."
    )
    max_attempts_factor: float = Field(
        2.0,
        ge=1,
        description="Top-up bound: at most ceil(factor x images_per_class) attempts per class; a class that "
        "still lacks kept images is reported as a shortfall.",
    )
    max_restarts: int = Field(
        3, ge=0, description="Restarts of a crashed generation actor (Ray); its unfinished batches are retried."
    )
    contact_sheet_images: int = Field(
        8, ge=1, description="Images per side of a contact sheet (real vs synthetic, like the paper's Fig. 3)."
    )
    contact_sheet_thumb: int = Field(128, ge=16, description="Thumbnail side in pixels on contact sheets.")

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise ValueError(
                    f"generate.{name}={getattr(self, name)} is not a multiple of 8 (the SDXL VAE downsamples by 8); "
                    f"use e.g. {getattr(self, name) // 8 * 8 or 8}"
                )
        if self.folds is not None and len(set(self.folds)) != len(self.folds):
            raise ValueError(f"generate.folds={self.folds} lists a fold twice; list each fold once")
        return self
