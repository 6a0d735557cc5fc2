"""What the `label` stage takes from the config, from any section, and nothing else.

Only the labeler in use contributes cross-section values: the teacher's detector settings
(label.teacher.detector, else grid.detector) for `teacher`; generate's settings with the
label.inpaint overrides for `inpaint` and `inpaint_outpaint` (which also carry lora.target_classes,
lora.base_model and lora.allow_network); label.outpaint counts only for `inpaint_outpaint`. The
runner hashes this model into the marker; the teacher's Ray task and the inpainting actors build
themselves from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from t2id.configbase import StageSettings
from t2id.detect.config import DetectorConfig
from t2id.generate.config import GenerateConfig
from t2id.generate.settings import GenerateSettings
from t2id.generate.settings import settings as generate_settings
from t2id.label.config import LabelConfig, OutpaintConfig

if TYPE_CHECKING:
    from t2id.config import T2IDConfig

# generate fields inpainting does not use: label.folds picks the folds, a plan has no top-up rounds,
# no contact sheets are drawn, and every image gets its own pipeline call. They are reset to their
# defaults so that changing them does not re-run label.
UNUSED_BY_INPAINTING = ("folds", "max_attempts_factor", "contact_sheet_images", "contact_sheet_thumb",
                        "batched_pipeline")


class LabelSettings(StageSettings):
    label: LabelConfig
    seed: int  # label.seed, else run.seed: teacher training and inpaint plan seeds
    use_adapter: bool  # lora in run.stages: generate's images came from lora/fold=<k>/ (memorization reference)
    teacher_detector: DetectorConfig | None = None  # label.teacher.detector, else grid.detector; teacher only
    inpainting: GenerateSettings | None = None  # generate's settings with label.inpaint overrides; inpaint only
    images_per_class: int | None = None  # generate.images_per_class: the target per fold and class; teacher only
    #                                      (inpaint: inpainting.generate.images_per_class)
    topup: GenerateSettings | None = None  # generate's settings: the fold's generator makes the teacher's top-up
    #                                        images; teacher with label.max_attempts_factor > 1 only
    fidelity_iou: float | None = None  # lora.layout.fidelity_iou: layout fidelity's match rule; layout_lora only

    @property
    def target_per_class(self) -> int:
        """How many usable synthetic images per fold and class were asked for (the shortfall's reference)."""
        if self.inpainting is not None:
            return self.inpainting.generate.images_per_class
        assert self.images_per_class is not None
        return self.images_per_class


def inpainting_settings(cfg: T2IDConfig, seed: int) -> GenerateSettings:
    """generate's settings as inpainting uses them: label.inpaint's steps/guidance/count, no CLIP gate
    (an inpainted image is mostly real), the label seed."""
    gen, inp = cfg.generate, cfg.label.inpaint
    defaults = {name: GenerateConfig.model_fields[name].default for name in UNUSED_BY_INPAINTING}
    generate = gen.model_copy(update={
        **defaults,
        "steps": inp.steps or gen.steps,
        "guidance": gen.guidance if inp.guidance is None else inp.guidance,
        "images_per_class": inp.images_per_class or gen.images_per_class,
        "quality": gen.quality.model_copy(update={"min_clip_score": None}),
    })
    base = generate_settings(cfg)
    return GenerateSettings.model_validate({**base.model_dump(), "generate": generate.model_dump(),
                                            "run_seed": seed, "folds": None, "clip_weights": None})


def topup_settings(cfg: T2IDConfig) -> GenerateSettings:
    """generate's settings as the teacher's top-up uses them: the same generator and sampling; the folds and
    contact-sheet fields are reset (label.folds picks folds; no sheets are drawn)."""
    unused = ("folds", "contact_sheet_images", "contact_sheet_thumb")
    defaults = {name: GenerateConfig.model_fields[name].default for name in unused}
    base = generate_settings(cfg)
    return GenerateSettings.model_validate({**base.model_dump(), "folds": None,
                                            "generate": cfg.generate.model_copy(update=defaults).model_dump()})


def settings(cfg: T2IDConfig) -> LabelSettings:
    lab = cfg.label
    if lab.method != "inpaint_outpaint":  # its step-2 settings are unused: changing them does not re-run label
        lab = lab.model_copy(update={"outpaint": OutpaintConfig()})
    seed = cfg.run.seed if lab.seed is None else lab.seed
    teacher = lab.method == "teacher"
    topup = teacher and lab.max_attempts_factor > 1
    return LabelSettings(label=lab, seed=seed, use_adapter="lora" in cfg.run.stages,
                         teacher_detector=(lab.teacher.detector or cfg.grid.detector) if teacher else None,
                         inpainting=None if teacher else inpainting_settings(cfg, seed),
                         images_per_class=cfg.generate.images_per_class if teacher else None,
                         topup=topup_settings(cfg) if topup else None,
                         fidelity_iou=cfg.lora.layout.fidelity_iou
                         if cfg.lora.layout is not None and "lora" in cfg.run.stages else None)
