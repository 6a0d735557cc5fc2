"""The classifier's settings (grid.classifier) and the cross-section rules of run.task: classify.

Seed settings (papers in ../shared/papers/): the lung-ultrasound study trains ResNet50 and ViT-B/16
baselines with class weights; the skin study fine-tunes EfficientNetV2-M pretrained on ImageNet for
30 epochs; FU-LoRA reports accuracy, F-score and AUC. Defaults follow the skin study (30 epochs);
the lr and batch are common fine-tuning values, not from a paper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from t2id.configbase import Section

if TYPE_CHECKING:
    from t2id.config import T2IDConfig

ClassifierModel = Literal["tiny", "resnet18", "resnet50", "vit_b_16", "efficientnet_v2_m"]


class ClassifierConfig(Section):
    model: ClassifierModel = Field(
        "resnet50",
        description="torchvision architecture (resnet50, vit_b_16, efficientnet_v2_m; resnet18), or 'tiny' (a "
                    "4-layer CNN for tests and the demo). Random init unless `weights` names a file.",
    )
    weights: str | None = Field(
        None, description="State dict of the architecture (.pth/.pt from torch.save, or .safetensors): a local path "
                          "or an s3:// URI, e.g. ImageNet weights; the classification head is replaced for the run's "
                          "classes. Nothing is downloaded. Default: random init (from scratch).",
    )
    imgsz: int = Field(224, ge=16, description="Input side in pixels (images are resized, grey replicated to RGB).")
    epochs: int = Field(30, gt=0, description="Epochs (skin study: 30).")
    batch: int = Field(32, gt=0, description="Batch size.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    hflip: bool = Field(True, description="Random horizontal flip of training images.")
    jitter: bool = Field(
        True, description="Random shift of each training batch by up to 10% of the side (edge pixels repeated) and "
                          "per-image gain x U(0.6, 1.4) and offset N(0, 0.5) after normalization: subjects differ in "
                          "probe position, gain and attenuation, and a classifier of few subjects otherwise learns them.")

    @model_validator(mode="after")
    def _vit_patch(self) -> ClassifierConfig:
        if self.model == "vit_b_16" and self.imgsz % 16:
            raise ValueError(f"vit_b_16 cuts the image into 16 px patches; set grid.classifier.imgsz to a multiple "
                             f"of 16 (e.g. 224), got {self.imgsz}")
        return self


def check_classify_config(cfg: T2IDConfig) -> None:
    """Rules of run.task: classify that span sections (called from T2IDConfig's cross-section check)."""
    detection_only = [name for name in cfg.grid.strategies if cfg.grid.strategy_spec(name).augment != "plain"]
    if detection_only:
        raise ValueError(f"grid.strategies {detection_only} use detector augmentations (mosaic/mixup) but run.task is "
                         "classify; list strategies with augment: plain, e.g. [baseline, rfs, cas, class_weights, "
                         "baseline_sdxl, t2id_cas]")
    if cfg.lora.method == "layout_lora":
        raise ValueError("lora.method is layout_lora but run.task is classify: location tokens ask for boxes, and an "
                         "image-level label has none; use lora, dreambooth_lora or textual_inversion")
