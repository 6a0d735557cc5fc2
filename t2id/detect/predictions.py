"""A trial's per-image predictions on its validation fold (the grid's predictions.parquet), and the
COCO mAP computed from them (t2id.detect.coco_map).

One row per validation image, every one of them (also images without boxes or predictions):
  image_id: string
  gt:   list<struct<class_id:int32, x:float32, y:float32, w:float32, h:float32>>
  pred: list<struct<class_id:int32, x:float32, y:float32, w:float32, h:float32, conf:float32>>
Boxes are YOLO-normalized centre format (fractions of the original image's width/height); `pred`
holds the final model's detections at conf >= 0.001, at most 300 per image, highest confidence first.
The trial's reported mAP50-95 / mAP50 (all classes and per class) are computed from this table, so
the stored file, the table and a pycocotools check (tests/test_detect.py) agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from t2id.detect.coco_map import ImagePredictions, MapResult, mean_average_precision, prepare

CONF = 0.001  # the lowest confidence kept (ultralytics' and COCO's validation setting)
MAX_DET = 300  # detections stored per image; COCO's AP counts the best 100 (coco_map.prepare)
COCO_MAX_DETS = 100

_BOX = [("class_id", pa.int32()), ("x", pa.float32()), ("y", pa.float32()), ("w", pa.float32()),
        ("h", pa.float32())]
GT_TYPE = pa.list_(pa.struct(_BOX))
PRED_TYPE = pa.list_(pa.struct([*_BOX, ("conf", pa.float32())]))
SCHEMA = pa.schema([("image_id", pa.string()), ("gt", GT_TYPE), ("pred", PRED_TYPE)])


def table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """predictions.parquet's table from rows {image_id, gt: [box], pred: [box + conf]}, sorted by image_id."""
    return pa.Table.from_pylist(sorted(rows, key=lambda r: r["image_id"]), schema=SCHEMA)


def images(predictions: pa.Table) -> list[ImagePredictions]:
    """coco_map's per-image inputs, in the table's row order (the bootstrap's image index)."""
    out = []
    for row in predictions.select(["gt", "pred"]).to_pylist():
        gt, pred = row["gt"] or [], row["pred"] or []
        out.append(ImagePredictions(
            gt_classes=np.array([b["class_id"] for b in gt], dtype=np.int64),
            gt_boxes=np.array([[b["x"], b["y"], b["w"], b["h"]] for b in gt], dtype=np.float64).reshape(-1, 4),
            classes=np.array([b["class_id"] for b in pred], dtype=np.int64),
            boxes=np.array([[b["x"], b["y"], b["w"], b["h"]] for b in pred], dtype=np.float64).reshape(-1, 4),
            scores=np.array([b["conf"] for b in pred], dtype=np.float64),
        ))
    return out


def coco_map(predictions: pa.Table, n_classes: int) -> MapResult:
    """COCO mAP50-95 / mAP50 over all classes with ground truth, and per class (NaN without ground truth)."""
    return mean_average_precision(prepare(images(predictions), n_classes, max_dets=COCO_MAX_DETS))
