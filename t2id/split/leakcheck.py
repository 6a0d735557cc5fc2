"""The subject-leak check, computed independently of the split's own group -> fold table.

`split/folds.parquet` carries a `group` column copied from the assignment the split made; checking
that column against itself cannot fail. This check instead joins the DATA manifest's `group` (the
subject the import resolved for each image) with folds.parquet's `fold` per `image_id`, ignoring
folds.parquet's `group`: every subject must sit in exactly one fold, and every image of the
manifest must have a fold. The split stage runs it on what it has just written; the report states
its result.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa

from t2id.data.manifest import load_folds, load_manifest


@dataclass(frozen=True)
class LeakCheck:
    subjects: int  # subjects in the data manifest
    several_folds: dict[str, list[int]] = field(default_factory=dict)  # subject -> its folds (>= 2)
    images_without_fold: list[str] = field(default_factory=list)  # manifest image_ids missing from the folds

    @property
    def ok(self) -> bool:
        return not self.several_folds and not self.images_without_fold

    def describe(self) -> str:
        if self.ok:
            return f"subjects in more than one fold: 0 of {self.subjects} (data manifest vs folds)"
        parts = []
        if self.several_folds:
            listed = ", ".join(f"{s!r} in folds {f}" for s, f in list(self.several_folds.items())[:5])
            more = f" (+{len(self.several_folds) - 5} more)" if len(self.several_folds) > 5 else ""
            parts.append(f"{len(self.several_folds)} of {self.subjects} subjects in more than one fold: {listed}{more}")
        if self.images_without_fold:
            parts.append(f"{len(self.images_without_fold)} manifest image(s) without a fold "
                         f"(e.g. {self.images_without_fold[0]})")
        return "; ".join(parts)


def check_tables(manifest: pa.Table, folds: pa.Table) -> LeakCheck:
    """Pure: the manifest's image_id -> group joined with folds' image_id -> fold."""
    fold_of = dict(zip(folds["image_id"].to_pylist(), folds["fold"].to_pylist()))
    folds_of: dict[str, set[int]] = defaultdict(set)
    missing: list[str] = []
    for image_id, group in zip(manifest["image_id"].to_pylist(), manifest["group"].to_pylist()):
        fold = fold_of.get(image_id)
        if fold is None:
            missing.append(image_id)
        else:
            folds_of[group].add(int(fold))
    subjects = set(manifest["group"].to_pylist())
    several = {g: sorted(f) for g, f in sorted(folds_of.items()) if len(f) > 1}
    return LeakCheck(subjects=len(subjects), several_folds=several, images_without_fold=sorted(missing))


def leak_check(store) -> LeakCheck:
    """The check on a run's store (layout.data.manifest against layout.split.folds)."""
    return check_tables(load_manifest(store), load_folds(store))


def subjects_in_several_folds(store) -> dict[str, list[int]]:
    """subject -> its folds, for every subject of the data manifest found in more than one fold."""
    return leak_check(store).several_folds
