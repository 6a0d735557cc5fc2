"""COCO-style mAP from stored per-image predictions, with image weights for the paired bootstrap.

The reported detection numbers are computed here from each trial's stored predictions, so the
same code gives the table, the image-level bootstrap (t2id.significance) and a check against
pycocotools' COCOeval (tests/test_coco_map.py). It follows COCOeval for boxes, area range "all",
no crowd annotations:
  - per image and class, detections sorted by score, at most `max_dets` kept (COCO: 100);
  - at each IoU threshold 0.50:0.05:0.95, greedy matching in score order: each detection takes the
    unmatched ground truth box of highest IoU >= threshold;
  - per class, all kept detections sorted by score (stable), cumulative TP/FP, precision made
    monotone, sampled at 101 recall points (precision 0 beyond the reached recall); AP is their
    mean; classes without ground truth are left out of the mean.
A bootstrap resample is a weight per image (how often it was drawn): a detection counts with its
image's weight and so does each ground truth box. Matching is per image, so it is done once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True)
class ImagePredictions:
    """One validation image: ground truth and predicted boxes, YOLO-normalized centre format."""

    gt_classes: np.ndarray  # (G,) int
    gt_boxes: np.ndarray  # (G, 4) x, y, w, h (centre), fractions of the image side
    classes: np.ndarray  # (D,) int
    boxes: np.ndarray  # (D, 4) like gt_boxes
    scores: np.ndarray  # (D,) confidence


def _xyxy(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of centre-format boxes (axis scaling leaves IoU unchanged)."""
    a, b = _xyxy(a), _xyxy(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match(gt_boxes: np.ndarray, boxes: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """(D, T) true-positive flags of score-sorted detections against one image's boxes of one class."""
    tp = np.zeros((len(boxes), len(thresholds)), dtype=bool)
    if not len(boxes) or not len(gt_boxes):
        return tp
    ious = box_iou(boxes, gt_boxes)
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(len(gt_boxes), dtype=bool)
        limit = min(threshold, 1 - 1e-10)  # COCOeval's guard
        for d in range(len(boxes)):
            best, best_iou = -1, limit
            for g in range(len(gt_boxes)):
                if not taken[g] and ious[d, g] >= best_iou:
                    best, best_iou = g, ious[d, g]
            if best >= 0:
                taken[best] = True
                tp[d, t] = True
    return tp


@dataclass(frozen=True)
class ClassMatches:
    """Everything AP of one class needs, for any image weighting."""

    scores: np.ndarray  # (D,) kept detections of the class over all images, sorted by score (stable)
    image: np.ndarray  # (D,) image index of each detection
    tp: np.ndarray  # (D, T)
    gt_per_image: np.ndarray  # (N,) ground truth boxes of the class per image


def prepare(images: Sequence[ImagePredictions], n_classes: int, max_dets: int = 100) -> list[ClassMatches]:
    """Match every image once; the result answers AP for any image weights."""
    per_class: list[dict[str, list]] = [{"scores": [], "image": [], "tp": []} for _ in range(n_classes)]
    gt_counts = np.zeros((n_classes, len(images)), dtype=np.int64)
    for i, im in enumerate(images):
        gt_classes = np.asarray(im.gt_classes, dtype=np.int64)
        classes = np.asarray(im.classes, dtype=np.int64)
        scores = np.asarray(im.scores, dtype=np.float64)
        for c in range(n_classes):
            gt = np.asarray(im.gt_boxes, dtype=np.float64).reshape(-1, 4)[gt_classes == c]
            gt_counts[c, i] = len(gt)
            mine = np.flatnonzero(classes == c)
            if not len(mine):
                continue
            order = mine[np.argsort(-scores[mine], kind="mergesort")][:max_dets]
            boxes = np.asarray(im.boxes, dtype=np.float64).reshape(-1, 4)[order]
            per_class[c]["scores"].append(scores[order])
            per_class[c]["image"].append(np.full(len(order), i))
            per_class[c]["tp"].append(match(gt, boxes))
    out = []
    for c in range(n_classes):
        parts = per_class[c]
        if parts["scores"]:
            scores = np.concatenate(parts["scores"])
            order = np.argsort(-scores, kind="mergesort")
            out.append(ClassMatches(scores[order], np.concatenate(parts["image"])[order],
                                    np.concatenate(parts["tp"])[order], gt_counts[c]))
        else:
            out.append(ClassMatches(np.zeros(0), np.zeros(0, np.int64), np.zeros((0, len(IOU_THRESHOLDS)), bool),
                                    gt_counts[c]))
    return out


def average_precision(m: ClassMatches, weights: np.ndarray | None = None) -> np.ndarray:
    """AP at each IoU threshold (shape (T,)); NaN when the class has no ground truth in the sample."""
    w_img = np.ones(len(m.gt_per_image)) if weights is None else np.asarray(weights, dtype=np.float64)
    n_gt = float(np.dot(w_img, m.gt_per_image))
    if n_gt <= 0:
        return np.full(len(IOU_THRESHOLDS), np.nan)
    w = w_img[m.image]
    keep = w > 0
    w, tp = w[keep], m.tp[keep]
    ap = np.zeros(len(IOU_THRESHOLDS))
    if not len(w):
        return ap
    tps = np.cumsum(tp * w[:, None], axis=0)
    fps = np.cumsum(~tp * w[:, None], axis=0)
    for t in range(len(IOU_THRESHOLDS)):
        recall = tps[:, t] / n_gt
        precision = tps[:, t] / np.maximum(tps[:, t] + fps[:, t], np.finfo(np.float64).eps)
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone from the right
        idx = np.searchsorted(recall, RECALL_POINTS, side="left")
        sampled = np.where(idx < len(recall), precision[np.minimum(idx, len(recall) - 1)], 0.0)
        ap[t] = sampled.mean()
    return ap


@dataclass(frozen=True)
class MapResult:
    map50_95: float  # mean over classes with ground truth of mean AP over IoU 0.50:0.95
    map50: float
    per_class: dict[int, tuple[float, float]]  # class id -> (AP50-95, AP50); NaN without ground truth


def mean_average_precision(matches: Sequence[ClassMatches], weights: np.ndarray | None = None,
                           classes: Sequence[int] | None = None) -> MapResult:
    """mAP over `classes` (default all) for the given image weights."""
    chosen = range(len(matches)) if classes is None else classes
    per_class = {}
    for c in chosen:
        ap = average_precision(matches[c], weights)
        per_class[c] = (float(np.mean(ap)), float(ap[0]))
    valid = [v for v in per_class.values() if np.isfinite(v[0])]
    if not valid:
        return MapResult(float("nan"), float("nan"), per_class)
    return MapResult(float(np.mean([v[0] for v in valid])), float(np.mean([v[1] for v in valid])), per_class)
