"""Config section of the `evaluate` stage."""

from __future__ import annotations

from pydantic import Field

from t2id.configbase import Section


class EvaluateConfig(Section):
    inception_weights: str = Field("tiny", description="FID InceptionV3 weights: 'tiny', a local file or s3:// URI.")
    clip_weights: str = Field("tiny", description="CLIP weights for CLIP score: 'tiny', a local dir or s3:// URI.")
