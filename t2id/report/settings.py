"""What the `report` stage takes from the config, from any section, and nothing else.

Everything the report prints about the run's configuration is named here, so a change to any of it
(and to nothing else) re-renders the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import model_validator

from t2id.configbase import StageSettings
from t2id.report.config import ReportConfig

if TYPE_CHECKING:
    from t2id.config import T2IDConfig


class DetectorSummary(StageSettings):
    """The detector as the report describes it (grid.detector)."""

    model: str
    imgsz: int
    epochs: int
    batch: int


class ClassifierSummary(StageSettings):
    """The classifier as the report describes it (grid.classifier; run.task classify)."""

    model: str
    weights: str | None
    imgsz: int
    epochs: int
    batch: int


class ReportSettings(StageSettings):
    report: ReportConfig
    run_id: str  # run.id
    description: str  # run.description
    run_seed: int | None  # run.seed, only when report.seed is unset (the bootstrap seed)
    target_classes: list[str]  # lora.target_classes names: the default rare classes, and Fig. 3's contact sheets
    strategies: list[str]  # grid.strategies: the column order of the tables
    detector: DetectorSummary  # grid.detector
    label_method: str | None  # label.method when label in run.stages: how synthetic images got their boxes
    memorization_threshold: float | None  # label.memorization.threshold when label in run.stages
    task: str = "detect"  # run.task: the detection report, or the classification report (t2id.classify.report)
    classifier: ClassifierSummary | None = None  # grid.classifier, only when run.task is classify
    # grid strategies with synthetic images -> their synthetic_from (None: this run's): the generator comparison
    synthetic_sources: dict[str, str | None] = {}

    @model_validator(mode="after")
    def _one_seed(self) -> ReportSettings:
        if (self.report.seed is None) == (self.run_seed is None):
            raise ValueError("exactly one of report.seed and run_seed decides the bootstrap seed")
        return self

    @property
    def seed(self) -> int:
        """The bootstrap seed."""
        return self.report.seed if self.report.seed is not None else self.run_seed  # type: ignore[return-value]


def settings(cfg: T2IDConfig) -> ReportSettings:
    label = "label" in cfg.run.stages
    detector = cfg.grid.detector
    return ReportSettings(
        report=cfg.report, run_id=cfg.run.id, description=cfg.run.description,
        run_seed=cfg.run.seed if cfg.report.seed is None else None,
        target_classes=[t.name for t in cfg.lora.target_classes], strategies=list(cfg.grid.strategies),
        detector=DetectorSummary(model=detector.model, imgsz=detector.imgsz, epochs=detector.epochs,
                                 batch=detector.batch),
        label_method=cfg.label.method if label else None,
        memorization_threshold=cfg.label.memorization.threshold if label else None,
        task=cfg.run.task,
        classifier=ClassifierSummary(**cfg.grid.classifier.model_dump(include={"model", "weights", "imgsz", "epochs",
                                                                                "batch"}))
        if cfg.run.task == "classify" else None,
        synthetic_sources={name: spec.synthetic_from for name in cfg.grid.strategies
                           if (spec := cfg.grid.strategy_spec(name)).synthetic},
    )
