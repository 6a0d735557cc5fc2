"""Image samplers for imbalanced detection data: repeat factor sampling (RFS) and class-aware sampling (CAS).

Two layers, as everywhere in t2id:

1. Pure, seeded numpy functions. An epoch's order depends only on (data, seed, epoch), so any epoch
   can be recomputed, on any machine and any rank, without carrying state:
   `class_incidence`, `rfs_repeat_factors`, `rfs_epoch_indices`, `class_lists`,
   `cas_epoch_draws`/`cas_epoch_indices`, plus `rfs_marginal`/`cas_marginal` (the probability that one draw picks image i, which the
   detector's mosaic/mixup partner tiles follow, see t2id/detect/trainer.py).
2. `torch.utils.data.Sampler`s around them (`RFSSampler`, `CASSampler`) with a fixed epoch length,
   `set_epoch`, and rank sharding for DistributedDataParallel.

Images are described by the class ids of their boxes (`image_classes[i]`, duplicates allowed);
an image with no boxes is a background image. Everything is vectorized with numpy: a 1M-image
epoch takes well under a second (bench/bench_samplers.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

from t2id.errors import UserError


class Incidence(NamedTuple):
    """Unique class ids per image in CSR form: image i holds class_ids[indptr[i]:indptr[i+1]]."""

    indptr: np.ndarray  # int64[N + 1]
    class_ids: np.ndarray  # int64[nnz], sorted and unique within each image
    num_classes: int

    @property
    def num_images(self) -> int:
        return len(self.indptr) - 1

    def image_of(self) -> np.ndarray:
        """Image index of every entry of class_ids."""
        return np.repeat(np.arange(self.num_images, dtype=np.int64), np.diff(self.indptr))


ImageClasses = Sequence[Sequence[int] | np.ndarray]
ClassInput = ImageClasses | Incidence


# ----------------------------------------------------------------------------------------------
# 1. Pure functions
# ----------------------------------------------------------------------------------------------

def class_incidence(image_classes: ClassInput, num_classes: int | None = None) -> Incidence:
    """Unique class ids per image (CSR). A negative or too-large class id is a UserError.

    Every function below accepts the per-image class lists or an `Incidence` built once by this function.
    """
    if isinstance(image_classes, Incidence):
        if num_classes is not None and num_classes != image_classes.num_classes:
            raise UserError(f"incidence has {image_classes.num_classes} classes, expected {num_classes}.")
        return image_classes
    counts = np.fromiter((len(c) for c in image_classes), dtype=np.int64, count=len(image_classes))
    flat = (np.concatenate([np.asarray(c, dtype=np.int64).ravel() for c in image_classes])
            if counts.sum() else np.zeros(0, dtype=np.int64))
    if flat.size and flat.min() < 0:
        raise UserError(f"class ids must be >= 0, got {int(flat.min())}: fix the dataset labels.")
    inferred = int(flat.max()) + 1 if flat.size else 0
    if num_classes is None:
        num_classes = inferred
    elif inferred > num_classes:
        raise UserError(f"class id {inferred - 1} is out of range for {num_classes} classes: fix the labels or names.")
    image_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    # One key per (image, class) pair; np.unique sorts by image then class and drops duplicate boxes.
    keys = np.unique(image_of * max(num_classes, 1) + flat)
    images, class_ids = np.divmod(keys, max(num_classes, 1))
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(np.bincount(images, minlength=len(counts)), out=indptr[1:])
    return Incidence(indptr, class_ids, num_classes)


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    # A (seed, epoch) pair seeds its own stream: epochs are independent and individually reproducible.
    return np.random.default_rng([int(seed), int(epoch)])


def rfs_repeat_factors(image_classes: ClassInput, threshold: float, num_classes: int | None = None) -> np.ndarray:
    """Per-image repeat factors of repeat factor sampling (LVIS, Gupta et al. 2019, Sec. 4 / Appendix).

    f_c = fraction of images holding class c; class repeat r_c = max(1, sqrt(t / f_c));
    image repeat r_i = max over the classes in image i. Background images get r_i = 1.
    """
    if not threshold > 0:
        raise UserError(f"RFS threshold t must be > 0, got {threshold}: set strategy rfs_threshold.")
    indptr, class_ids, num_classes = class_incidence(image_classes, num_classes)
    n_images = len(indptr) - 1
    if n_images == 0:
        raise UserError("RFS needs at least one training image.")
    freq = np.bincount(class_ids, minlength=num_classes) / n_images
    with np.errstate(divide="ignore"):
        class_repeat = np.maximum(1.0, np.sqrt(threshold / freq))  # inf only for absent classes, never indexed
    repeat = np.ones(n_images, dtype=np.float64)
    labelled = np.diff(indptr) > 0
    if labelled.any():
        # reduceat over each image's slice of class_ids = max over its classes
        repeat[labelled] = np.maximum.reduceat(class_repeat[class_ids], indptr[:-1][labelled])
    return repeat


def rfs_epoch_indices(repeat_factors: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """One RFS epoch: image i appears floor(r_i) or ceil(r_i) times, shuffled.

    Stochastic rounding (LVIS): the extra copy is drawn with probability frac(r_i), so the expected
    number of copies is exactly r_i. Epoch length = the sum of this epoch's rounded repeats; it varies
    from epoch to epoch around sum(r_i).
    """
    r = np.asarray(repeat_factors, dtype=np.float64)
    rng = _epoch_rng(seed, epoch)
    base = np.floor(r)
    copies = (base + (rng.random(r.shape[0]) < (r - base))).astype(np.int64)
    indices = np.repeat(np.arange(r.shape[0], dtype=np.int64), copies)
    rng.shuffle(indices)
    return indices


def rfs_marginal(repeat_factors: np.ndarray) -> np.ndarray:
    """Probability that one RFS draw is image i: r_i / sum(r)."""
    r = np.asarray(repeat_factors, dtype=np.float64)
    return r / r.sum()


class ClassLists(NamedTuple):
    """CAS's per-class image lists, built once: class present[k] holds images[bounds[k]:bounds[k+1]]."""

    present: np.ndarray  # int64[P], classes that have at least one image
    images: np.ndarray  # int64[nnz], image indices grouped by class
    bounds: np.ndarray  # int64[P + 1]
    num_images: int


def class_lists(image_classes: ClassInput | ClassLists, num_classes: int | None = None) -> ClassLists:
    """Group images by class (an image with k classes is in k lists)."""
    if isinstance(image_classes, ClassLists):
        return image_classes
    incidence = class_incidence(image_classes, num_classes)
    counts = np.bincount(incidence.class_ids, minlength=incidence.num_classes)
    present = np.flatnonzero(counts)
    if present.size == 0:
        raise UserError("CAS needs at least one labelled training image; every image is background.")
    # Small ints sort as int16 with numpy's O(n) stable radix sort.
    key = incidence.class_ids.astype(np.int16 if incidence.num_classes < 2**15 else np.int64)
    images = incidence.image_of()[np.argsort(key, kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(counts[present])])
    return ClassLists(present, images, bounds, incidence.num_images)


def cas_epoch_draws(image_classes: ClassInput | ClassLists, seed: int, epoch: int, length: int | None = None,
                    num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One CAS epoch: (drawn class, image index) per draw.

    Class-aware sampling (Shen et al. 2016, "Relay backpropagation", Sec. 4.1; T2ID-CAS Sec. II-B):
    draw a class uniformly among the classes that have images, then take the next image of that
    class from its shuffled list; a list that runs out is reshuffled and starts over (cycling).
    Each epoch starts fresh lists, so an epoch depends only on (seed, epoch).
    Epoch length = `length`, default the number of images. Background images are never drawn.
    """
    lists = class_lists(image_classes, num_classes)
    length = lists.num_images if length is None else int(length)
    if length < 0:
        raise UserError(f"CAS epoch length must be >= 0, got {length}.")
    n_present = lists.present.size
    rng = _epoch_rng(seed, epoch)
    drawn = rng.integers(0, n_present, size=length, dtype=np.int16 if n_present < 2**15 else np.int64)
    # Draw positions grouped by class, each group in draw order (stable radix sort of small ints).
    draw_order = np.argsort(drawn, kind="stable")
    draw_bounds = np.concatenate([[0], np.cumsum(np.bincount(drawn, minlength=n_present))])
    indices = np.empty(length, dtype=np.int64)
    for k in range(n_present):
        positions = draw_order[draw_bounds[k]:draw_bounds[k + 1]]
        if positions.size:
            members = lists.images[lists.bounds[k]:lists.bounds[k + 1]]
            indices[positions] = members[_cycling_shuffles(rng, members.size, positions.size)]
    return lists.present[drawn], indices


def _cycling_shuffles(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """The first `count` items of independent shuffles of range(n) read one after the other."""
    full, rest = divmod(count, n)
    if n >= 1024:  # few passes over a long list: one Fisher-Yates shuffle per pass
        parts = [rng.permutation(n) for _ in range(full)]
    else:  # many passes over a short list: all shuffles at once
        parts = [np.argsort(rng.random((full, n)), axis=1).ravel()] if full else []
    if rest:
        # the first `rest` items of a fresh shuffle = an ordered sample without replacement (same law)
        parts.append(rng.choice(n, size=rest, replace=False))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def cas_epoch_indices(image_classes: ClassInput | ClassLists, seed: int, epoch: int, length: int | None = None,
                      num_classes: int | None = None) -> np.ndarray:
    """Image indices of one CAS epoch (see `cas_epoch_draws`)."""
    return cas_epoch_draws(image_classes, seed, epoch, length, num_classes)[1]


def cas_marginal(image_classes: ClassInput, num_classes: int | None = None) -> np.ndarray:
    """Probability that one CAS draw is image i: sum over its classes c of (1 / #classes) * (1 / #images of c)."""
    indptr, class_ids, num_classes = class_incidence(image_classes, num_classes)
    n_images = len(indptr) - 1
    images_per_class = np.bincount(class_ids, minlength=num_classes)
    n_present = int((images_per_class > 0).sum())
    if n_present == 0:
        raise UserError("CAS needs at least one labelled training image; every image is background.")
    image_of = np.repeat(np.arange(n_images, dtype=np.int64), np.diff(indptr))
    return np.bincount(image_of, weights=1.0 / (n_present * images_per_class[class_ids]), minlength=n_images)


def uniform_epoch_indices(n_images: int, seed: int, epoch: int, length: int | None = None) -> np.ndarray:
    """One uniform epoch of `length` draws (default n_images): shuffles of range(n_images) read one
    after the other, so every image is drawn floor or ceil(length / n_images) times (without
    replacement as far as the length allows). Depends only on (n_images, seed, epoch, length)."""
    if n_images <= 0:
        raise UserError("uniform sampling needs at least one training image.")
    length = n_images if length is None else int(length)
    if length < 0:
        raise UserError(f"epoch length must be >= 0, got {length}.")
    rng = _epoch_rng(seed, epoch)
    full, rest = divmod(length, n_images)
    parts = [rng.permutation(n_images) for _ in range(full)]
    if rest:
        parts.append(rng.permutation(n_images)[:rest])
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def fit_length(indices: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Truncate or pad a shuffled epoch to `length`; padding draws from the epoch itself, so proportions hold."""
    if indices.size >= length:
        return indices[:length]
    if indices.size == 0:
        raise UserError("cannot fill a sampler epoch from an empty index list.")
    return np.concatenate([indices, rng.choice(indices, size=length - indices.size)])


def shard(indices: np.ndarray, rank: int, num_replicas: int) -> np.ndarray:
    """Rank `rank`'s share of an epoch: pad by wrapping to a multiple of num_replicas, then take every
    num_replicas-th index from `rank` (as torch's DistributedSampler does). Shares are disjoint
    positions of the padded epoch and together cover it."""
    total = math.ceil(indices.size / num_replicas) * num_replicas
    if total > indices.size:
        indices = np.concatenate([indices, np.resize(indices, total - indices.size)])
    return indices[rank:total:num_replicas]


# ----------------------------------------------------------------------------------------------
# 2. torch Samplers
# ----------------------------------------------------------------------------------------------

class EpochSampler(Sampler[int]):
    """Base of the seeded epoch samplers: fixed epoch length, `set_epoch`, DDP rank shards.

    Epoch bookkeeping: every `__iter__` uses the current epoch and then advances it by one, because
    ultralytics only calls `set_epoch` under DDP and a prefetching DataLoader starts the next pass
    before the trainer's next `set_epoch`. `set_epoch(e)` chooses the epoch of the next pass,
    except when the pass of epoch e has already started (then it is a no-op, so it never replays).
    """

    def __init__(self, epoch_size: int, seed: int = 0, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.epoch_size = int(epoch_size)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self._started_epoch: int | None = None

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The whole epoch (all ranks), exactly `epoch_size` long."""
        raise NotImplementedError

    def marginal(self) -> np.ndarray:
        """Probability that one draw is image i (what mosaic/mixup partner tiles follow)."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._started_epoch:
            self.epoch = int(epoch)

    def rank_indices(self, epoch: int) -> np.ndarray:
        """This rank's share of `epoch`."""
        return shard(self.epoch_indices(epoch), self.rank, self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        self._started_epoch, self.epoch = epoch, epoch + 1
        return iter(self.rank_indices(epoch).tolist())

    def __len__(self) -> int:
        return math.ceil(self.epoch_size / self.num_replicas)


class UniformSampler(EpochSampler):
    """Uniform sampling with a fixed epoch length (`uniform_epoch_indices`): the unsampled strategies'
    sampler when a compute budget fixes the draws per epoch. Default length: the number of images."""

    def __init__(self, num_images: int, seed: int = 0, epoch_size: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_images <= 0:
            raise UserError("uniform sampling needs at least one training image.")
        self.num_images = int(num_images)
        super().__init__(self.num_images if epoch_size is None else epoch_size, seed, num_replicas, rank)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        return uniform_epoch_indices(self.num_images, self.seed, epoch, self.epoch_size)

    def marginal(self) -> np.ndarray:
        return np.full(self.num_images, 1.0 / self.num_images)


class RFSSampler(EpochSampler):
    """Repeat factor sampling (LVIS).

    Epoch length: the pure `rfs_epoch_indices` epoch is the sum of that epoch's stochastically rounded
    repeats, which varies; a DataLoader needs a fixed length, so this sampler's epoch is `epoch_size`
    draws, default `round(sum(r_i))` (the expected length), truncating the shuffled epoch or padding it
    with extra draws from itself (either keeps the repeat-factor proportions). A compute budget sets
    `epoch_size` so that RFS costs what every other strategy costs. Per rank: ceil(epoch_size / num_replicas).
    """

    def __init__(self, image_classes: ClassInput, threshold: float, seed: int = 0,
                 num_classes: int | None = None, num_replicas: int | None = None, rank: int | None = None,
                 epoch_size: int | None = None) -> None:
        self.repeat_factors = rfs_repeat_factors(image_classes, threshold, num_classes)
        size = int(round(self.repeat_factors.sum())) if epoch_size is None else int(epoch_size)
        super().__init__(size, seed, num_replicas, rank)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        indices = rfs_epoch_indices(self.repeat_factors, self.seed, epoch)
        # A separate stream (offset 2**31) for padding keeps the rounding stream identical to the pure function.
        return fit_length(indices, self.epoch_size, _epoch_rng(self.seed + 2**31, epoch))

    def marginal(self) -> np.ndarray:
        return rfs_marginal(self.repeat_factors)


class CASSampler(EpochSampler):
    """Class-aware sampling (Shen et al. 2016; T2ID-CAS Sec. II-B).

    Epoch length: `epoch_size` draws, default the number of images (so an epoch costs as much as an
    unsampled one). Per rank: ceil(epoch_size / num_replicas).
    """

    def __init__(self, image_classes: ClassInput, seed: int = 0, epoch_size: int | None = None,
                 num_classes: int | None = None, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.incidence = class_incidence(image_classes, num_classes)
        self.lists = class_lists(self.incidence)  # built once, reused by every epoch
        n_images = self.incidence.num_images
        super().__init__(n_images if epoch_size is None else epoch_size, seed, num_replicas, rank)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        return cas_epoch_indices(self.lists, self.seed, epoch, self.epoch_size)

    def marginal(self) -> np.ndarray:
        return cas_marginal(self.incidence)
