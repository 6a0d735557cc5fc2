"""Stage `split`: subject-grouped, class-stratified k-fold over the data manifest.

Writes layout.split.folds (image_id, fold, group) and layout.split.fold_classes (per fold and
class: instances, images, subjects). Seeded with run.seed, so reruns give the same folds.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from t2id import layout
from t2id.data.manifest import FOLDS_SCHEMA, class_counts, load_classes, load_manifest
from t2id.runner import Stage, StageContext, StageResult
from t2id.split.folds import assert_no_leak, assign_folds, check_feasible
from t2id.split.leakcheck import leak_check
from t2id.split.settings import SplitSettings, settings


def group_class_matrix(manifest: pa.Table, n_classes: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    per_group: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(n_classes, np.int64))
    sizes: dict[str, int] = defaultdict(int)
    for group, boxes in zip(manifest["group"].to_pylist(), manifest["boxes"].to_pylist()):
        sizes[group] += 1
        vec = per_group[group]
        for cid in {b["class_id"] for b in boxes or []}:
            vec[cid] += 1
    return dict(per_group), dict(sizes)


def fold_class_table(manifest: pa.Table, folds_of: dict[str, int], names: list[str], k: int) -> pa.Table:
    rows: dict[str, list] = defaultdict(list)
    groups = np.array(manifest["group"].to_pylist(), dtype=object)
    image_folds = np.array([folds_of[g] for g in groups], dtype=np.int64)
    for fold in range(k):
        part = manifest.filter(pa.array(image_folds == fold))
        instances, images = class_counts(part, len(names))
        part_groups = part["group"].to_pylist()
        for cid, name in enumerate(names):
            subjects = {g for g, bx in zip(part_groups, part["boxes"].to_pylist())
                        if any(b["class_id"] == cid for b in bx or [])}
            rows["fold"].append(fold)
            rows["class_id"].append(cid)
            rows["name"].append(name)
            rows["instances"].append(instances[cid])
            rows["images"].append(images[cid])
            rows["subjects"].append(len(subjects))
    return pa.table({
        "fold": pa.array(rows["fold"], pa.int32()),
        "class_id": pa.array(rows["class_id"], pa.int32()),
        "name": rows["name"],
        "instances": pa.array(rows["instances"], pa.int64()),
        "images": pa.array(rows["images"], pa.int64()),
        "subjects": pa.array(rows["subjects"], pa.int64()),
    })


def fold_table_rows(table: pa.Table, image_folds: list[int], folds_of: dict[str, int], k: int) -> list[list]:
    """Per fold: images, subjects and instances of each class (columns: fold, images, subjects, *names)."""
    rows = table.to_pylist()
    subject_folds = list(folds_of.values())
    return [[fold, image_folds.count(fold), subject_folds.count(fold),
             *(r["instances"] for r in rows if r["fold"] == fold)] for fold in range(k)]


def run(ctx: StageContext, s: SplitSettings) -> StageResult:
    k = s.split.folds
    names = load_classes(ctx.store)
    manifest = load_manifest(ctx.store)
    per_group, sizes = group_class_matrix(manifest, len(names))
    check_feasible(per_group, names, k)
    folds_of = assign_folds(per_group, sizes, k, seed=s.run_seed, stratify=s.split.stratify)

    ids = manifest["image_id"].to_pylist()
    groups = manifest["group"].to_pylist()
    image_folds = [folds_of[g] for g in groups]
    assert_no_leak(groups, image_folds)
    folds = pa.table({"image_id": ids, "fold": pa.array(image_folds, pa.int32()), "group": groups},
                     schema=FOLDS_SCHEMA).sort_by([("fold", "ascending"), ("group", "ascending"),
                                                   ("image_id", "ascending")])
    table = fold_class_table(manifest, folds_of, names, k)
    ctx.events.table("instances per fold (subject-grouped)", ["fold", "images", "subjects", *names],
                     fold_table_rows(table, image_folds, folds_of, k))

    outputs = {
        layout.split.folds: ctx.store.write_table(layout.split.folds, folds),
        layout.split.fold_classes: ctx.store.write_table(layout.split.fold_classes, table),
    }
    # Independent of folds_of: the data manifest's subjects against the folds as written.
    leaks = leak_check(ctx.store)
    if not leaks.ok:
        raise AssertionError(f"split wrote leaking folds: {leaks.describe()}")
    ctx.events.info(leaks.describe())
    summary = {
        "folds": k,
        "images_per_fold": [image_folds.count(fold) for fold in range(k)],
        "subjects_per_fold": [list(folds_of.values()).count(fold) for fold in range(k)],
        "subjects_in_several_folds": len(leaks.several_folds),
    }
    return StageResult(outputs=outputs, summary=summary)


STAGE = Stage(name="split", settings=settings, depends_on=("data",), run=run)
