"""Config section of the `grid` stage: fold x strategy detector trainings on Ray Tune."""

from __future__ import annotations

from pydantic import Field

from t2id.configbase import Section
from t2id.detect.config import DetectorConfig


class GridConfig(Section):
    detector: DetectorConfig = DetectorConfig()
    strategies: list[str] = Field(
        default_factory=lambda: ["baseline", "mosaic_mixup", "rfs", "cas", "baseline_sdxl", "rfs_sdxl",
                                 "t2id_cas", "class_weights"],
        description="Strategy presets to train per fold (the paper's seven plus class_weights).",
    )
