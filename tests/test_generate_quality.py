"""Quality gate of the lung-ultrasound study: std > 30 and entropy > 4.7 bits."""

from __future__ import annotations

import numpy as np
import pytest

from t2id.generate.config import QualityGate
from t2id.generate.quality import grey_entropy_bits, judge, measure, pixel_std, to_grey_u8


def test_flat_image_rejected_for_std_and_entropy():
    flat = np.full((64, 64, 3), 128, np.uint8)
    result = measure(flat, QualityGate())
    assert not result.kept
    assert result.std == 0.0 and result.entropy == 0.0
    assert result.reject_reason.split(",") == ["std", "entropy"]


def test_noisy_image_kept():
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    result = measure(noisy, QualityGate())
    assert result.kept and result.reject_reason == ""
    assert result.std > 30 and result.entropy > 4.7


def test_entropy_is_in_bits_over_256_levels():
    uniform = np.arange(256, dtype=np.uint8).repeat(4).reshape(32, 32)
    assert grey_entropy_bits(uniform) == pytest.approx(8.0)
    halves = np.zeros((10, 10), np.uint8)
    halves[:5] = 255
    assert grey_entropy_bits(halves) == pytest.approx(1.0)
    assert pixel_std(halves) == pytest.approx(127.5)  # population std (eq. 4: 1/N)


def test_two_level_image_fails_entropy_only():
    # High contrast (std 127.5) but only 1 bit of entropy: the study's noise/structure split needs both.
    halves = np.zeros((16, 16), np.uint8)
    halves[:8] = 255
    assert measure(halves, QualityGate()).reject_reason == "entropy"


def test_thresholds_are_strict_and_configurable():
    gate = QualityGate(min_std=30, min_entropy=4.7)
    assert judge(30.0, 5.0, None, gate).reject_reason == "std"  # '>' as in the study
    assert judge(30.01, 4.71, None, gate).kept
    assert judge(10, 1, None, QualityGate(min_std=0, min_entropy=0)).kept


def test_clip_gate_off_by_default_and_on_when_set():
    assert judge(50, 6, None, QualityGate()).kept
    gate = QualityGate(min_clip_score=20.0)
    assert judge(50, 6, 25.0, gate).kept
    assert judge(50, 6, 19.0, gate).reject_reason == "clip"
    assert judge(50, 6, None, gate).reject_reason == "clip"  # no score cannot pass an enabled gate


def test_grey_conversion_rejects_float_pixels():
    with pytest.raises(ValueError, match="uint8"):
        to_grey_u8(np.zeros((4, 4), np.float32))
