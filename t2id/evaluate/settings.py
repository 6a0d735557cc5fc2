"""What the `evaluate` stage takes from the config, from any section, and nothing else.

The runner hashes this model into the stage marker; its `evaluate` part is also what the feature
extraction actors build themselves from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from t2id.configbase import StageSettings
from t2id.evaluate.config import EvaluateConfig

if TYPE_CHECKING:
    from t2id.config import T2IDConfig


class EvaluateSettings(StageSettings):
    evaluate: EvaluateConfig
    base_model: str  # lora.base_model: only the model label of Table I
    run_seed: int  # run.seed: KID subsets and IS splits of fold k draw with seed run.seed + k

    @property
    def model_label(self) -> str:
        """The generator as Table I names it."""
        if self.base_model == "tiny":
            return "tiny SDXL-LoRA (random stand-in)"
        return f"SDXL-LoRA ({self.base_model.rstrip('/').split('/')[-1]})"


def settings(cfg: T2IDConfig) -> EvaluateSettings:
    return EvaluateSettings(evaluate=cfg.evaluate, base_model=cfg.lora.base_model, run_seed=cfg.run.seed)
