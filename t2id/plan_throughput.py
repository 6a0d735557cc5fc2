"""Per-GPU throughputs that `t2id plan` estimates with: one row per kind of work, each with its source.

Measured rows come from issue 17: t2id's own cores (no Ray) on one NVIDIA H200 (torch 2.11, cu130) with an
SDXL-1.0-architecture pipeline of random weights (UNet 2.57 B params, CLIP-L + bigG, SDXL VAE), the same
code paths and shapes as the paper's job. Rows without a measurement are estimates and say so in their
source; `bench/bench_gpu.py` measures what it can on your GPU (add a row per GPU type from its output).
docs/plan.md explains each number and the scaling rules below.

Scaling rules (how a row measured at one setting serves a config at another):
  - LoRA training: cost per image proportional to its pixels (512 px and 1024 px measurements agree within
    10% in megapixels per second); the nearest measured resolution is scaled by (its side / config side)^2.
  - Generation: cost per image proportional to denoising steps x pixels (UNet passes dominate); classifier-free
    guidance is in the measured figure (two UNet passes per step).
  - Detector: cost per image proportional to pixels from the 320 px estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

ISSUE_17 = "measured, issue 17 (t2id's code, one H200)"


@dataclass(frozen=True)
class Throughput:
    work: str  # lora | generate | detector_train | detector_predict | features
    variant: str  # which code path / precision: e.g. "fp16", "bf16", "batched", "unbatched"
    images_per_second: float  # per GPU
    resolution: int  # square side, pixels, the figure was measured (or estimated) at
    steps: int | None  # denoising steps (generation)
    conditions: str
    source: str


THROUGHPUT: dict[str, list[Throughput]] = {
    "h200": [
        Throughput("lora", "fp16", 25.7, 512, None, "rank 16, batch 16", ISSUE_17),
        Throughput("lora", "bf16", 28.2, 512, None, "rank 16, batch 16 (MFU 13.6%)", ISSUE_17),
        Throughput("lora", "fp16+checkpointing", 14.6, 512, None, "gradient checkpointing, batch 16, 13.0 GiB",
                   ISSUE_17),
        Throughput("lora", "fp16", 7.0, 1024, None, "rank 16, batch 4 (MFU 14.3%)", ISSUE_17),
        Throughput("lora", "bf16", 7.7, 1024, None, "batch 4",
                   "estimate: the 1024 px fp16 figure x the bf16/fp16 ratio measured at 512 px (28.2/25.7)"),
        Throughput("lora", "fp32", 8.6, 512, None, "mixed_precision: no",
                   "estimate: one third of fp16 (TF32 matmuls, twice the memory traffic); not measured"),
        Throughput("generate", "batched", 2.94, 512, 30, "CFG 7.5, LoRA, batch 16", ISSUE_17),
        Throughput("generate", "unbatched", 0.236, 512, 30, "CFG 7.5, LoRA, one call per image", ISSUE_17),
        Throughput("detector_train", "yolov9s-class", 500.0, 320, None, "ultralytics training, AMP",
                   # YOLOv8s/9s-class models train at ~400-500 img/s at 640 px on A100/H100-class GPUs; a
                   # quarter of the pixels at 320 px leaves them dataloader-bound: taken as 500 img/s per GPU.
                   "estimate, NOT measured (docs/plan.md); replace with bench/bench_gpu.py's detector epoch"),
        Throughput("detector_predict", "yolov9s-class", 1500.0, 320, None, "validation / prediction",
                   "estimate, NOT measured: 3x training (forward only, no augmentation)"),
        Throughput("features", "inception+clip", 500.0, 299, None, "InceptionV3 + CLIP ViT-L/14",
                   "estimate, NOT measured: decoding-bound; minutes either way"),
    ],
}


def gpu_types() -> list[str]:
    return sorted(THROUGHPUT)


def rows(gpu: str, work: str) -> list[Throughput]:
    return [t for t in THROUGHPUT.get(gpu, []) if t.work == work]
