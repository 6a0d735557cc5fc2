"""Config section of the `lora` stage (SDXL LoRA fine-tuning, paper Sec. III-B).

Paper preset: SDXL 1.0, LoRA on the UNet, lr 1e-4, batch 16, 100 epochs, fp16, random h-flip,
trained on the rare-class images (tracheal ring, vocal fold). t2id trains one adapter per fold
on that fold's TRAIN images only, so a generator never sees the images it is evaluated on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from t2id.configbase import Section
from t2id.lora.methods import DdpmConfig, DreamBoothConfig, LayoutConfig, Method, TextualInversionConfig


class TargetClass(Section):
    name: str = Field(description="Class name as in the dataset.")
    prompts: list[str] = Field(min_length=1, description="Training/generation prompts for this class.")


# lora.method -> its settings sub-section (t2id.lora.methods): only the chosen method's is filled.
METHOD_SECTIONS = {"dreambooth_lora": "dreambooth", "textual_inversion": "textual_inversion",
                   "layout_lora": "layout", "ddpm": "ddpm"}
SECTION_TYPES = {"dreambooth": DreamBoothConfig, "textual_inversion": TextualInversionConfig, "layout": LayoutConfig,
                 "ddpm": DdpmConfig}


class LoraConfig(Section):
    method: Method = Field(
        "lora",
        description="Fine-tune recipe, per fold on its TRAIN images: 'lora' (the paper's), 'dreambooth_lora' "
        "(identifier token + class-prior loss; lora.dreambooth), 'textual_inversion' (one learnt token per "
        "class in both text encoders, base model frozen; lora.textual_inversion), 'layout_lora' (boxes as "
        "location tokens in the prompt, text-encoder LoRA on; lora.layout), 'ddpm' (an unconditional DDPM per class "
        "from scratch, no base model; lora.ddpm). See docs/generators.md.",
    )
    dreambooth: DreamBoothConfig | None = Field(
        None, description="Settings of method dreambooth_lora (defaults filled when it is chosen)."
    )
    textual_inversion: TextualInversionConfig | None = Field(
        None, description="Settings of method textual_inversion (defaults filled when it is chosen)."
    )
    layout: LayoutConfig | None = Field(
        None, description="Settings of method layout_lora (defaults filled when it is chosen)."
    )
    ddpm: DdpmConfig | None = Field(
        None, description="Settings of method ddpm (defaults filled when it is chosen)."
    )
    base_model: str = Field(
        "tiny",
        description="SDXL weights: 'tiny' (random tiny model built from configs), a local dir, an s3:// prefix, "
        "or a hub id (needs allow_network).",
    )
    allow_network: bool = Field(False, description="Allow downloading a hub id; off by default.")
    target_classes: list[TargetClass] = Field(
        default_factory=lambda: [
            TargetClass(name="tracheal ring",
                        prompts=["High-resolution ultrasound scan of the human tracheal ring"]),
            TargetClass(name="vocal fold",
                        prompts=["High-resolution ultrasound scan of the human vocal fold"]),
        ],
        description="Rare classes to fine-tune on and generate (paper: tracheal ring, vocal fold).",
    )
    rank: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1,
        description="UNet attention projections that get LoRA (diffusers' SDXL LoRA recipe).",
    )
    train_text_encoder: bool = Field(
        False,
        description="Also put LoRA (same rank/alpha/dropout, on q_proj, k_proj, v_proj, out_proj) on both text "
        "encoders and train it with the UNet's; prompts are then encoded every step instead of cached. Off by "
        "default: the paper adapts the UNet only.",
    )
    resolution: int = Field(512, ge=32, description="Training resolution (square; resize shorter side + centre crop).")
    epochs: int = Field(100, gt=0, description="Epochs (paper: 100).")
    batch_size: int = Field(
        16, gt=0, description="Global batch per optimizer step, over all workers and accumulation steps (paper: 16)."
    )
    grad_accum: int = Field(
        1, ge=1, description="Gradient accumulation steps: per-worker micro-batch = batch_size / (workers x this)."
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (paper: 1e-4).")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (diffusers' default 1e-2).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the LoRA gradient norm (null = no clipping).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="LR schedule after warmup (diffusers' scripts default: constant)."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear LR warmup, in optimizer steps.")
    min_snr_gamma: float | None = Field(
        None, gt=0,
        description="Min-SNR loss weighting gamma (Hang et al. 2023, arXiv 2303.09556 Sec. 3.4; 5.0 is their "
        "recommendation); null = plain MSE, as the paper's recipe.",
    )
    noise_offset: float = Field(
        0.0, ge=0, description="Noise offset (adds offset x N(0,1) per image and channel to the noise); 0 = off."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "fp16",
        description="Training dtype (paper: fp16): the frozen UNet in this dtype under autocast; LoRA weights "
        "and optimizer state stay fp32. On CPU, fp16 runs in fp32 (CPU has no fast fp16), bf16 in bf16.",
    )
    vae_fp32: bool = Field(
        True, description="Keep the VAE in fp32 when encoding (SDXL 1.0's VAE overflows in fp16)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute UNet activations in backward to save memory.")
    channels_last: bool = Field(
        False,
        description="UNet weights in channels-last memory format: cuDNN's tensor-core convolutions run NHWC "
        "without transposes (PyTorch's channels_last guide; diffusers' SDXL speed-up notes). Same maths, a "
        "different summation order.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet's forward in place (nn.Module.compile). The first steps pay the "
        "compilation (minutes for SDXL); worth it for long runs on a GPU. Checked by bench/bench_gpu.py "
        "--compile.",
    )
    hflip: bool = Field(True, description="Random horizontal flip (paper: yes).")
    seed: int | None = Field(
        None, ge=0,
        description="Training seed (data order, flips, noise, timesteps); default derives from run.seed and "
        "the fold, so folds differ and reruns repeat.",
    )
    checkpoint_every_steps: int = Field(
        200, gt=0, description="Write a resumable checkpoint (LoRA, optimizer, scheduler, step) every K steps."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints Ray Train keeps in the store.")
    max_failures: int = Field(
        2, ge=0, description="Worker-group restarts after a worker dies; training resumes from the last checkpoint."
    )
    validation_images: int = Field(
        2, ge=0, description="Validation images per target class written after each epoch (0 = none)."
    )
    validation_every_epochs: int = Field(
        1, ge=1, description="Write validation images every N epochs (and after the last one)."
    )
    validation_steps: int = Field(20, gt=0, description="Denoising steps of validation images.")
    folds: list[int] | None = Field(None, description="Folds to train (default: every fold of split/folds.parquet).")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on a cluster).")
    use_gpu: bool = Field(False, description="Run Ray Train workers on GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray Train worker.")

    @model_validator(mode="before")
    @classmethod
    def _fill_method_section(cls, data):
        # The chosen method's sub-section gets its defaults; the others stay null, so that they enter no
        # settings hash (a settings dump holds the chosen recipe's values only).
        if isinstance(data, dict):
            section = METHOD_SECTIONS.get(data.get("method", "lora"))
            if section and data.get(section) is None:  # an instance, not {}: assignments skip field validation
                data = {**data, section: SECTION_TYPES[section]()}
            if data.get("method") == "layout_lora" and "train_text_encoder" not in data:
                data = {**data, "train_text_encoder": True}  # GeoDiffusion tunes the text encoder too
        return data

    @model_validator(mode="after")
    def _one_method_section(self) -> LoraConfig:
        for method, section in METHOD_SECTIONS.items():
            if getattr(self, section) is not None and self.method != method:
                raise ValueError(f"lora.{section} is set but lora.method is {self.method!r}; set lora.method: "
                                 f"{method}, or remove lora.{section}")
        return self

    @field_validator("train_text_encoder")
    @classmethod
    def _peft_can_do_text_encoder_lora(cls, value: bool) -> bool:
        # Fail at config validation, not minutes later inside a Ray worker (t2id/compat.py).
        if value:
            from t2id.compat import text_encoder_lora_problem

            problem = text_encoder_lora_problem()
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _batch_splits(self) -> LoraConfig:
        if self.ddpm is not None and self.ddpm.batch_size % (self.num_workers * self.ddpm.grad_accum):
            raise ValueError(
                f"lora.ddpm.batch_size ({self.ddpm.batch_size}) must be a multiple of lora.num_workers x "
                f"lora.ddpm.grad_accum ({self.num_workers} x {self.ddpm.grad_accum}); change one of them")
        shards = self.num_workers * self.grad_accum
        if self.batch_size % shards and self.method != "ddpm":  # ddpm batches by lora.ddpm.batch_size
            raise ValueError(
                f"lora.batch_size ({self.batch_size}) must be a multiple of lora.num_workers x lora.grad_accum "
                f"({self.num_workers} x {self.grad_accum} = {shards}); change one of them")
        names = [c.name for c in self.target_classes]
        if len(set(names)) != len(names):
            raise ValueError(f"lora.target_classes names must be unique, got {names}")
        if not self.target_classes:
            raise ValueError("lora.target_classes is empty; list at least one class with its prompts")
        return self
