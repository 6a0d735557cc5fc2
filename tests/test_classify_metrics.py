"""Classification metrics (t2id.classify.metrics) against scikit-learn on fixed predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score,
                             roc_auc_score)

from t2id.classify.metrics import binary_auc, classification_metrics

K = 4


def reference(y, probs, weights=None):
    pred = probs.argmax(1)
    labels = list(range(K))
    kw = {"sample_weight": weights}
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recall = recall_score(y, pred, labels=labels, average=None, zero_division=np.nan, **kw)
            return {
                "accuracy": accuracy_score(y, pred, **kw),
                "balanced_accuracy": balanced_accuracy_score(y, pred, **kw),
                "macro_f1": f1_score(y, pred, labels=labels, average="macro", zero_division=0, **kw),
                "recall": recall,
                "precision": precision_score(y, pred, labels=labels, average=None, zero_division=0, **kw),
                "f1": f1_score(y, pred, labels=labels, average=None, zero_division=0, **kw),
                "auc": [roc_auc_score(y == c, probs[:, c], sample_weight=weights) if 0 < (y == c).sum() < len(y)
                        else math.nan for c in labels],
            }


def check(y, probs, weights=None):
    overall, per_class = classification_metrics(y, probs, weights)
    ref = reference(y, probs, weights)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert overall[key] == pytest.approx(ref[key], abs=1e-12), key
    for key in ("recall", "precision", "f1", "auc"):
        np.testing.assert_allclose([c[key] for c in per_class], ref[key], atol=1e-12, equal_nan=True, err_msg=key)
    defined = [a for a in ref["auc"] if not math.isnan(a)]
    assert overall["auc"] == pytest.approx(np.mean(defined), abs=1e-12)
    return overall, per_class


# Fixed predictions: ties in scores, a wrong-but-confident image, every class present.
Y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 0, 1])
P = np.array([
    [0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.8, 0.05, 0.05],
    [0.3, 0.3, 0.3, 0.1], [0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25], [0.1, 0.1, 0.2, 0.6],
    [0.1, 0.1, 0.1, 0.7], [0.6, 0.1, 0.1, 0.2], [0.9, 0.05, 0.03, 0.02], [0.2, 0.2, 0.5, 0.1],
])


def test_every_metric_equals_sklearn_when_all_classes_are_present():
    overall, _ = check(Y, P)
    assert overall["auc"] == pytest.approx(roc_auc_score(Y, P, multi_class="ovr", average="macro"), abs=1e-12)


def test_sample_weights_as_the_bootstrap_uses_them():
    weights = np.array([2, 0, 1, 3, 1, 1, 0, 2, 1, 1, 4, 1], float)
    check(Y, P, weights)


def test_a_class_absent_from_the_predictions():
    probs = P.copy()
    probs[:, 3] = 0.0  # class 3 is never predicted: recall 0, precision 0 (zero_division), F1 0
    overall, per_class = check(Y, probs)
    assert per_class[3]["recall"] == 0.0 and per_class[3]["precision"] == 0.0 and per_class[3]["f1"] == 0.0
    assert per_class[3]["auc"] == 0.5  # constant scores: every positive ties with every negative


def test_a_class_absent_from_the_targets_has_no_recall_and_no_auc():
    keep = Y != 3
    y, probs = Y[keep], P[keep]  # class 3 still predicted once (row 7), but never a target
    overall, per_class = check(y, probs)
    assert math.isnan(per_class[3]["recall"]) and math.isnan(per_class[3]["auc"])
    assert per_class[3]["support"] == 0 and per_class[3]["f1"] == 0.0
    # balanced accuracy averages the 3 classes present; AUC the 3 defined one-vs-rest AUCs
    assert overall["balanced_accuracy"] == pytest.approx(np.mean([per_class[c]["recall"] for c in range(3)]))
    assert overall["auc"] == pytest.approx(np.mean([per_class[c]["auc"] for c in range(3)]))


def test_binary_auc_ties_and_degenerate_cases():
    assert binary_auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert binary_auc(np.array([1, 1, 0]), np.array([0.9, 0.1, 0.5])) == 0.5
    assert math.isnan(binary_auc(np.array([1, 1]), np.array([0.2, 0.3])))
