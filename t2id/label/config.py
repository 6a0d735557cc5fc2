"""Config section of the `label` stage: boxes for synthetic images, and a memorization check.

The paper does not say how its synthetic images got boxes. t2id offers two labelers and records
which one made each box (`label_source`):
  teacher  a detector trained on the fold's real TRAIN images labels each kept text-to-image sample;
           a class-consistency gate rejects a sample whose prompted class is not found;
  inpaint  a real TRAIN image holding the target class is inpainted inside (a margin around) its
           target-class boxes with the fold's adapter and the class prompt; it inherits the real boxes.
The memorization check follows the warning of papers/lung-ultrasound-textual-inversion-ddpm.txt
(Sec. 5: few-shot generators "are possibly just memorized variations of the training set").
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from t2id.configbase import Section
from t2id.detect.config import DetectorConfig


class TeacherConfig(Section):
    source: Literal["train", "grid", "auto"] = Field(
        "train",
        description="Where the teacher's weights come from. train: train one per fold on the fold's real TRAIN "
        "images (ultralytics validates on those same images, so the fold's val images are never seen); grid: "
        "reuse grid/fold=<k>/strategy=baseline/best.pt of an earlier grid run (error if missing; note that the "
        "grid picked that checkpoint on the val fold); auto: grid weights when present, else train.",
    )
    detector: DetectorConfig | None = Field(
        None, description="Detector settings of a trained teacher (default: grid.detector, the baseline's settings)."
    )
    imgsz: int | None = Field(None, ge=32, description="Prediction size in pixels (default: the detector's imgsz).")
    iou: float = Field(0.7, gt=0, le=1, description="NMS IoU threshold of the teacher's predictions.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Device of the teacher's Ray task (training and prediction): auto = one GPU when the Ray "
        "cluster has one, else cpu; cuda = one GPU (error if the cluster has none).",
    )
    cpus: float = Field(
        1.0, gt=0, description="CPUs the teacher's Ray task reserves per fold (its torch threads use them)."
    )
    workers: int = Field(0, ge=0, description="Dataloader workers of teacher training.")


class InpaintConfig(Section):
    box_margin: float = Field(
        0.1, ge=0, le=2,
        description="Mask = each target-class box grown by this fraction of its width/height on every side.",
    )
    strength: float = Field(
        0.8, gt=0, le=1,
        description="How far inside the mask the source is noised before denoising (1 = fully regenerated).",
    )
    steps: int | None = Field(None, gt=0, description="Denoising steps (default: generate.steps).")
    guidance: float | None = Field(None, ge=0, description="Classifier-free guidance (default: generate.guidance).")
    images_per_class: int | None = Field(
        None, gt=0, description="Inpainted images per fold and target class (default: generate.images_per_class)."
    )


class MemorizationConfig(Section):
    feature: Literal["pixels", "ssim"] = Field(
        "pixels",
        description="Similarity: pixels = cosine similarity of mean-centred grey pixel vectors at `size` px "
        "(Pearson correlation, -1..1); ssim = mean SSIM (7x7 windows) at `size` px.",
    )
    size: int = Field(64, ge=8, le=512, description="Side in pixels both images are resized to before comparing.")
    threshold: float = Field(
        0.95, ge=-1, le=1,
        description="An image whose nearest training image is at least this similar is flagged as memorized.",
    )
    reject: bool = Field(
        True, description="Reject flagged images (kept=False, reason 'memorized'); false = flag and keep them."
    )


class LabelConfig(Section):
    method: Literal["teacher", "inpaint"] = Field(
        "teacher",
        description="How synthetic images get boxes: teacher (pseudo-label generate's images with a detector "
        "trained on the fold's real TRAIN images) or inpaint (inpaint target-class boxes of real TRAIN images; "
        "boxes are inherited).",
    )
    min_confidence: float = Field(0.25, ge=0, le=1, description="Teacher boxes below this confidence are dropped.")
    class_consistency: bool = Field(
        True,
        description="Reject a teacher-labelled image when no kept box has its prompted (target) class, with the "
        "reason; off: keep it with whatever boxes were found.",
    )
    folds: list[int] | None = Field(None, description="Folds to label (default: every fold generate produced).")
    seed: int | None = Field(None, ge=0, description="Teacher training / inpaint source choice seed (default: run.seed).")
    max_attempts_factor: float = Field(
        2.0, ge=1.0,
        description="Top-up after label's rejections: while a fold's class has fewer usable images (kept with "
        "boxes) than its target, new candidates are made (teacher: text-to-image with the fold's generator, under "
        "label/fold=<k>/topup/; inpaint: more inpainted images) and labelled, until the target is reached or "
        "ceil(max_attempts_factor x target) candidates were tried (teacher: generate's images count). A class still "
        "short is reported with its shortfall. 1 turns top-up off.",
    )
    teacher: TeacherConfig = TeacherConfig()
    inpaint: InpaintConfig = InpaintConfig()
    memorization: MemorizationConfig = MemorizationConfig()

    @property
    def memorization_threshold(self) -> float:
        """The flag threshold (the report draws it on the similarity histogram)."""
        return self.memorization.threshold

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        if self.folds is not None and (not self.folds or len(set(self.folds)) != len(self.folds)
                                       or min(self.folds) < 0):
            raise ValueError(f"label.folds={self.folds}: list distinct fold indices >= 0, or omit it for all folds")
        return self
