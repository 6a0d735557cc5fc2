"""What the `grid` stage takes from the config, from any section, and nothing else.

The runner hashes this model into the stage marker; the same object crosses into every Tune trial,
which takes its strategy spec and detector settings from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import model_validator

from t2id.configbase import StageSettings
from t2id.grid.config import GridConfig

if TYPE_CHECKING:
    from t2id.config import T2IDConfig


class GridSettings(StageSettings):
    grid: GridConfig
    run_seed: int | None  # run.seed, only when grid.seed and grid.seeds are unset (the detector training seed)
    use_synthetic: bool  # label in run.stages: the *_sdxl strategies train on label/fold=<k>/labels.parquet
    #                      (classify: generate in run.stages, they train on generate/fold=<k>/manifest.parquet)
    task: str = "detect"  # run.task: detector trials (grid.detector) or classifier trials (grid.classifier)

    @model_validator(mode="after")
    def _one_seed(self) -> GridSettings:
        own = self.grid.seed is not None or self.grid.seeds is not None
        if own == (self.run_seed is not None):
            raise ValueError("exactly one of grid.seeds, grid.seed and run_seed decides the training seeds")
        return self

    @property
    def seeds(self) -> list[int]:
        """The detector training seeds: one trial per fold x strategy x seed."""
        if self.grid.seeds is not None:
            return list(self.grid.seeds)
        return [self.grid.seed if self.grid.seed is not None else self.run_seed]  # type: ignore[list-item]


def settings(cfg: T2IDConfig) -> GridSettings:
    own = cfg.grid.seed is not None or cfg.grid.seeds is not None
    synthetic_stage = "generate" if cfg.run.task == "classify" else "label"
    return GridSettings(grid=cfg.grid, run_seed=None if own else cfg.run.seed,
                        use_synthetic=synthetic_stage in cfg.run.stages, task=cfg.run.task)
