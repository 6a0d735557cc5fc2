"""Per-image quality gate of the lung-ultrasound DDPM study
(papers/lung-ultrasound-textual-inversion-ddpm.txt, eq. 4-5, Fig. 10).

The study keeps a sample only if its pixel standard deviation exceeds 30 and its entropy
exceeds 4.7, "separating noise from high-quality samples". Units used here:
  - std: population standard deviation (eq. 4, 1/N) of the 8-bit grey image, in grey levels 0-255;
  - entropy: Shannon entropy of the 256-bin grey-level histogram (eq. 5, L = 256, log base 2), in
    bits; its range is 0 (flat image) to 8 (uniform histogram).
Grey = PIL's "L" conversion (ITU-R 601 luma), since ultrasound is grey even when decoded as RGB.
An optional CLIP-score gate (off by default) rejects images that do not match their prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from t2id.generate.config import QualityGate


def to_grey_u8(image: Image.Image | np.ndarray) -> np.ndarray:
    """8-bit grey pixels (H, W) of a PIL image or a uint8 array (H, W) / (H, W, 3)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"expected uint8 pixels, got {image.dtype}")
        image = Image.fromarray(image)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def pixel_std(grey_hw: np.ndarray) -> float:
    """Eq. 4: sqrt(1/N sum (I_i - mu)^2) over all pixels, in grey levels."""
    return float(np.std(grey_hw.astype(np.float64)))


def grey_entropy_bits(grey_hw: np.ndarray) -> float:
    """Eq. 5: -sum_i p(i) log2 p(i) over the 256 grey levels, p(i) = n_i / N; in bits."""
    counts = np.bincount(grey_hw.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 of a flat image into 0.0


@dataclass(frozen=True)
class GateResult:
    std: float
    entropy: float
    clip_score: float | None
    kept: bool
    reject_reason: str  # "" when kept; else failed checks joined by ",": "std", "entropy", "clip"


def judge(std: float, entropy: float, clip_score: float | None, gate: QualityGate) -> GateResult:
    """Apply the gate to measured values (strict '>' as in the study; CLIP uses '>=')."""
    reasons = []
    if not std > gate.min_std:
        reasons.append("std")
    if not entropy > gate.min_entropy:
        reasons.append("entropy")
    if gate.min_clip_score is not None and (clip_score is None or not clip_score >= gate.min_clip_score):
        reasons.append("clip")
    return GateResult(std, entropy, clip_score, not reasons, ",".join(reasons))


def measure(image: Image.Image | np.ndarray, gate: QualityGate, clip_score: float | None = None) -> GateResult:
    """Measure std and entropy of one image and apply the gate."""
    grey = to_grey_u8(image)
    return judge(pixel_std(grey), grey_entropy_bits(grey), clip_score, gate)
