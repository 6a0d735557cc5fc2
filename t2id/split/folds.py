"""Subject-grouped, class-stratified k-fold assignment (pure; no I/O).

Frames of one subject are near-duplicates (a cine loop), so a subject's images must all sit in
one fold or validation scores leak. Within that constraint, class proportions per fold should be
as even as the groups allow, most of all for the rare classes (their per-class mAP is the point
of the paper's Table II).

Greedy, in the spirit of scikit-learn's StratifiedGroupKFold, adapted to multi-label images:
  1. count, per group, the images holding each class;
  2. order groups so that those holding the rarest classes come first (rarest class first, then
     bigger groups first; ties broken by a seeded shuffle);
  3. put each group into the fold where it increases the squared relative deviation from the
     per-class target (total/k) the least, plus the same term for the fold size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from t2id.errors import UserError


def check_feasible(group_class_images: dict[str, np.ndarray], names: Sequence[str], folds: int) -> None:
    """Every class needs >= `folds` subjects, else some fold cannot validate it."""
    groups = len(group_class_images)
    if groups < folds:
        raise UserError(f"split.folds={folds} but the dataset has only {groups} subject(s); "
                        f"set split.folds <= {groups} or add subjects")
    if not group_class_images:
        return
    matrix = np.stack(list(group_class_images.values()))
    subjects_per_class = (matrix > 0).sum(axis=0)
    short = [(names[c], int(n)) for c, n in enumerate(subjects_per_class) if n < folds]
    if short:
        listing = ", ".join(f"'{name}' in {n} subject(s)" for name, n in short)
        smallest = min(n for _, n in short)
        fix = (f"set split.folds <= {smallest} or add subjects with these classes" if smallest >= 2 else
               "add subjects with these classes, or remove them from the labels and data.class_names")
        raise UserError(f"split.folds={folds} needs every class in at least {folds} subjects, but {listing}; {fix}")


def assign_folds(group_class_images: dict[str, np.ndarray], group_sizes: dict[str, int], folds: int,
                 seed: int = 0, stratify: bool = True) -> dict[str, int]:
    """group -> fold. `group_class_images[g][c]` = images of group g holding class c."""
    groups = sorted(group_class_images)
    if len(groups) < folds:
        raise UserError(f"split.folds={folds} but the dataset has only {len(groups)} subject(s); "
                        f"set split.folds <= {len(groups)} or add subjects")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(groups)))  # seeded tie-break
    n_classes = len(next(iter(group_class_images.values()))) if groups else 0
    counts = np.stack([group_class_images[g] for g in groups]).astype(float) if groups else np.zeros((0, 0))
    sizes = np.array([group_sizes[g] for g in groups], float)
    totals = counts.sum(axis=0)
    class_freq = np.where(totals > 0, totals, np.inf)

    def rarity(i: int) -> float:
        present = counts[i] > 0
        return float(class_freq[present].min()) if stratify and present.any() else np.inf

    order.sort(key=lambda i: (rarity(i), -sizes[i]))  # stable: the seeded permutation breaks ties

    target_c = np.maximum(totals / folds, 1e-9)
    target_n = max(sizes.sum() / folds, 1e-9)
    fold_counts = np.zeros((folds, n_classes))
    fold_sizes = np.zeros(folds)
    fold_order = rng.permutation(folds)  # which fold wins exact ties
    assignment: dict[str, int] = {}
    for i in order:
        best, best_cost = None, None
        for f in fold_order:
            if stratify:
                before = ((fold_counts[f] - target_c) / target_c) ** 2
                after = ((fold_counts[f] + counts[i] - target_c) / target_c) ** 2
                cost = float((after - before).sum())
            else:
                cost = 0.0
            cost += (((fold_sizes[f] + sizes[i] - target_n) / target_n) ** 2
                     - ((fold_sizes[f] - target_n) / target_n) ** 2)
            if best_cost is None or cost < best_cost - 1e-12:
                best, best_cost = int(f), cost
        assignment[groups[i]] = best
        fold_counts[best] += counts[i]
        fold_sizes[best] += sizes[i]
    # A fold without groups is possible with very uneven groups: give it the smallest group of
    # the fold holding the most groups (len(groups) >= folds guarantees a donor exists).
    for f in range(folds):
        members = {k: [g for g, a in assignment.items() if a == k] for k in range(folds)}
        if not members[f]:
            donor = max(members, key=lambda k: len(members[k]))
            assignment[min(members[donor], key=lambda g: (group_sizes[g], g))] = f
    return assignment


def assert_no_leak(image_groups: Sequence[str], image_folds: Sequence[int]) -> None:
    """Raise if any subject has images in two folds (checked right before folds are written)."""
    seen: dict[str, int] = {}
    for group, fold in zip(image_groups, image_folds):
        if seen.setdefault(group, fold) != fold:
            raise AssertionError(f"subject {group!r} is in folds {seen[group]} and {fold}: folds would leak")
