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
    imgsz: int  # grid.detector.imgsz: real and synthetic images are resized to the detector's input first
    label_method: str | None  # label.method when label in run.stages (the detector trains on label's kept,
    #                           boxed rows: those are measured); None: generate's kept rows are

    @property
    def model_label(self) -> str:
        """The generator as Table I names it."""
        if self.base_model == "tiny":
            return "tiny SDXL-LoRA (random stand-in)"
        return f"SDXL-LoRA ({self.base_model.rstrip('/').split('/')[-1]})"

    @property
    def synthetic_source(self) -> str:
        """Which synthetic images are measured, as the table says it."""
        if self.label_method is None:
            return "generate: kept text-to-image samples"
        what = {"inpaint": "inpainted copies of real training images",
                "inpaint_outpaint": "inpainted, then outpainted copies of real training images"}.get(
            self.label_method, "teacher-labelled text-to-image samples")
        return f"label ({self.label_method}): kept, boxed rows the detector trains on ({what})"


def settings(cfg: T2IDConfig) -> EvaluateSettings:
    return EvaluateSettings(evaluate=cfg.evaluate, base_model=cfg.lora.base_model, run_seed=cfg.run.seed,
                            imgsz=cfg.grid.detector.imgsz,
                            label_method=cfg.label.method if "label" in cfg.run.stages else None)
