"""What the `lora` stage takes from the config: its section and, unless lora.seed is set, run.seed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from t2id.configbase import StageSettings
from t2id.lora.config import LoraConfig

if TYPE_CHECKING:
    from t2id.config import T2IDConfig


class LoraSettings(StageSettings):
    lora: LoraConfig  # the lora section, whole; it is also what the Ray Train workers get
    run_seed: int | None  # run.seed, from which each fold's training seed derives; None when lora.seed is set


def settings(cfg: T2IDConfig) -> LoraSettings:
    lora = cfg.lora
    if lora.method == "ddpm":  # its SDXL/LoRA settings unused, so they change nothing (t2id.lora.ddpm.ddpm_view)
        from t2id.lora.ddpm import ddpm_view

        lora = ddpm_view(lora)
    return LoraSettings(lora=lora, run_seed=None if cfg.lora.seed is not None else cfg.run.seed)
