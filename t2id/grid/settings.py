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
    run_seed: int | None  # run.seed, only when grid.seed is unset (the detector training seed)
    use_synthetic: bool  # label in run.stages: the *_sdxl strategies train on label/fold=<k>/labels.parquet

    @model_validator(mode="after")
    def _one_seed(self) -> GridSettings:
        if (self.grid.seed is None) == (self.run_seed is None):
            raise ValueError("exactly one of grid.seed and run_seed decides the training seed")
        return self

    @property
    def seed(self) -> int:
        """The detector training seed of every trial."""
        return self.grid.seed if self.grid.seed is not None else self.run_seed  # type: ignore[return-value]


def settings(cfg: T2IDConfig) -> GridSettings:
    return GridSettings(grid=cfg.grid, run_seed=cfg.run.seed if cfg.grid.seed is None else None,
                        use_synthetic="label" in cfg.run.stages)
