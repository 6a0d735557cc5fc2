"""Config section of the `label` stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from t2id.configbase import Section


class LabelConfig(Section):
    method: Literal["teacher", "inpaint"] = Field("teacher", description="How synthetic images get boxes.")
    min_confidence: float = Field(0.25, ge=0, le=1, description="Teacher boxes below this are dropped.")
