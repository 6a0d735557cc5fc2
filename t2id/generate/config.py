"""Config section of the `generate` stage."""

from __future__ import annotations

from pydantic import Field

from t2id.configbase import Section


class QualityGate(Section):
    min_std: float = Field(30.0, ge=0, description="Keep only if pixel std (0-255 grey levels) > this.")
    min_entropy: float = Field(4.7, ge=0, description="Keep only if grey-level entropy (bits) > this.")


class GenerateConfig(Section):
    images_per_class: int = Field(300, gt=0, description="Kept images per fold and class (paper: 300).")
    width: int = Field(512, ge=32, description="Image width (paper: 512).")
    height: int = Field(512, ge=32, description="Image height (paper: 512).")
    guidance: float = Field(7.5, ge=0, description="Classifier-free guidance scale (paper: 7.5).")
    steps: int = Field(30, gt=0, description="Denoising steps.")
    negative_prompt: str = Field("", description="Negative prompt.")
    quality: QualityGate = QualityGate()
