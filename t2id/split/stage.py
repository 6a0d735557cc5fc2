"""Stage `split`: subject-grouped, class-stratified k-fold over the data manifest.

Writes split/folds.parquet (image_id, fold, group) and split/fold_classes.parquet (per fold and
class: instances, images, subjects). Seeded with run.seed, so reruns give the same folds.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
from rich.table import Table

from t2id.data.manifest import FOLD_CLASSES_KEY, FOLDS_KEY, FOLDS_SCHEMA, class_counts, load_classes, load_manifest
from t2id.runner import Stage, StageContext, StageResult, console
from t2id.split.folds import assert_no_leak, assign_folds, check_feasible


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


def fold_table_view(table: pa.Table, image_folds: list[int], folds_of: dict[str, int], names: list[str],
                    k: int) -> Table:
    """Instances per fold and class, as printed after the split."""
    view = Table(title="instances per fold (subject-grouped)", title_justify="left")
    for column in ["fold", "images", "subjects", *names]:
        view.add_column(column, justify="right")
    rows = table.to_pylist()
    for fold in range(k):
        per = [r for r in rows if r["fold"] == fold]
        view.add_row(str(fold), str(image_folds.count(fold)), str(list(folds_of.values()).count(fold)),
                     *(str(r["instances"]) for r in per))
    return view


def run(ctx: StageContext) -> StageResult:
    k = ctx.config.split.folds
    names = load_classes(ctx.store)
    manifest = load_manifest(ctx.store)
    per_group, sizes = group_class_matrix(manifest, len(names))
    check_feasible(per_group, names, k)
    folds_of = assign_folds(per_group, sizes, k, seed=ctx.config.run.seed, stratify=ctx.config.split.stratify)

    ids = manifest["image_id"].to_pylist()
    groups = manifest["group"].to_pylist()
    image_folds = [folds_of[g] for g in groups]
    assert_no_leak(groups, image_folds)
    folds = pa.table({"image_id": ids, "fold": pa.array(image_folds, pa.int32()), "group": groups},
                     schema=FOLDS_SCHEMA).sort_by([("fold", "ascending"), ("group", "ascending"),
                                                   ("image_id", "ascending")])
    table = fold_class_table(manifest, folds_of, names, k)

    console.print(fold_table_view(table, image_folds, folds_of, names, k))

    outputs = {
        FOLDS_KEY: ctx.store.write_table(FOLDS_KEY, folds),
        FOLD_CLASSES_KEY: ctx.store.write_table(FOLD_CLASSES_KEY, table),
    }
    summary = {
        "folds": k,
        "images_per_fold": [sum(1 for f in image_folds if f == fold) for fold in range(k)],
        "subjects_per_fold": [sum(1 for f in folds_of.values() if f == fold) for fold in range(k)],
    }
    return StageResult(outputs=outputs, summary=summary)


STAGE = Stage(name="split", sections=("split",), depends_on=("data",), run=run)
