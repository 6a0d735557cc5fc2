"""t2id's mAP from stored predictions agrees with pycocotools' COCOeval, and weights behave like
duplicated images (what the image-level bootstrap relies on)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from t2id.detect.coco_map import ImagePredictions, mean_average_precision, prepare

SIZE = 320  # pixels; IoU does not depend on it


def random_images(rng: np.random.Generator, n_images: int, n_classes: int) -> list[ImagePredictions]:
    """Ground truth plus noisy predictions: jittered true boxes (some misclassified), and false positives."""
    images = []
    for _ in range(n_images):
        g = int(rng.integers(0, 5))
        gt_classes = rng.integers(0, n_classes, g)
        gt_boxes = np.column_stack([rng.uniform(0.2, 0.8, (g, 2)), rng.uniform(0.05, 0.3, (g, 2))])
        classes, boxes, scores = [], [], []
        for c, b in zip(gt_classes, gt_boxes):
            if rng.random() < 0.85:
                jitter = b + rng.normal(0, 0.02, 4) * np.array([1, 1, 0.5, 0.5])
                classes.append(c if rng.random() < 0.9 else rng.integers(0, n_classes))
                boxes.append(np.clip(jitter, 0.01, 0.99))
                scores.append(rng.uniform(0.3, 1.0))
        for _ in range(int(rng.integers(0, 4))):
            classes.append(rng.integers(0, n_classes))
            boxes.append(np.concatenate([rng.uniform(0.2, 0.8, 2), rng.uniform(0.05, 0.3, 2)]))
            scores.append(rng.uniform(0.0, 0.7))
        images.append(ImagePredictions(np.asarray(gt_classes, int), gt_boxes.reshape(-1, 4),
                                       np.asarray(classes, int), np.asarray(boxes).reshape(-1, 4),
                                       np.asarray(scores, float)))
    return images


def cocoeval_map(images: list[ImagePredictions], n_classes: int) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):  # centre-normalized -> COCO's top-left pixel box
        return [float((b[0] - b[2] / 2) * SIZE), float((b[1] - b[3] / 2) * SIZE), float(b[2] * SIZE),
                float(b[3] * SIZE)]

    gt = {"images": [{"id": i, "width": SIZE, "height": SIZE} for i in range(len(images))],
          "categories": [{"id": c} for c in range(n_classes)], "annotations": []}
    dets = []
    for i, im in enumerate(images):
        for c, b in zip(im.gt_classes, im.gt_boxes):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": int(c),
                                      "bbox": xywh(b), "area": float(b[2] * b[3] * SIZE * SIZE), "iscrowd": 0})
        for c, b, s in zip(im.classes, im.boxes, im.scores):
            dets.append({"image_id": i, "category_id": int(c), "bbox": xywh(b), "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_cocoeval(seed):
    rng = np.random.default_rng(seed)
    images = random_images(rng, 40, 3)
    ours = mean_average_precision(prepare(images, 3))
    ref50_95, ref50 = cocoeval_map(images, 3)
    assert 0.05 < ref50_95 < 0.95  # a non-trivial case
    assert ours.map50_95 == pytest.approx(ref50_95, abs=0.01)
    assert ours.map50 == pytest.approx(ref50, abs=0.01)


def test_weights_equal_duplicated_images():
    rng = np.random.default_rng(5)
    images = random_images(rng, 12, 2)
    weights = rng.integers(0, 3, len(images))
    duplicated = [im for im, w in zip(images, weights) for _ in range(w)]
    a = mean_average_precision(prepare(images, 2), weights)
    b = mean_average_precision(prepare(duplicated, 2))
    assert a.map50_95 == pytest.approx(b.map50_95, abs=1e-9)
    assert a.map50 == pytest.approx(b.map50, abs=1e-9)


def test_perfect_and_empty_predictions():
    boxes = np.array([[0.5, 0.5, 0.2, 0.2], [0.2, 0.3, 0.1, 0.1]])
    perfect = [ImagePredictions(np.array([0, 1]), boxes, np.array([0, 1]), boxes, np.array([0.9, 0.8]))]
    assert mean_average_precision(prepare(perfect, 2)).map50_95 == pytest.approx(1.0)
    none = [ImagePredictions(np.array([0, 1]), boxes, np.zeros(0, int), np.zeros((0, 4)), np.zeros(0))]
    assert mean_average_precision(prepare(none, 2)).map50_95 == 0.0
    # a class without ground truth is left out of the mean, as COCOeval does
    result = mean_average_precision(prepare(perfect, 3))
    assert np.isnan(result.per_class[2][0]) and result.map50_95 == pytest.approx(1.0)
