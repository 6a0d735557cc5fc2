"""Fine-tune recipes of the `lora` stage besides plain LoRA (`lora.method`), and how each one prompts.

  lora               the paper's recipe (T2ID-CAS Sec. III-B): LoRA on the UNet, the class prompts as given.
  dreambooth_lora    DreamBooth (Ruiz et al. 2023, arXiv 2208.12242) with LoRA, as in the skin-lesion slides
                     and the MEDVQA-GI study (papers/skin-ldm-augmentation-slides.txt,
                     papers/medvqa-gi-2024-sd-dreambooth-lora.txt): the instance prompt names the class with a
                     rare identifier token ("a [V] [class noun]", Sec. 4.1), and class-prior images drawn by
                     the frozen base model from the plain class prompt keep the class's prior alive: loss =
                     instance MSE + lambda x prior MSE (Sec. 4.3, eq. 2; lambda = 1 in the paper).
  textual_inversion  Textual inversion (Gal et al. 2022, arXiv 2208.01618), as in the lung-ultrasound study
                     (papers/lung-ultrasound-textual-inversion-ddpm.txt, Sec. 4.3: token
                     '<viral-pneumonia-ultrasound>' in "A <token> ultrasound image"): one new pseudo-word per
                     class, its embedding learnt in BOTH SDXL text encoders; UNet, VAE and every other
                     embedding stay frozen, no LoRA.
  layout_lora        Layout-conditioned LoRA (GeoDiffusion, Chen et al. 2023, arXiv 2306.04607): each image's
                     boxes of its class as location tokens in its prompt (t2id.lora.location), learnt by the
                     same LoRA fine-tune with text-encoder LoRA; generation asks for boxes, and the image
                     comes with them (no teacher).
  ddpm               An unconditional DDPM (Ho et al. 2020, arXiv 2006.11239) trained from scratch per fold and
                     class, as in the lung-ultrasound study (papers/lung-ultrasound-textual-inversion-ddpm.txt,
                     Sec. 3.4 and 4.4: diffusers' unconditional pipeline, a UNet2DModel + DDPM noise scheduler);
                     no base model, no text: a row's prompt is its class name (t2id.lora.ddpm).

The prompt rule is shared by training (t2id.lora.stage) and generation (t2id.generate.plan), so the
generator is always prompted the way it was trained: the class name in a class prompt is replaced by
its method phrase ("sks tracheal ring" for DreamBooth, "<tracheal-ring>" for textual inversion);
a prompt that does not name its class gets the phrase appended.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from t2id import layout
from t2id.configbase import Section

Method = Literal["lora", "dreambooth_lora", "textual_inversion", "layout_lora", "ddpm"]
METHODS: tuple[str, ...] = ("lora", "dreambooth_lora", "textual_inversion", "layout_lora", "ddpm")

# Where the class-prior images' seeds come from: a namespace of their own (t2id.generate.plan.plan_rows),
# so they never repeat an image the generate stage draws from the same base model.
PRIOR_SEED_NAMESPACE = "lora-dreambooth-prior/"


class DreamBoothConfig(Section):
    """lora.dreambooth: DreamBooth with LoRA and prior preservation (Ruiz et al. 2023, arXiv 2208.12242)."""

    identifier: str = Field(
        "sks",
        description="Rare token naming the subject in the instance prompt, 'a [V] [class noun]' (Sec. 4.1: "
        "a rare token with a weak prior; 'sks' is diffusers' DreamBooth example). One word, no spaces.",
    )
    prior_images_per_class: int = Field(
        100, ge=1,
        description="Class-prior images per target class and fold, drawn by the base model from the class "
        "prompt (the paper generates ~1000 per class, Sec. 4.3; 100 is diffusers' train_dreambooth_lora "
        "default num_class_images).",
    )
    prior_loss_weight: float = Field(
        1.0, ge=0, description="lambda of the prior-preservation loss (paper eq. 2; lambda = 1, Sec. 4.3)."
    )
    prior_prompt: str | None = Field(
        None,
        description="Prompt of the class-prior images, '{name}' standing for the class name; null = each "
        "class's own prompts without the identifier (the paper's 'a [class noun]').",
    )
    prior_steps: int = Field(
        50, gt=0, description="Denoising steps of the prior images (the paper samples them with 50 steps)."
    )
    prior_guidance: float = Field(7.5, ge=0, description="CFG scale of the prior images (T2ID-CAS's 7.5).")

    @field_validator("identifier")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value):
            raise ValueError(f"lora.dreambooth.identifier {value!r} must be one word (a rare token), e.g. 'sks'")
        return value


class TextualInversionConfig(Section):
    """lora.textual_inversion: one learnt pseudo-word per class (Gal et al. 2022, arXiv 2208.01618)."""

    token: str = Field(
        "<{slug}>",
        description="The pseudo-word of a class, '{slug}' standing for its folder name (e.g. '<tracheal-ring>'; "
        "the lung-ultrasound study used '<viral-pneumonia-ultrasound>').",
    )
    init_word: str = Field(
        "ultrasound",
        description="A one-token coarse descriptor whose embedding initializes the new ones (Gal et al. Sec. 4: "
        "'a single-word coarse descriptor of the object'); 'ultrasound' as in the study's prompts.",
    )
    vectors: int = Field(1, ge=1, le=8, description="Embedding vectors per pseudo-word (the paper: 1).")
    lr: float = Field(5e-3, gt=0, description="Learning rate of the embeddings (Gal et al.: base lr 0.005).")

    @field_validator("token")
    @classmethod
    def _has_slug(cls, value: str) -> str:
        if "{slug}" not in value or any(c.isspace() for c in value):
            raise ValueError(f"lora.textual_inversion.token {value!r} must hold '{{slug}}' (one token per "
                             "class) and no spaces, e.g. '<{slug}>'")
        return value


class LayoutConfig(Section):
    """lora.layout: boxes as location tokens in the prompt (GeoDiffusion, arXiv 2306.04607, Sec. 3.1)."""

    bins: int = Field(
        16, ge=2, le=100,
        description="Location bins per image side: a box corner is written as its bin index (GeoDiffusion's "
        "discretized location tokens; coarser than theirs, so 4 boxes fit CLIP's 77 tokens).",
    )
    max_boxes: int = Field(
        4, ge=1, le=8, description="Boxes of the prompted class per prompt (the largest); CLIP reads 77 tokens."
    )
    fidelity_iou: float = Field(
        0.5, gt=0, le=1,
        description="Layout fidelity: a requested box counts as drawn when the real-data teacher detects its "
        "class with IoU >= this (the detection-metric convention of mAP50).",
    )


class DdpmConfig(Section):
    """lora.ddpm: an unconditional DDPM per class, from scratch (the lung-ultrasound study, Sec. 3.4 and 4.4).

    The study trained diffusers' unconditional image generation example (examples/unconditional_image_generation/
    train_unconditional.py); its defaults are this section's unless the study says otherwise. The lora
    section's num_workers, use_gpu, cpus_per_worker, seed, folds, checkpoint_every_steps, keep_checkpoints and
    max_failures apply; its SDXL/LoRA settings (base_model, rank, alpha, prompts, ...) do not."""

    resolution: int = Field(
        64, ge=8, description="Image side in pixels, training and sampling (diffusers' example: --resolution 64).")
    block_out_channels: tuple[int, ...] = Field(
        (128, 128, 256, 256, 512, 512), min_length=1,
        description="UNet2DModel channels per resolution level (diffusers' example); self-attention at the "
        "second-lowest level as there. Smaller = faster (the tests use (8, 16)).",
    )
    layers_per_block: int = Field(2, ge=1, description="ResNet layers per UNet block (diffusers' example: 2).")
    train_timesteps: int = Field(1000, ge=2, description="Diffusion steps T of training (Ho et al. 2020: 1000).")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = Field(
        "linear", description="Noise schedule: 'linear' = Ho et al.'s betas 1e-4..0.02 (diffusers' example), "
        "'squaredcos_cap_v2' = Nichol & Dhariwal's cosine schedule.",
    )
    epochs: int = Field(500, gt=0, description="Epochs (the study: 500 on three images, Sec. 4.4.1; 3000 on 52).")
    batch_size: int = Field(
        16, gt=0, description="Global batch per optimizer step, shrunk to the class's images when fewer "
        "(diffusers' example: --train_batch_size 16).",
    )
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps (diffusers' example: 1).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (diffusers' example: 1e-4).")
    weight_decay: float = Field(1e-6, ge=0, description="AdamW weight decay (diffusers' example: 1e-6).")
    adam_betas: tuple[float, float] = Field((0.95, 0.999), description="AdamW betas (diffusers' example).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="LR schedule after warmup (diffusers' example: cosine).")
    warmup_steps: int = Field(500, ge=0, description="Linear LR warmup steps (diffusers' example: 500).")
    hflip: bool = Field(
        True, description="Random horizontal flip (diffusers' example; the study's samples include flipped "
        "copies, Sec. 4.4.1).")
    ema: bool = Field(
        True, description="Sample from an exponential moving average of the weights (diffusers' example: --use_ema "
        "on, with the warmup decay 1 - (1 + step / inv_gamma)^-power, capped at ema_max_decay).",
    )
    ema_max_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay cap (diffusers' example: 0.9999).")
    ema_inv_gamma: float = Field(1.0, gt=0, description="EMA warmup inverse gamma (diffusers' example: 1.0).")
    ema_power: float = Field(0.75, gt=0, description="EMA warmup power (diffusers' example: 3/4).")
    grayscale: bool = Field(
        True, description="One grey channel (ultrasound); images are written as grey RGB PNGs. false: RGB.")
    inference_steps: int = Field(
        1000, gt=0, description="Sampling steps: 1000 = DDPM's ancestral sampling over every training step, as "
        "the study samples; fewer skip steps (diffusers' DDPMScheduler 'leading' spacing), faster but worse.",
    )

    @field_validator("block_out_channels")
    @classmethod
    def _group_norm_fits(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 8 or c % 8 for c in value):  # GroupNorm groups and 8-channel attention heads divide them
            raise ValueError(f"lora.ddpm.block_out_channels {list(value)}: every level needs a positive multiple "
                             "of 8 channels (GroupNorm groups), e.g. [32, 64, 128]")
        return value

    @model_validator(mode="after")
    def _resolution_halves(self) -> DdpmConfig:
        factor = 2 ** (len(self.block_out_channels) - 1)  # each level but the last halves the image
        if self.resolution % factor:
            raise ValueError(f"lora.ddpm.resolution {self.resolution} must be a multiple of {factor} (2 to the "
                             f"power of the {len(self.block_out_channels) - 1} downsamplings of block_out_channels)")
        return self


def class_phrase(method: str, class_name: str, dreambooth: DreamBoothConfig | None,
                 textual_inversion: TextualInversionConfig | None) -> str:
    """How a prompt names the class under `method`: the class name, 'sks <name>' or '<name-slug>'."""
    if method == "dreambooth_lora":
        assert dreambooth is not None
        return f"{dreambooth.identifier} {class_name}"
    if method == "textual_inversion":
        assert textual_inversion is not None
        return ti_token(textual_inversion, class_name)
    return class_name


def ti_token(ti: TextualInversionConfig, class_name: str) -> str:
    return ti.token.replace("{slug}", layout.slug(class_name))


def method_prompt(prompt: str, class_name: str, method: str, dreambooth: DreamBoothConfig | None = None,
                  textual_inversion: TextualInversionConfig | None = None) -> str:
    """A class prompt as `method` trains and draws it (module doc): the last mention of the class name
    replaced by its phrase, or the phrase appended when the prompt does not name the class."""
    if method == "ddpm":  # unconditional: no text goes in; the class name stands for the prompt
        return class_name
    phrase = class_phrase(method, class_name, dreambooth, textual_inversion)
    if phrase == class_name:
        return prompt
    at = prompt.lower().rfind(class_name.lower())
    if at < 0:
        return f"{prompt}, {phrase}"
    return prompt[:at] + phrase + prompt[at + len(class_name):]


def method_tokens(class_name: str, method: str, dreambooth: DreamBoothConfig | None = None,
                  textual_inversion: TextualInversionConfig | None = None) -> str | None:
    """The tokens a method adds for a class (provenance): the identifier, the learnt token, or None."""
    if method == "dreambooth_lora":
        assert dreambooth is not None
        return dreambooth.identifier
    if method == "textual_inversion":
        assert textual_inversion is not None
        return ti_token(textual_inversion, class_name)
    return None


def prior_prompts(dreambooth: DreamBoothConfig, class_name: str, prompts: list[str]) -> list[str]:
    """The class-prior prompts of a class: lora.dreambooth.prior_prompt, else the class prompts as given."""
    if dreambooth.prior_prompt is not None:
        return [dreambooth.prior_prompt.replace("{name}", class_name)]
    return list(prompts)
