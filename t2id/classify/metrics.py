"""Classification metrics from stored predictions (plain numpy): what the seed papers report, per class and overall.

FU-LoRA reports accuracy, F-score and AUC; the lung-ultrasound study per-class recall (sensitivity)
and balanced figures for its rare 'viral pneumonia' class. Definitions, each equal to scikit-learn's
(tests/test_classify_metrics.py checks them on fixed predictions, with and without sample weights):

  accuracy           sum_i w_i [pred_i = y_i] / sum_i w_i                      (accuracy_score)
  recall_c           TP_c / (TP_c + FN_c); NaN when class c has no target      (recall_score, average=None)
  balanced_accuracy  mean of recall_c over the classes present in the targets  (balanced_accuracy_score)
  precision_c        TP_c / (TP_c + FP_c); 0 when c is never predicted         (zero_division=0)
  f1_c               2 TP_c / (2 TP_c + FP_c + FN_c); 0 when c is neither a target nor predicted
  macro_f1           mean of f1_c over ALL classes of the run                  (f1_score, labels=all, average=macro,
                                                                                 zero_division=0)
  auc_c              one-vs-rest ROC AUC of score p_c for "is class c" (Mann-Whitney U with ties counted
                     one half); NaN when the targets hold no positive or no negative of c: a ROC curve needs
                     both (scikit-learn raises there)
  auc                macro mean of auc_c over the classes where it is defined (equals roc_auc_score(multi_class=
                     "ovr", average="macro") when every class is among the targets)

`pred_i` is argmax_c p_ic (ties: the lowest class id, as numpy's argmax). Weights are whole counts
(the image-level paired bootstrap, t2id.significance) or None for ones.
"""

from __future__ import annotations

import numpy as np

OVERALL = ("accuracy", "balanced_accuracy", "macro_f1", "auc")
PER_CLASS = ("recall", "precision", "f1", "auc", "support")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted confusion matrix [true class, predicted class]."""
    w = np.ones(len(y_true)) if weights is None else np.asarray(weights, float)
    matrix = np.zeros((n_classes, n_classes))
    np.add.at(matrix, (np.asarray(y_true, int), np.asarray(y_pred, int)), w)
    return matrix


def binary_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray | None = None) -> float:
    """ROC AUC = P(score of a positive > score of a negative) + 0.5 P(tie), weighted; NaN without both kinds."""
    w = np.ones(len(score)) if weights is None else np.asarray(weights, float)
    positive = np.asarray(positive, bool)
    w_pos, w_neg = w[positive].sum(), w[~positive].sum()
    if w_pos <= 0 or w_neg <= 0:
        return float("nan")
    # Sort by score; within a run of tied scores a positive beats half of the tied negatives.
    order = np.argsort(score, kind="stable")
    s, p, ww = np.asarray(score, float)[order], positive[order], w[order]
    unique, start = np.unique(s, return_index=True)
    neg_per_value = np.add.reduceat(np.where(p, 0.0, ww), start)
    pos_per_value = np.add.reduceat(np.where(p, ww, 0.0), start)
    neg_below = np.concatenate([[0.0], np.cumsum(neg_per_value)[:-1]])
    wins = pos_per_value * (neg_below + 0.5 * neg_per_value)
    return float(wins.sum() / (w_pos * w_neg))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None,
                           with_auc: bool = True) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(overall metrics, one dict of per-class metrics per class) of class scores `probs` [N, K] for targets `y_true`.
    `with_auc` False skips the AUCs (NaN), the only part that sorts: the bootstrap of another metric needs none."""
    y_true = np.asarray(y_true, int)
    probs = np.asarray(probs, float)
    n_classes = probs.shape[1]
    w = np.ones(len(y_true)) if weights is None else np.asarray(weights, float)
    y_pred = probs.argmax(axis=1) if len(y_true) else np.zeros(0, int)
    cm = confusion(y_true, y_pred, n_classes, w)
    tp = np.diag(cm)
    support = cm.sum(axis=1)  # targets per class
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        denominator = support + predicted  # = 2 TP + FP + FN
        f1 = np.where(denominator > 0, 2 * tp / denominator, 0.0)
    auc = (np.array([binary_auc(y_true == c, probs[:, c], w) for c in range(n_classes)]) if with_auc
           else np.full(n_classes, np.nan))
    total = w.sum()
    overall = {
        "accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "balanced_accuracy": float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan"),
        "macro_f1": float(f1.mean()),
        "auc": float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan"),
    }
    per_class = [{"recall": float(recall[c]), "precision": float(precision[c]), "f1": float(f1[c]),
                  "auc": float(auc[c]), "support": float(support[c])} for c in range(n_classes)]
    return overall, per_class
