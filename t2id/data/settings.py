"""What the `data` stage takes from the config: its own section, nothing else.

The dataset's content is not config: the stage declares it as an external input
(`t2id.data.importer.fingerprint_source`), so a changed source file re-imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from t2id.configbase import StageSettings
from t2id.data.config import DataConfig

if TYPE_CHECKING:
    from t2id.config import T2IDConfig


class DataSettings(StageSettings):
    data: DataConfig  # the data section, whole: source, phantom, subjects, class names, checks, workers
    task: str = "detect"  # run.task: a YOLO dataset (detect) or an image-folder / CSV dataset (classify)


def settings(cfg: T2IDConfig) -> DataSettings:
    return DataSettings(data=cfg.data, task=cfg.run.task)
