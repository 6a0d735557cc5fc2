"""Sampler throughput on a 1M-image, six-class, long-tailed dataset.

Prints indices/s of one epoch of each sampler (pure function and torch Sampler iteration) and the
ratio against a reference measured in the same run: `numpy.random.Generator.permutation` of the same
size (the cost of a plain shuffled epoch). Goal: >= 1M indices/s for the epoch functions.

    .venv/bin/python bench/bench_samplers.py [--images 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from t2id.detect.samplers import (
    CASSampler,
    Incidence,
    RFSSampler,
    cas_epoch_indices,
    rfs_epoch_indices,
    rfs_repeat_factors,
)

# Fraction of images holding each class: long-tailed like the paper's Fig. 2 (strap muscle .. vocal fold).
CLASS_FREQ = np.array([0.35, 0.20, 0.04, 0.95, 0.50, 0.03])


def synthetic_incidence(n_images: int, seed: int = 0) -> Incidence:
    """Per-image class sets drawn independently per class with CLASS_FREQ, as CSR (background allowed)."""
    rng = np.random.default_rng(seed)
    holds = rng.random((n_images, CLASS_FREQ.size)) < CLASS_FREQ  # bool[N, C]
    images, classes = np.nonzero(holds)  # row-major: sorted by image, then class
    indptr = np.zeros(n_images + 1, dtype=np.int64)
    np.cumsum(holds.sum(axis=1), out=indptr[1:])
    return Incidence(indptr, classes.astype(np.int64), CLASS_FREQ.size)


def best_of(fn: Callable[[int], int], repeats: int) -> tuple[float, int]:
    """Fastest of `repeats` calls (epoch = call number); returns (seconds, indices produced)."""
    times, n = [], 0
    for epoch in range(repeats):
        start = time.perf_counter()
        n = fn(epoch)
        times.append(time.perf_counter() - start)
    return min(times), n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.5, help="RFS threshold t")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    incidence = synthetic_incidence(args.images)
    factors = rfs_repeat_factors(incidence, args.threshold)
    rng = np.random.default_rng(0)
    cases: dict[str, Callable[[int], int]] = {
        "reference: numpy permutation": lambda e: rng.permutation(args.images).size,
        "rfs_epoch_indices": lambda e: rfs_epoch_indices(factors, seed=0, epoch=e).size,
        "cas_epoch_indices": lambda e: cas_epoch_indices(incidence, seed=0, epoch=e).size,
    }
    rfs_sampler, cas_sampler = RFSSampler(incidence, args.threshold), CASSampler(incidence)
    cases["RFSSampler (iterate ints)"] = lambda e: sum(1 for _ in rfs_sampler)
    cases["CASSampler (iterate ints)"] = lambda e: sum(1 for _ in cas_sampler)

    print(f"{args.images:,} images, {incidence.class_ids.size:,} (image, class) pairs, "
          f"RFS t={args.threshold}: mean repeat {factors.mean():.3f}")
    ref_rate = None
    for name, fn in cases.items():
        seconds, n = best_of(fn, args.repeats)
        rate = n / seconds
        ref_rate = ref_rate or rate
        goal = "" if name.startswith("reference") else f"  (goal 1M/s: {'met' if rate >= 1e6 else 'MISSED'})"
        print(f"{name:32s} {n:>10,} indices in {seconds * 1e3:8.1f} ms = {rate / 1e6:7.2f} M/s  "
              f"ratio vs reference {rate / ref_rate:5.2f}{goal}")


if __name__ == "__main__":
    main(parse_args())
