"""Config section of the `lora` stage (SDXL LoRA fine-tuning, paper Sec. III-B)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from t2id.configbase import Section


class TargetClass(Section):
    name: str = Field(description="Class name as in the dataset.")
    prompts: list[str] = Field(min_length=1, description="Training/generation prompts for this class.")


class LoraConfig(Section):
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
    train_text_encoder: bool = Field(False, description="Also put LoRA on both text encoders.")
    resolution: int = Field(512, ge=32, description="Training resolution (square).")
    epochs: int = Field(100, gt=0, description="Epochs (paper: 100).")
    batch_size: int = Field(16, gt=0, description="Global batch size (paper: 16).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (paper: 1e-4).")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("fp16", description="Compute dtype (paper: fp16).")
    hflip: bool = Field(True, description="Random horizontal flip (paper: yes).")
    num_workers: int = Field(1, gt=0, description="Ray Train workers (one per GPU on a cluster).")
    use_gpu: bool = Field(False, description="Run Ray Train workers on GPUs.")
