"""Config section of the `report` stage."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from t2id.configbase import Section


class ReportConfig(Section):
    title: str = Field("T2ID-CAS report", description="Report title.")
    metric: Literal["map50_95", "map50", "precision", "recall", "f1", "auc"] = Field(
        "map50_95", description="Metric of the Table II layout and the tests (paper: mAP50-95). run.task classify: "
                                "recall, f1, auc or precision per class; a detection metric there means recall.",
    )
    baseline: str = Field("baseline", description="Strategy every other strategy is compared with (paired by fold).")
    alpha: float = Field(
        0.05, gt=0, lt=1, description="Significance level: a difference to the baseline is marked only where the "
        "exact sign-flip test over (fold, seed) differences (seeds of a fold flip together) gives p <= alpha.",
    )
    bootstrap_samples: int = Field(
        1000, gt=0, description="Resamples of the image-level paired bootstrap (validation images resampled within "
        "each fold, pairs kept) that gives the interval of the difference to the baseline.",
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="Confidence level of the image-level bootstrap intervals.")
    seed: int | None = Field(None, ge=0, description="Bootstrap seed (default: run.seed).")
    rare_classes: list[str] | None = Field(
        None, description="Classes whose PR curves are plotted (paper Fig. 4). Default: lora.target_classes "
        "present in the data, else the two classes with the fewest instances.",
    )
    samples_per_class: int = Field(
        4, ge=1, le=16, description="Real and synthetic images per rare class in the Fig. 3 sheet."
    )

    @model_validator(mode="after")
    def _check(self) -> ReportConfig:
        if self.rare_classes is not None and not self.rare_classes:
            raise ValueError("report.rare_classes is empty; list class names or omit it")
        return self
