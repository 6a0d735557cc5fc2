"""What the `split` stage takes from the config: its section and the run seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from t2id.configbase import StageSettings
from t2id.split.config import SplitConfig

if TYPE_CHECKING:
    from t2id.config import T2IDConfig


class SplitSettings(StageSettings):
    split: SplitConfig  # the split section, whole: k and stratification
    run_seed: int  # run.seed: breaks ties in the fold assignment, so reruns give the same folds


def settings(cfg: T2IDConfig) -> SplitSettings:
    return SplitSettings(split=cfg.split, run_seed=cfg.run.seed)
