"""Class statistics of a manifest: instances and images per class, imbalance ratio, Fig. 2 chart.

The imbalance ratio is max/min instances over classes that occur (the usual definition in the
long-tail literature); a class with no instance is reported separately, since its ratio is
infinite. The chart mirrors the paper's Fig. 2: per class, instances (blue) and images (orange).
"""

from __future__ import annotations

import io

import pyarrow as pa

from t2id.data.manifest import class_counts


def class_stats(manifest: pa.Table, names: list[str]) -> pa.Table:
    instances, images = class_counts(manifest, len(names))
    total = sum(instances) or 1
    return pa.table({
        "class_id": pa.array(range(len(names)), pa.int32()),
        "name": names,
        "instances": pa.array(instances, pa.int64()),
        "images": pa.array(images, pa.int64()),
        "instance_share": pa.array([n / total for n in instances], pa.float64()),
    })


def imbalance_ratio(stats: pa.Table) -> float | None:
    present = [n for n in stats["instances"].to_pylist() if n > 0]
    return max(present) / min(present) if present else None


STATS_COLUMNS = ("class", "instances", "images", "share")


def stats_rows(stats: pa.Table) -> list[tuple]:
    """Rows of the class table (STATS_COLUMNS), most frequent class first."""
    rows = sorted(stats.to_pylist(), key=lambda r: -r["instances"])
    return [(r["name"], r["instances"], r["images"], f"{100 * r['instance_share']:.1f}%") for r in rows]


def stats_notes(stats: pa.Table, n_images: int) -> list[str]:
    """The lines under the class table: image count, imbalance ratio, classes without instances."""
    ratio = imbalance_ratio(stats)
    notes = [f"{n_images} images; imbalance ratio (max/min instances): "
             + (f"{ratio:.1f}" if ratio is not None else "n/a")]
    missing = [r["name"] for r in stats.to_pylist() if r["instances"] == 0]
    if missing:
        notes.append(f"classes without any instance: {', '.join(missing)}")
    return notes


def format_table(stats: pa.Table, n_images: int) -> str:
    """The class table as plain text (what `t2id data check` prints)."""
    rows = stats_rows(stats)
    width = max([len("class")] + [len(r[0]) for r in rows])
    lines = [f"{'class':<{width}}  {'instances':>9}  {'images':>6}  {'share':>6}"]
    lines += [f"{name:<{width}}  {inst:>9}  {imgs:>6}  {share:>6}" for name, inst, imgs, share in rows]
    return "\n".join(lines + stats_notes(stats, n_images))


def class_distribution_png(stats: pa.Table, title: str = "Instances and images per class") -> bytes:
    """Fig. 2-style grouped bar chart, classes sorted by instances (long tail to the right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; DejaVu Sans ships with matplotlib, nothing is downloaded
    import matplotlib.pyplot as plt

    rows = sorted(stats.to_pylist(), key=lambda r: -r["instances"])
    labels = [r["name"] for r in rows]
    xs = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=120)
    bars_i = ax.bar([x - 0.2 for x in xs], [r["instances"] for r in rows], width=0.4,
                    color="#1f77b4", label="instances")
    bars_m = ax.bar([x + 0.2 for x in xs], [r["images"] for r in rows], width=0.4,
                    color="#ff7f0e", label="images")
    for bars in (bars_i, bars_m):
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(xs, labels, rotation=20, ha="right")
    ax.set_ylabel("count")
    ax.set_title(title)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    # No timestamps in the file, so the same stats give the same bytes.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
