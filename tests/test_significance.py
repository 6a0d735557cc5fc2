"""Significance marks under the null stay at or below the nominal 5% for 2, 4 and 5 folds (with and
without seeds); real effects are found when the design can find them; the image-level bootstrap
keeps pairs together."""

from __future__ import annotations

import numpy as np
import pytest

from t2id.significance import PairedFold, min_attainable_p, paired_image_bootstrap, sign_flip_pvalue

ALPHA = 0.05


def test_exact_pvalues_by_hand():
    assert sign_flip_pvalue([1.0, 2.0]) == pytest.approx(0.5)  # 2 of 4 patterns as extreme
    assert sign_flip_pvalue([1.0, 1.0, 1.0, 1.0, 1.0]) == pytest.approx(2 / 32)
    assert sign_flip_pvalue([1.0, -1.0]) == 1.0
    # clustered: (fold, seed) differences of one fold flip together, so 2 folds give 4 patterns
    assert sign_flip_pvalue([1.0, 1.2, 2.0, 2.1], clusters=[0, 0, 1, 1]) == pytest.approx(0.5)
    assert min_attainable_p(4) == pytest.approx(0.125) and min_attainable_p(12) == pytest.approx(2 / 4096)
    with pytest.raises(ValueError, match="finite"):
        sign_flip_pvalue([1.0, float("nan")])


def grid_null(rng: np.random.Generator, folds: int, seeds: int) -> np.ndarray:
    """Null data shaped like a grid: per fold, a symmetric offset between the two strategies (the
    fold's data favours one or the other, with no overall winner), plus training noise per seed."""
    fold_offset = rng.normal(0, 2.0, folds)
    return fold_offset[:, None] + rng.normal(0, 3.0, (folds, seeds))


def mark_rate(folds: int, seeds: int, clustered: bool, cells: int = 1500) -> float:
    rng = np.random.default_rng(folds * 10 + seeds)
    fold_of = np.repeat(np.arange(folds), seeds)
    marks = 0
    for _ in range(cells):
        diffs = grid_null(rng, folds, seeds).ravel()
        p = sign_flip_pvalue(diffs, clusters=fold_of if clustered else None, resamples=2000, seed=1)
        marks += p <= ALPHA
    return marks / cells


@pytest.mark.parametrize(("folds", "seeds"), [(2, 1), (4, 1), (5, 1), (2, 3), (4, 3), (5, 3), (8, 2)])
def test_null_mark_rate_is_at_most_nominal(folds, seeds):
    cells = 1500
    rate = mark_rate(folds, seeds, clustered=True, cells=cells)
    # exact test: P(p <= alpha) <= alpha; 3 binomial standard errors of slack for the simulation
    assert rate <= ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / cells), rate


def test_flipping_seeds_one_by_one_would_be_anticonservative():
    # Why seeds flip with their fold: with fold-level effects, unit-wise flips mark far too often.
    assert mark_rate(4, 3, clustered=False, cells=600) > 0.1


def test_old_fold_bootstrap_was_anticonservative():
    # Documents issue 15's finding with the rule the report used to apply: a percentile bootstrap
    # over 2 fold differences "excludes 0" whenever both agree in sign (about half the time).
    rng = np.random.default_rng(0)
    marks = 0
    for _ in range(2000):
        d = rng.normal(0, 1, 2)
        boot = rng.choice(d, (200, 2)).mean(1)
        lo, hi = np.quantile(boot, [0.025, 0.975])
        marks += lo > 0 or hi < 0
    assert marks / 2000 > 0.4


def test_a_real_effect_is_found_with_enough_folds():
    rng = np.random.default_rng(3)
    fold_of = np.repeat(np.arange(8), 2)
    found = sum(sign_flip_pvalue(3.0 + grid_null(rng, 8, 2).ravel() * 0.3, clusters=fold_of) <= ALPHA
                for _ in range(200))
    assert found / 200 > 0.9


def test_paired_bootstrap_keeps_pairs():
    # a is b plus exactly 0.1 on every resample: pairs kept => a zero-width interval at 0.1.
    scores = np.random.default_rng(0).uniform(0, 1, 30)

    def mean_of(values):
        return lambda w: float(np.dot(w, values) / w.sum())

    fold = PairedFold(30, mean_of(scores + 0.1), mean_of(scores))
    ci = paired_image_bootstrap([fold, fold], resamples=200, seed=1)
    assert ci.mean == pytest.approx(0.1) and ci.low == pytest.approx(0.1) and ci.high == pytest.approx(0.1)
    # unpaired noise widens it
    noisy = PairedFold(30, mean_of(scores), mean_of(np.random.default_rng(1).uniform(0, 1, 30)))
    wide = paired_image_bootstrap([noisy], resamples=300, seed=1)
    assert wide.low < wide.mean < wide.high and wide.resamples == 300
