"""Detector settings (paper Sec. III-B: YOLOv9s, 320 px, batch 64, AdamW lr 1e-3, wd 0.01, dropout 0.1) and the
training strategies of Table II as data (`StrategySpec`, `PRESETS`, `resolve_strategy`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from t2id.configbase import Section
from t2id.errors import UserError


class DetectorConfig(Section):
    model: str = Field(
        "yolov9s.yaml",
        description="Ultralytics model yaml (random init, e.g. yolov9s.yaml), a local weights file or an s3:// "
                    "weights URI. Nothing is downloaded: a missing weights file is an error.",
    )
    imgsz: int = Field(320, ge=32, description="Detector input size (paper: 320).")
    epochs: int = Field(100, gt=0, description="Detector epochs.")
    batch: int = Field(64, gt=0, description="Detector batch size (paper: 64).")
    lr: float = Field(1e-3, gt=0, description="AdamW initial learning rate (paper: 1e-3).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (paper: 0.01).")
    warmup_epochs: float = Field(
        3.0, ge=0, description="Linear LR warmup epochs (ultralytics default 3). Tiny runs of a few epochs need 0.",
    )
    nominal_batch: int = Field(
        64, gt=0,
        description="ultralytics `nbs`: gradients accumulate until this many images per optimizer step "
                    "(64 = the paper's batch, so no accumulation there). Set it to `batch` for tiny runs.",
    )
    validate_every_epoch: bool = Field(
        True, description="Validate after every epoch (best.pt = best epoch). Off: validate the last epoch only, "
                          "which saves most of a tiny run's time.",
    )
    dropout: float = Field(
        0.1, ge=0, lt=1,
        description="Dropout (paper: 0.1). Passed to ultralytics, which applies it in classification heads only "
                    "(no effect on detection models).",
    )


class BudgetConfig(Section):
    """The compute each trial gets, equal across the strategies of a grid (issue 15: RFS epochs of sum(r_i)
    draws and synthetic images counted into N gave some strategies 35%+ more optimizer steps)."""

    unit: Literal["optimizer_steps", "images_seen"] = Field(
        "images_seen", description="What `value` counts: optimizer steps or training images seen (draws).",
    )
    value: int | None = Field(
        None, gt=0,
        description="Budget per trial in `unit`, spread evenly over detector.epochs (every epoch draws the same "
                    "number of images from the strategy's sampling distribution). Default: as many images as "
                    "the fold has REAL training images per epoch (synthetic images are not counted), times epochs; "
                    "in optimizer_steps, the steps that takes.",
    )


# ------------------------------------------------------------------------------------------------
# Strategies as data (paper Table II): sampling x augment x class weighting x synthetic images.
# ------------------------------------------------------------------------------------------------

Sampling = Literal["none", "rfs", "cas"]
Augment = Literal["plain", "mosaic_mixup", "default"]


class StrategySpec(Section):
    """One detector training strategy. The paper's seven (plus class_weights) are `PRESETS`;
    a config may name a preset or spell out a new combination."""

    name: str = Field(description="Strategy name, used in store keys and report rows ([a-z0-9_]+).")
    sampling: Sampling = Field(
        "none",
        description="Train image sampler: none (shuffle), rfs (repeat factor sampling, LVIS), "
                    "cas (class-aware sampling, Shen et al.; T2ID-CAS Sec. II-B).",
    )
    augment: Augment = Field(
        "plain",
        description="plain: ultralytics augmentations without mosaic/mixup/cutmix/copy-paste (paper baseline); "
                    "mosaic_mixup: mosaic 1.0 + mixup 0.15 (YOLOv9 scratch-high hyp); default: ultralytics defaults.",
    )
    class_weights: bool = Field(
        False, description="Weight the classification loss by inverse class frequency (ultralytics cls_pw=1)."
    )
    synthetic: bool = Field(False, description="Add the run's kept, labelled synthetic images to the train split.")
    synthetic_from: str | None = Field(
        None,
        description="Train on ANOTHER t2id run's synthetic images instead of this run's (synthetic: true only): "
                    "the root of that run in its store, a local folder (<store.uri>/<run.id>; a relative path is "
                    "taken from the working directory, like store.uri) or s3://bucket/prefix/<run.id>, opened with "
                    "this run's store settings. That run must have the same data and split as this one; it is how "
                    "one grid compares generators (docs/generators.md, 'Comparing generators').",
    )
    rfs_threshold: float = Field(
        0.5, gt=0, le=1,
        description="RFS threshold t in r_c = max(1, sqrt(t / f_c)). The paper does not state t; LVIS used 0.001 "
                    "for 1203 classes. With six classes, 0.5 repeats classes held by fewer than half the images.",
    )
    cas_epoch_size: int | None = Field(
        None, gt=0, description="Draws per CAS epoch when no compute budget applies (default the number of train images); "
                          "in the grid, grid.budget sets every strategy's epoch length instead."
    )

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9_]+", value):
            raise ValueError(f"strategy name {value!r} must match [a-z0-9_]+ (it becomes a store key)")
        return value

    @model_validator(mode="after")
    def _synthetic_from_needs_synthetic(self) -> StrategySpec:
        if self.synthetic_from is not None:
            if not self.synthetic:
                raise ValueError(f"strategy {self.name!r}: synthetic_from is set but synthetic is false; set "
                                 "synthetic: true to train on that run's synthetic images, or remove synthetic_from")
            if not self.synthetic_from.strip():
                raise ValueError(f"strategy {self.name!r}: synthetic_from is empty; give the other run's root "
                                 "(e.g. runs/ddpm-run or s3://bucket/runs/ddpm-run), or remove it")
            if "://" in self.synthetic_from and not self.synthetic_from.startswith("s3://"):
                raise ValueError(f"strategy {self.name!r}: synthetic_from {self.synthetic_from!r}: use a local "
                                 "folder or s3://bucket/prefix/<run id>")
        return self

    def identity(self) -> dict:
        """The spec as a trial's identity holds it: synthetic_from only when set, so the trials of grids
        from before the field existed keep their results."""
        return self.model_dump(mode="json", exclude=None if self.synthetic_from else {"synthetic_from"})


PRESETS: dict[str, StrategySpec] = {
    spec.name: spec
    for spec in (
        StrategySpec(name="baseline"),
        StrategySpec(name="mosaic_mixup", augment="mosaic_mixup"),
        StrategySpec(name="rfs", sampling="rfs"),
        StrategySpec(name="cas", sampling="cas"),
        StrategySpec(name="baseline_sdxl", synthetic=True),
        StrategySpec(name="rfs_sdxl", sampling="rfs", synthetic=True),
        StrategySpec(name="t2id_cas", sampling="cas", synthetic=True),
        StrategySpec(name="class_weights", class_weights=True),
    )
}


def resolve_strategy(name_or_spec: str | StrategySpec | dict) -> StrategySpec:
    """A preset by name, a StrategySpec as is, or a dict validated into one."""
    if isinstance(name_or_spec, StrategySpec):
        return name_or_spec
    if isinstance(name_or_spec, dict):
        try:
            return StrategySpec.model_validate(name_or_spec)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(part) for part in err["loc"]) or "strategy"
            raise UserError(f"invalid strategy {name_or_spec!r}: {field}: {err['msg']}") from exc
    if name_or_spec in PRESETS:
        return PRESETS[name_or_spec]
    raise UserError(
        f"unknown strategy {name_or_spec!r}: use one of {', '.join(PRESETS)} or define sampling/augment/"
        "class_weights/synthetic explicitly."
    )
