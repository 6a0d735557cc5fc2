"""The report's figures as PNG bytes (matplotlib, Agg backend, its bundled DejaVu font only).

Each function takes plain tables (pandas) or images and returns PNG bytes, so it is testable
without a store; `t2id.report.stage` finds the inputs and skips a figure whose inputs are absent.
  class_distribution   paper Fig. 2: instances and images per class (long tail)
  sample_sheet         paper Fig. 3: real vs synthetic images of the rare classes
  pr_curves            paper Fig. 4: PR curves of the rare classes, one line per strategy
  per_class_bars       per-class metric per strategy, mean with std (ddof=1) over folds and seeds as error bars
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display, no GUI toolkit: safe in Ray workers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

RECALL_GRID = np.linspace(0.0, 1.0, 101)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def class_counts(manifest: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Instances and images per class from manifest rows (boxes: list of dicts with class_id)."""
    instances = np.zeros(len(names), dtype=int)
    images = np.zeros(len(names), dtype=int)
    for boxes in manifest["boxes"]:
        ids = [int(b["class_id"]) for b in (boxes if boxes is not None else [])]
        for cid in ids:
            instances[cid] += 1
        for cid in set(ids):
            images[cid] += 1
    return pd.DataFrame({"class": names, "instances": instances, "images": images})


def class_distribution(counts: pd.DataFrame) -> bytes:
    """Paper Fig. 2: instance (blue) and image (orange) counts per class, most frequent first."""
    counts = counts.sort_values("instances", ascending=False)
    x = np.arange(len(counts))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(x - 0.2, counts["instances"], 0.4, label="instances", color="tab:blue")
    ax.bar(x + 0.2, counts["images"], 0.4, label="images", color="tab:orange")
    ax.set_xticks(x, counts["class"], rotation=25, ha="right")
    ax.set_ylabel("count")
    ax.set_title("Class distribution (real data)")
    ax.legend()
    return _png(fig)


def sample_sheet(rows: list[tuple[str, list[Image.Image], list[Image.Image]]], thumb: int = 96) -> bytes:
    """Paper Fig. 3: per class, a row of real images then a row of synthetic ones (rows without images dropped)."""
    lines = [(f"{name}: {kind}", images) for name, real, synthetic in rows
             for kind, images in (("real", real), ("synthetic", synthetic)) if images]
    ncols = max([1, *[len(images) for _, images in lines]])
    fig, axes = plt.subplots(max(1, len(lines)), ncols, figsize=(1.3 * ncols + 0.4, 1.55 * max(1, len(lines))),
                             squeeze=False)
    for i, (label, images) in enumerate(lines):
        for col in range(ncols):
            ax = axes[i][col]
            ax.axis("off")
            if col < len(images):
                ax.imshow(images[col].convert("L").resize((thumb, thumb)), cmap="gray", vmin=0, vmax=255)
        axes[i][0].set_title(label, fontsize=8, loc="left")
    fig.suptitle("Real vs synthetic images of the rare classes", fontsize=10)
    return _png(fig)


def mean_pr_curve(points: pd.DataFrame) -> np.ndarray:
    """Mean over trials (folds, and seeds where recorded) of precision on a common recall grid (monotone
    envelope per trial)."""
    curves = []
    for _, fold_points in points.groupby([c for c in ("fold", "seed") if c in points]):
        fold_points = fold_points.sort_values("recall")
        recall = fold_points["recall"].to_numpy(dtype=float)
        precision = fold_points["precision"].to_numpy(dtype=float)
        if recall.size == 0:
            continue
        envelope = np.flip(np.maximum.accumulate(np.flip(precision)))  # as in VOC/COCO AP
        curves.append(np.interp(RECALL_GRID, recall, envelope, left=envelope[0], right=0.0))
    return np.mean(curves, axis=0) if curves else np.full_like(RECALL_GRID, np.nan)


def pr_curves(curves: pd.DataFrame, classes: list[str], strategies: list[str]) -> bytes:
    """Paper Fig. 4: one panel per rare class, one line per strategy (mean over folds and seeds)."""
    fig, axes = plt.subplots(len(classes), 1, figsize=(6, 3.2 * len(classes)), squeeze=False, layout="constrained")
    for ax, name in zip(axes[:, 0], classes):
        for strategy in strategies:
            sel = curves[(curves["class"] == name) & (curves["strategy"] == strategy)]
            if sel.empty:
                continue
            ax.plot(RECALL_GRID, mean_pr_curve(sel), label=strategy)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"PR curve: {name} (mean over trials)")
        ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def per_class_bars(stats: pd.DataFrame, strategies: list[str], classes: list[str], metric_label: str) -> bytes:
    """Grouped bars: class on x, one bar per strategy, mean (in %) with std (ddof=1) over folds and seeds."""
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(classes) * max(1, len(strategies)) / 3), 4))
    width = 0.8 / max(1, len(strategies))
    x = np.arange(len(classes))
    for i, strategy in enumerate(strategies):
        sel = stats[stats["strategy"] == strategy].set_index("class").reindex(classes)
        ax.bar(x + (i - (len(strategies) - 1) / 2) * width, 100 * sel["mean"].fillna(0),
               width, yerr=100 * sel["std"].fillna(0), label=strategy, capsize=2)
    ax.set_xticks(x, classes, rotation=25, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel(f"{metric_label} (%)")
    ax.set_title(f"{metric_label} per class and strategy (mean ± std over folds and seeds)")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)
