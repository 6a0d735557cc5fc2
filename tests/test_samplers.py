"""RFS and CAS samplers: the formulas of DESIGN.md "Method details", determinism, DDP shards."""

from __future__ import annotations

import math

import numpy as np
import pytest

from t2id.detect.samplers import (
    CASSampler,
    RFSSampler,
    cas_epoch_draws,
    cas_epoch_indices,
    cas_marginal,
    class_incidence,
    rfs_epoch_indices,
    rfs_marginal,
    rfs_repeat_factors,
)
from t2id.errors import UserError

# A long-tailed, single-label dataset: class c has SIZES[c] images.
SIZES = [1000, 300, 100, 30, 10, 3]


def single_label() -> list[list[int]]:
    return [[c] for c, n in enumerate(SIZES) for _ in range(n)]


def multi_label(n: int = 400, seed: int = 1) -> list[list[int]]:
    """Images holding several classes (like the phantom), incl. duplicate boxes and a few background images."""
    rng = np.random.default_rng(seed)
    freq = np.array([0.9, 0.6, 0.08, 0.95, 0.5, 0.04])
    out = []
    for i in range(n):
        classes = np.flatnonzero(rng.random(6) < freq).tolist()
        out.append(classes + classes[:1] if i % 3 else classes)  # duplicate boxes must not count twice
    return out


# --- RFS -------------------------------------------------------------------------------------

def test_rfs_repeat_factors_match_the_lvis_formula():
    images = multi_label()
    t = 0.3
    factors = rfs_repeat_factors(images, t)
    n = len(images)
    f = np.array([sum(c in set(im) for im in images) / n for c in range(6)])  # fraction of images holding c
    r_c = np.maximum(1.0, np.sqrt(t / f))
    expected = [max((r_c[c] for c in set(im)), default=1.0) for im in images]
    np.testing.assert_allclose(factors, expected, rtol=1e-12)
    assert factors.max() > 2  # the rare classes really are repeated


def test_rfs_epoch_counts_are_stochastic_roundings_with_the_right_expectation():
    factors = rfs_repeat_factors(multi_label(120), 0.5)
    epochs = 3000
    counts = np.stack([np.bincount(rfs_epoch_indices(factors, seed=7, epoch=e), minlength=len(factors))
                       for e in range(epochs)])
    # every epoch: floor(r_i) or ceil(r_i) copies of image i
    assert np.all((counts == np.floor(factors)) | (counts == np.ceil(factors)))
    # over epochs: mean copies = r_i (Bernoulli mean: sd <= 0.5/sqrt(3000) = 0.009; tolerance 0.04 > 4 sd)
    np.testing.assert_allclose(counts.mean(axis=0), factors, atol=0.04)
    lengths = counts.sum(axis=1)
    assert abs(lengths.mean() - factors.sum()) < 0.5  # epoch length = sum of rounded repeats, mean sum(r_i)
    assert lengths.std() > 0  # ...which varies from epoch to epoch


def test_rfs_sampler_has_a_fixed_length_and_keeps_proportions():
    images = multi_label(120)
    sampler = RFSSampler(images, 0.5, seed=3)
    factors = sampler.repeat_factors
    assert len(sampler) == round(factors.sum())
    draws = np.concatenate([list(sampler) for _ in range(400)])
    assert len(draws) == 400 * len(sampler)
    freq = np.bincount(draws, minlength=len(images)) / len(draws)
    np.testing.assert_allclose(freq, rfs_marginal(factors), atol=0.003)


# --- CAS -------------------------------------------------------------------------------------

def test_cas_drawn_classes_and_image_classes_are_close_to_uniform():
    images = single_label()
    length = 60_000
    drawn, indices = cas_epoch_draws(images, seed=0, epoch=0, length=length)
    # Tolerance: 5% of the expected 10000 per class; binomial sd is ~91 (0.9%), so > 5 sd.
    drawn_freq = np.bincount(drawn, minlength=6) / length
    np.testing.assert_allclose(drawn_freq, 1 / 6, rtol=0.05)
    # the drawn image always holds the drawn class
    labels = np.array([im[0] for im in images])
    assert np.array_equal(labels[indices], drawn)
    # counting each drawn image's classes: uniform too, although the data is 333:1 imbalanced
    image_freq = np.bincount(labels[indices], minlength=6) / length
    np.testing.assert_allclose(image_freq, 1 / 6, rtol=0.05)


def test_cas_on_multilabel_images_lifts_rare_classes_to_at_least_a_uniform_share():
    images = multi_label()
    drawn, indices = cas_epoch_draws(images, seed=0, epoch=0, length=30_000)
    np.testing.assert_allclose(np.bincount(drawn, minlength=6) / len(drawn), 1 / 6, rtol=0.06)
    counted = np.zeros(6)
    for i in indices:
        counted[list(set(images[i]))] += 1
    data = np.zeros(6)
    for im in images:
        data[list(set(im))] += 1
    # each class is in at least the draws that chose it (1/6), however rare it is in the data
    assert np.all(counted / len(indices) >= 1 / 6 * 0.95)
    rare = [2, 5]
    assert np.all(counted[rare] / counted.sum() > 2 * data[rare] / data.sum())  # 2% of labels -> 6%


def test_cas_cycles_a_shuffled_list_per_class():
    images = single_label()
    drawn, indices = cas_epoch_draws(images, seed=5, epoch=2, length=2000)
    for c, n in enumerate(SIZES):
        members = set(np.flatnonzero(np.array([im[0] for im in images]) == c).tolist())
        seq = indices[drawn == c]
        for start in range(0, len(seq) - n + 1, n):  # every full pass is a permutation of the class list
            assert sorted(seq[start:start + n].tolist()) == sorted(members)
        if len(seq) >= 2 * n and n > 2:
            assert seq[:n].tolist() != seq[n:2 * n].tolist()  # reshuffled between passes


def test_cas_marginal_matches_the_draw_frequencies():
    images = multi_label(200)
    draws = cas_epoch_indices(images, seed=1, epoch=0, length=200_000)
    freq = np.bincount(draws, minlength=len(images)) / len(draws)
    np.testing.assert_allclose(freq, cas_marginal(images), atol=0.002)
    assert cas_marginal(images)[[i for i, im in enumerate(images) if not im]].sum() == 0  # background never


def test_cas_epoch_length_defaults_to_the_dataset_size():
    images = multi_label(50)
    assert len(cas_epoch_indices(images, seed=0, epoch=0)) == 50
    assert len(CASSampler(images)) == 50
    assert len(CASSampler(images, epoch_size=120)) == 120


# --- torch Samplers: epochs and shards --------------------------------------------------------

@pytest.mark.parametrize("make", [lambda im: RFSSampler(im, 0.5, seed=11), lambda im: CASSampler(im, seed=11)],
                         ids=["rfs", "cas"])
def test_set_epoch_changes_the_order_deterministically(make):
    images = multi_label(80)
    a, b = make(images), make(images)
    a.set_epoch(3)
    b.set_epoch(3)
    epoch3 = list(a)
    assert epoch3 == list(b)  # same seed and epoch -> same order
    b.set_epoch(4)
    assert list(b) != epoch3  # another epoch -> another order
    fresh = make(images)
    first, second = list(fresh), list(fresh)  # without set_epoch, each pass advances the epoch
    assert first != second
    again = make(images)
    again.set_epoch(1)
    assert list(again) == second
    # set_epoch for the epoch whose pass already started is a no-op (prefetching loaders start early)
    again.set_epoch(1)
    assert list(again) != second


@pytest.mark.parametrize("make", [lambda im, **kw: RFSSampler(im, 0.5, seed=2, **kw),
                                  lambda im, **kw: CASSampler(im, seed=2, epoch_size=101, **kw)],
                         ids=["rfs", "cas"])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(make):
    images = multi_label(100)
    full = make(images, num_replicas=1, rank=0)
    ranks = [make(images, num_replicas=2, rank=r) for r in range(2)]
    for s in (full, *ranks):
        s.set_epoch(5)
    epoch = list(full)
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == math.ceil(len(epoch) / 2) == len(ranks[0])
    # positions: rank r holds positions r, r+2, ... of the (padded) epoch -> disjoint, and together all of it
    padded = epoch + epoch[: 2 * len(shards[0]) - len(epoch)]
    interleaved = [x for pair in zip(*shards) for x in pair]
    assert interleaved == padded
    assert len(padded) - len(epoch) < 2  # padding only to a multiple of num_replicas


# --- input errors ----------------------------------------------------------------------------

def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="class ids must be >= 0"):
        class_incidence([[0], [-1]])
    with pytest.raises(UserError, match="out of range"):
        class_incidence([[0], [6]], num_classes=6)
    with pytest.raises(UserError, match="threshold"):
        rfs_repeat_factors([[0]], 0.0)
    with pytest.raises(UserError, match="background"):
        cas_epoch_indices([[], []], seed=0, epoch=0)


def test_uniform_sampler_draws_a_fixed_length_without_replacement_as_far_as_possible():
    from t2id.detect.samplers import UniformSampler, uniform_epoch_indices

    sampler = UniformSampler(10, seed=3, epoch_size=25)
    epoch = sampler.epoch_indices(0)
    assert len(epoch) == len(sampler) == 25
    counts = np.bincount(epoch, minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3  # floor / ceil of 25 / 10
    assert sorted(epoch[:10]) == list(range(10))  # each full pass is a permutation
    assert np.array_equal(uniform_epoch_indices(10, 3, 0, 25), epoch)
    assert not np.array_equal(uniform_epoch_indices(10, 3, 1, 25), epoch)
    assert len(UniformSampler(10, seed=0)) == 10 and np.allclose(sampler.marginal(), 0.1)


def test_rfs_sampler_takes_a_budgeted_epoch_length():
    from t2id.detect.samplers import RFSSampler

    classes = [[0]] * 8 + [[1]]
    sampler = RFSSampler(classes, 0.5, seed=0, epoch_size=9)
    assert len(sampler) == 9 and len(sampler.epoch_indices(0)) == 9
    assert len(RFSSampler(classes, 0.5, seed=0)) == round(sampler.repeat_factors.sum()) > 9
