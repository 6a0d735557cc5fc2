"""Config section of the `grid` stage: fold x strategy x seed detector trainings on Ray Tune."""

from __future__ import annotations

from pydantic import Field, model_validator

from t2id.classify.config import ClassifierConfig
from t2id.configbase import Section
from t2id.detect.config import PRESETS, BudgetConfig, DetectorConfig, StrategySpec

PAPER_STRATEGIES = ["baseline", "mosaic_mixup", "rfs", "cas", "baseline_sdxl", "rfs_sdxl", "t2id_cas"]


class GridConfig(Section):
    detector: DetectorConfig = Field(DetectorConfig(), description="Detector training settings shared by all trials.")
    classifier: ClassifierConfig = Field(
        ClassifierConfig(), description="Classifier training settings shared by all trials (run.task: classify).")
    strategies: list[str] = Field(
        default_factory=lambda: [*PAPER_STRATEGIES, "class_weights"],
        description="Strategies to train per fold, in report column order: preset names (the paper's seven "
        "plus class_weights) or names of custom_strategies. Strategies using synthetic images need the "
        "label stage; without a synthetic set for a fold their trials are recorded as skipped.",
    )
    custom_strategies: list[StrategySpec] = Field(
        default_factory=list,
        description="Extra strategies spelled out as data (name, sampling, augment, class_weights, synthetic, ...); "
        "list their names in `strategies` to train them.",
    )
    folds: list[int] | None = Field(
        None, description="Subset of fold indices to train (default: every fold of the split stage)."
    )
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs reserved per trial (data loading workers + main).")
    gpus_per_trial: float = Field(
        0.0, ge=0, description="GPUs per trial; a fraction (e.g. 0.25) lets several small trainings share one GPU."
    )
    workers: int = Field(0, ge=0, description="Dataloader worker processes per trial (keep < cpus_per_trial).")
    max_concurrent: int = Field(0, ge=0, description="Most trials running at once (0: as many as resources allow).")
    max_retries: int = Field(
        1, ge=0, description="Retries of an errored trial per `t2id run` (Tune FailureConfig.max_failures)."
    )
    budget: BudgetConfig = Field(
        BudgetConfig(),
        description="Compute per trial, equal across strategies: every strategy's epoch draws the same number of "
                    "images from its sampling distribution (default: the fold's real training images per epoch).",
    )
    seed: int | None = Field(None, ge=0, description="Detector training seed (default: run.seed) when `seeds` is unset.")
    seeds: list[int] | None = Field(
        None, description="Detector training seeds: one trial per fold x strategy x seed (default: [seed or run.seed]).",
    )

    @model_validator(mode="after")
    def _check(self) -> GridConfig:
        if not self.strategies:
            raise ValueError("grid.strategies is empty; list at least one strategy, e.g. [baseline, t2id_cas]")
        dupes = sorted({s for s in self.strategies if self.strategies.count(s) > 1})
        if dupes:
            raise ValueError(f"grid.strategies lists {dupes} more than once; keep each strategy once")
        custom = [c.name for c in self.custom_strategies]
        clash = sorted({c for c in custom if c in PRESETS or custom.count(c) > 1})
        if clash:
            raise ValueError(f"grid.custom_strategies: name(s) {clash} repeat a preset or another custom "
                             "strategy; give each custom strategy a new name")
        unknown = [s for s in self.strategies if s not in PRESETS and s not in custom]
        if unknown:
            raise ValueError(f"grid.strategies: unknown strategy {unknown}; use presets {list(PRESETS)} "
                             "or add an entry to grid.custom_strategies")
        if self.folds is not None:
            if not self.folds or len(set(self.folds)) != len(self.folds) or min(self.folds) < 0:
                raise ValueError(f"grid.folds {self.folds}: list distinct fold indices >= 0, or omit it for all folds")
        if self.seeds is not None:
            if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
                raise ValueError(f"grid.seeds {self.seeds}: list distinct seeds >= 0, or omit it for one seed")
            if self.seed is not None:
                raise ValueError("grid.seed and grid.seeds are both set; keep one (grid.seeds: [a, b, ...])")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ValueError(f"grid.gpus_per_trial {self.gpus_per_trial}: use a fraction <= 1 or a whole number")
        return self

    def strategy_spec(self, name: str) -> StrategySpec:
        """The spec of a strategy listed in `strategies` (custom definitions first, then presets)."""
        for spec in self.custom_strategies:
            if spec.name == name:
                return spec
        return PRESETS[name]
