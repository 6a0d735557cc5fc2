"""Detector training settings (paper Sec. III-B: YOLOv9s, 320 px, batch 64, AdamW lr 1e-3, wd 0.01, dropout 0.1)."""

from __future__ import annotations

from pydantic import Field

from t2id.configbase import Section


class DetectorConfig(Section):
    model: str = Field("yolov9s.yaml", description="Ultralytics model yaml (random init) or a weights file path.")
    imgsz: int = Field(320, ge=32, description="Detector input size (paper: 320).")
    epochs: int = Field(100, gt=0, description="Detector epochs.")
    batch: int = Field(64, gt=0, description="Detector batch size (paper: 64).")
    lr: float = Field(1e-3, gt=0, description="AdamW initial learning rate (paper: 1e-3).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (paper: 0.01).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout (paper: 0.1).")
