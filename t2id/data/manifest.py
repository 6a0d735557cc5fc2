"""Manifest schemas and readers: the tables every stage after `data` reads.

One row per image. Real rows come from the `data` stage (`layout.data.manifest`), synthetic
rows from `generate`/`label` and add provenance columns. Boxes are YOLO-normalized centre
format (x, y = box centre, w, h = box size, all as fractions of the image side).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from t2id import layout
from t2id.errors import UserError

BOX_TYPE = pa.struct([
    pa.field("class_id", pa.int32()),
    pa.field("x", pa.float32()),
    pa.field("y", pa.float32()),
    pa.field("w", pa.float32()),
    pa.field("h", pa.float32()),
])

IMAGE_FIELDS = [
    pa.field("image_id", pa.string()),  # content hash (first 16 hex digits of the file's sha256)
    pa.field("uri", pa.string()),  # the image's key relative to the run root (Store.ref), resolved with Store.key_of
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("group", pa.string()),  # subject id: folds never split a group
    pa.field("source", pa.string()),  # 'real' | 'synthetic'
    pa.field("boxes", pa.list_(BOX_TYPE)),  # empty list = background image
    pa.field("sha256", pa.string()),  # sha256 of the image file bytes
]
IMAGE_SCHEMA = pa.schema(IMAGE_FIELDS)

SYNTHETIC_SCHEMA = pa.schema(IMAGE_FIELDS + [
    pa.field("fold", pa.int32()),  # the fold whose TRAIN part the generator saw
    pa.field("class_id", pa.int32()),  # class the prompt asked for
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("steps", pa.int32()),
    pa.field("guidance", pa.float32()),
    pa.field("scheduler", pa.string()),
    pa.field("base_model", pa.string()),
    pa.field("lora_sha256", pa.string()),
    pa.field("entropy", pa.float32()),  # quality gate inputs (see generate stage for units)
    pa.field("std", pa.float32()),
    pa.field("clip_score", pa.float32()),
    pa.field("kept", pa.bool_()),
    pa.field("reject_reason", pa.string()),  # null when kept
    pa.field("label_source", pa.string()),  # how boxes were obtained (teacher, inpaint, ...)
    # The generator's recipe (lora.method, t2id.lora.methods); null in manifests written before it existed.
    pa.field("method", pa.string()),  # lora | dreambooth_lora | textual_inversion
    pa.field("tokens", pa.string()),  # what the method put in the prompt: identifier / learnt token; null for lora
    pa.field("prior_images", pa.struct([pa.field("count", pa.int32()), pa.field("digest", pa.string())])),
    #                                     dreambooth_lora: the class-prior set the adapter was trained with
    pa.field("requested_boxes", pa.list_(BOX_TYPE)),  # layout_lora: the boxes the prompt asked for (= boxes)
])

QUARANTINE_SCHEMA = pa.schema([
    pa.field("path", pa.string()),  # the rejected file, relative to the dataset root
    pa.field("reason", pa.string()),  # readable reason
])

FOLDS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("fold", pa.int32()),
    pa.field("group", pa.string()),
])


def image_id_of(sha256: str) -> str:
    """The image id of a file with this sha256: 64 bits of content hash, short enough for file names."""
    return sha256[:16]


def load_classes(run_store) -> list[str]:
    """Class names of the run (written by the data stage)."""
    key = layout.data.classes
    if not run_store.exists(key):
        raise UserError(f"{run_store.uri(key)} is missing: run the data stage first (`t2id run CONFIG --only data`)")
    return list(json.loads(run_store.read_text(key))["names"])


def load_manifest(run_store) -> pa.Table:
    """The real-image manifest of the run."""
    key = layout.data.manifest
    if not run_store.exists(key):
        raise UserError(f"{run_store.uri(key)} is missing: run the data stage first (`t2id run CONFIG --only data`)")
    return run_store.read_table(key).select(IMAGE_SCHEMA.names).cast(IMAGE_SCHEMA)


def load_folds(run_store) -> pa.Table:
    """image_id, fold, group of the run's split (FOLDS_SCHEMA)."""
    key = layout.split.folds
    if not run_store.exists(key):
        raise UserError(f"{run_store.uri(key)} is missing: run the split stage first (`t2id run CONFIG --only split`)")
    return run_store.read_table(key)


def available_folds(run_store) -> list[int]:
    """The folds of the run's split, in order."""
    return sorted({int(f) for f in load_folds(run_store)["fold"].to_pylist()})


def select_folds(run_store, wanted: Sequence[int] | None, field: str) -> list[int]:
    """The one fold selector: `wanted` (a config field's value, named by `field` in errors) checked
    against the split, or every fold when it is None."""
    available = available_folds(run_store)
    if wanted is None:
        return available
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise UserError(f"{field}: fold(s) {missing} do not exist; {layout.split.folds} has folds {available}")
    return sorted(set(wanted))


def fold_ids(run_store, fold: int, part: str = "train") -> list[str]:
    """Image ids of a fold's part: 'val' = the images of fold `fold`, 'train' = all other folds."""
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    folds = load_folds(run_store)
    n_folds = int(pc.max(folds["fold"]).as_py()) + 1 if folds.num_rows else 0
    if not 0 <= fold < n_folds:
        raise UserError(f"fold {fold} does not exist: the split has folds 0..{n_folds - 1}")
    in_fold = pc.equal(folds["fold"], fold)
    mask = in_fold if part == "val" else pc.invert(in_fold)
    return folds.filter(mask)["image_id"].to_pylist()


def load_fold_rows(run_store, fold: int, part: str = "train") -> pa.Table:
    """Image rows (IMAGE_SCHEMA) of fold `fold`'s train part (the other folds) or val part (this fold)."""
    ids = fold_ids(run_store, fold, part)
    manifest = load_manifest(run_store)
    rows = manifest.filter(pc.is_in(manifest["image_id"], value_set=pa.array(ids, pa.string())))
    return rows.sort_by([("group", "ascending"), ("image_id", "ascending")])


def class_counts(table: pa.Table, n_classes: int) -> tuple[list[int], list[int]]:
    """(instances per class, images per class) of an image table."""
    instances = [0] * n_classes
    images = [0] * n_classes
    for boxes in table["boxes"].to_pylist():
        seen = set()
        for box in boxes or []:
            cid = box["class_id"]
            if 0 <= cid < n_classes:
                instances[cid] += 1
                seen.add(cid)
        for cid in seen:
            images[cid] += 1
    return instances, images
