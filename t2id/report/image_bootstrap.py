"""Image-level paired bootstrap of (strategy - baseline) from the trials' stored predictions.

Each trial (fold, strategy, seed) stored one predictions.parquet row per validation image of its
fold (image_id, gt, pred). Pairs are the same image_id in two strategies' trials of the same fold
and seed. t2id.significance.paired_image_bootstrap resamples each fold's validation images with
replacement, the same resample for both strategies and for every seed of the fold, recomputes the
metric with t2id.detect.coco_map (image weights) and averages the differences over seeds, then over
folds. The interval measures evaluation noise only (which validation images were drawn), not
training noise: it sizes the effect, the sign-flip test (t2id.report.tables.sign_flip) marks it.

Pure: the caller reads the parquet files (t2id.report.build) and passes pandas frames.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from t2id.detect import coco_map
from t2id.report.tables import ALL
from t2id.significance import PairedFold, paired_image_bootstrap

METRICS = ("map50_95", "map50")  # what coco_map recomputes; precision/recall have no image-level bootstrap
Key = tuple[int, str, int]  # (fold, strategy, seed)


class TrialMatches:
    """One trial's predictions, matched once (coco_map.prepare); AP per class for any image weights."""

    def __init__(self, frame: pd.DataFrame, n_classes: int) -> None:
        frame = frame.sort_values("image_id", kind="mergesort")
        self.image_ids = tuple(str(i) for i in frame["image_id"])
        if len(set(self.image_ids)) != len(self.image_ids):
            raise ValueError("predictions hold an image_id twice")
        images = [_image(gt, pred) for gt, pred in zip(frame["gt"], frame["pred"])]
        self.matches = coco_map.prepare(images, n_classes)
        self._cache: dict[bytes, np.ndarray] = {}

    def ap(self, weights: np.ndarray) -> np.ndarray:
        """(n_classes, T) AP per class and IoU threshold; rows of NaN for classes without ground truth."""
        key = np.asarray(weights, dtype=np.int64).tobytes()
        if key not in self._cache:
            self._cache[key] = np.stack([coco_map.average_precision(m, weights) for m in self.matches])
        return self._cache[key]


def _boxes(items, with_conf: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    items = [] if items is None else list(items)
    classes = np.array([int(b["class_id"]) for b in items], dtype=np.int64)
    boxes = np.array([[b["x"], b["y"], b["w"], b["h"]] for b in items], dtype=np.float64).reshape(-1, 4)
    scores = np.array([b["conf"] for b in items], dtype=np.float64) if with_conf else np.zeros(len(items))
    return classes, boxes, scores


def _image(gt, pred) -> coco_map.ImagePredictions:
    gt_classes, gt_boxes, _ = _boxes(gt, False)
    classes, boxes, scores = _boxes(pred, True)
    return coco_map.ImagePredictions(gt_classes, gt_boxes, classes, boxes, scores)


def class_metric(ap: np.ndarray, class_id: int | None, metric: str) -> float:
    """One class's AP (class_id) or the mean over classes with ground truth (None), like coco_map."""
    per_class = ap.mean(axis=1) if metric == "map50_95" else ap[:, 0]
    if class_id is not None:
        return float(per_class[class_id])
    valid = per_class[np.isfinite(per_class)]
    return float(valid.mean()) if valid.size else float("nan")


def _fold_pairs(trials: Mapping[Key, TrialMatches], baseline: str, strategy: str) -> dict[int, list[int]]:
    """fold -> seeds with both strategies' predictions on the same images."""
    out: dict[int, list[int]] = {}
    for fold, name, seed in sorted(trials):
        if name != strategy or (fold, baseline, seed) not in trials:
            continue
        if trials[(fold, name, seed)].image_ids != trials[(fold, baseline, seed)].image_ids:
            raise ValueError(f"fold {fold} seed {seed}: {strategy} and {baseline} were scored on different images")
        out.setdefault(fold, []).append(seed)
    return out


def bootstrap(trials: Mapping[Key, TrialMatches], baseline: str, strategies: list[str], classes: list[str],
              metric: str = "map50_95", resamples: int = 1000, confidence: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Per (strategy, class): the image-level bootstrap interval of the mean paired difference.

    Columns: strategy, class, boot_folds, boot_mean, boot_low, boot_high, boot_resamples (resamples
    whose difference was defined). `classes` are the class names in class-id order.
    """
    if metric not in METRICS:
        raise ValueError(f"the image-level bootstrap recomputes {METRICS}, not {metric!r}")
    out = []
    for strategy in strategies:
        if strategy == baseline:
            continue
        pairs = _fold_pairs(trials, baseline, strategy)
        for name in [ALL, *classes]:
            class_id = None if name == ALL else classes.index(name)
            folds = []
            for fold, seeds in pairs.items():
                a = [trials[(fold, strategy, s)] for s in seeds]
                b = [trials[(fold, baseline, s)] for s in seeds]

                def mean_metric(weights: np.ndarray, side=a) -> float:
                    return float(np.mean([class_metric(t.ap(weights), class_id, metric) for t in side]))

                folds.append(PairedFold(len(a[0].image_ids), mean_metric,
                                        lambda weights, side=b: mean_metric(weights, side)))
            row = {"strategy": strategy, "class": name, "boot_folds": len(folds), "boot_mean": np.nan,
                   "boot_low": np.nan, "boot_high": np.nan, "boot_resamples": 0}
            if folds:
                ci = paired_image_bootstrap(folds, resamples, confidence, seed)
                row.update(boot_mean=ci.mean, boot_low=ci.low, boot_high=ci.high, boot_resamples=ci.resamples)
            out.append(row)
    return pd.DataFrame(out, columns=["strategy", "class", "boot_folds", "boot_mean", "boot_low", "boot_high",
                                      "boot_resamples"])
