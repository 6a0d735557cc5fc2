"""The pure core of `evaluate`: which images each (fold, class) compares, and the Table-I maths.

For fold k and class c:
  real      = fold k's TRAIN real images holding at least one box of c (what the fold's
              generator was fine-tuned on; its val images stay unseen by everything here),
  synthetic = kept rows of fold k's generate manifest with class_id c.
FID and KID compare 2048-d pool3 InceptionV3 features of the two sets; IS uses the synthetic
images' 1008-way logits; CLIP score is each synthetic image against its own prompt.
No Ray and no console here: the stage feeds features in, gets numbers and tables out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from t2id import layout
from t2id.errors import UserError
from t2id.evaluate import metrics
from t2id.store import Store

# Paper Table I, SDXL-LoRA rows (FID, IS, CLIP score), shown beside ours for the same class names.
PAPER_TABLE1 = {
    "vocal fold": (5.54, 17.623, 29.8079),
    "tracheal ring": (16.112, 18.184, 30.4036),
}

METRICS_SCHEMA = pa.schema([
    pa.field("fold", pa.int32()),
    pa.field("class", pa.string()),
    pa.field("class_id", pa.int32()),
    pa.field("fid", pa.float64()),
    pa.field("kid_mean", pa.float64()),
    pa.field("kid_std", pa.float64()),
    pa.field("kid_subset_size", pa.int32()),
    pa.field("is_mean", pa.float64()),
    pa.field("is_std", pa.float64()),
    pa.field("clip_score", pa.float64()),
    pa.field("n_real", pa.int32()),
    pa.field("n_synthetic", pa.int32()),
    pa.field("networks", pa.string()),
    pa.field("synthetic_source", pa.string()),  # which synthetic rows were measured (EvaluateSettings.synthetic_source)
    pa.field("imgsz", pa.int32()),  # both sets were resized to the detector's input (grid.detector.imgsz) first  # REAL_NETWORKS or "stand-in, not comparable (random ...)": networks_note
])

STAND_IN = "stand-in, not comparable"
REAL_NETWORKS = "real weights (FID InceptionV3, CLIP)"


def networks_note(inception_weights: str, clip_weights: str) -> str:
    """What the metric networks are, for every metrics row and table: REAL_NETWORKS (weights from files),
    or the stand-in warning naming the random network(s). Config validation allows 'tiny' (random)
    networks only beside the tiny random generator."""
    random = [name for name, value in (("InceptionV3", inception_weights), ("CLIP", clip_weights)) if value == "tiny"]
    return f"{STAND_IN} (random {' and '.join(random)})" if random else REAL_NETWORKS

class FoldImage(NamedTuple):
    key: str  # what ClassSet rows name it by: image_id (real) or uri (synthetic; ids can repeat across folds)
    sha256: str
    uri: str
    prompt: str | None  # synthetic images are CLIP-scored against their prompt; real ones are not


@dataclass
class ClassSet:
    fold: int
    class_id: int
    name: str
    real: pa.Table  # image rows (image_id, uri, sha256, ...)
    synthetic: pa.Table  # kept synthetic rows of the class


def synthetic_key(fold: int, from_label: bool) -> str:
    """The table of synthetic rows measured for a fold: label's labels.parquet when the label stage
    runs (the detector trains on its kept, boxed rows), else generate's manifest."""
    return layout.label.labels(fold) if from_label else layout.generate.manifest(fold)


def evaluated_folds(store: Store, from_label: bool = False) -> list[int]:
    """Folds of the split with a synthetic table (label's or generate's), in order."""
    from t2id.data.manifest import available_folds

    present = [k for k in available_folds(store) if store.exists(synthetic_key(k, from_label))]
    if not present:
        stage = "label" if from_label else "generate"
        raise UserError(f"no {synthetic_key('<k>', from_label)} in {store.root}: run the {stage} "
                        f"stage first (`t2id run CONFIG --only {stage}`)")
    return present


def real_rows_of_class(rows: pa.Table, class_id: int) -> pa.Table:
    """Image rows holding at least one box of `class_id`."""
    mask = [any(b["class_id"] == class_id for b in (boxes or [])) for boxes in rows["boxes"].to_pylist()]
    return rows.filter(pa.array(mask, pa.bool_()))


def gather_sets(store: Store, folds: list[int], names: list[str], from_label: bool = False) -> list[ClassSet]:
    """The (fold, class) image sets to evaluate; classes are those the fold's generator was asked for.

    Real reference: the fold's VALIDATION images holding the class (the generator never saw them;
    its training images would reward memorization). Synthetic: the rows the detector trains on:
    label's kept rows with boxes when `from_label`, else generate's kept rows."""
    from t2id.data.manifest import load_fold_rows

    sets = []
    for fold in folds:
        key = synthetic_key(fold, from_label)
        manifest = store.read_table(key)
        for column in ("uri", "class_id", "prompt", "kept", "boxes"):
            if column not in manifest.column_names:
                stage = "label" if from_label else "generate"
                raise UserError(f"{store.uri(key)}: column '{column}' is missing; rerun the {stage} stage "
                                f"(`t2id run CONFIG --force {stage}`)")
        kept_mask = pc.fill_null(manifest["kept"], False)
        if from_label:  # a row without boxes teaches nothing about the class: the detector skips it
            kept_mask = pc.and_(kept_mask, pc.greater(pc.fill_null(pc.list_value_length(manifest["boxes"]), 0), 0))
        kept = manifest.filter(kept_mask)
        val = load_fold_rows(store, fold, "val")
        for class_id in sorted(set(manifest["class_id"].to_pylist())):
            if not 0 <= class_id < len(names):
                raise UserError(f"{store.uri(key)}: class_id {class_id} is not in {layout.data.classes} "
                                f"({len(names)} classes)")
            sets.append(ClassSet(fold, class_id, names[class_id], real_rows_of_class(val, class_id),
                                 kept.filter(pc.equal(kept["class_id"], class_id))))
    return sets


def fold_images(sets: list[ClassSet], fold: int) -> dict[str, list[FoldImage]]:
    """A fold's images to extract features of, by cache unit ('real', 'synthetic'), each image once, in order."""
    real: dict[str, FoldImage] = {}
    synthetic: dict[str, FoldImage] = {}
    for s in (s for s in sets if s.fold == fold):
        for r in s.real.select(["image_id", "sha256", "uri"]).to_pylist():
            real.setdefault(r["image_id"], FoldImage(r["image_id"], r["sha256"], r["uri"], None))
        for r in s.synthetic.select(["uri", "sha256", "prompt"]).to_pylist():
            synthetic.setdefault(r["uri"], FoldImage(r["uri"], r["sha256"], r["uri"], r["prompt"] or ""))
    return {"real": list(real.values()), "synthetic": list(synthetic.values())}


def class_metrics(real_pool3: np.ndarray, syn_pool3: np.ndarray, syn_logits: np.ndarray, syn_clip: np.ndarray,
                  kid_subsets: int, kid_subset_size: int, is_splits: int, seed: int) -> dict[str, Any]:
    """All Table-I metrics of one (fold, class); NaN where a set is too small (FID/KID need 2 per side)."""
    n_real, n_syn = len(real_pool3), len(syn_pool3)
    out: dict[str, Any] = {"fid": math.nan, "kid_mean": math.nan, "kid_std": math.nan, "kid_subset_size": 0,
                           "is_mean": math.nan, "is_std": math.nan, "clip_score": math.nan,
                           "n_real": n_real, "n_synthetic": n_syn}
    if n_real >= 2 and n_syn >= 2:
        out["fid"] = metrics.fid(real_pool3, syn_pool3)
        k = metrics.kid(real_pool3, syn_pool3, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        out.update(kid_mean=k.mean, kid_std=k.std, kid_subset_size=k.subset_size)
    if n_syn >= 1:
        if n_syn < is_splits:  # torch-fidelity's rule: a fixed number of splits, never silently fewer
            raise UserError(f"evaluate.is_splits={is_splits} but only {n_syn} synthetic image(s) to score; the "
                            f"Inception Score needs one image per split at least: set evaluate.is_splits <= {n_syn}")
        score = metrics.inception_score(syn_logits, splits=is_splits, seed=seed)
        out.update(is_mean=score.mean, is_std=score.std)
        if np.isfinite(syn_clip).any():
            out["clip_score"] = float(np.nanmean(syn_clip))
    return out


def set_metrics(s: ClassSet, real: list[dict], synthetic: list[dict], kid_subsets: int, kid_subset_size: int,
                is_splits: int, seed: int) -> dict[str, Any]:
    """One metrics row of METRICS_SCHEMA from the features ({pool3, logits, clip}) of a set's images."""
    try:
        values = _class_metrics_of(real, synthetic, kid_subsets, kid_subset_size, is_splits, seed)
    except UserError as exc:
        raise UserError(f"fold {s.fold}, class '{s.name}': {exc}") from None
    return {"fold": s.fold, "class": s.name, "class_id": s.class_id, **values}


def _class_metrics_of(real: list[dict], synthetic: list[dict], kid_subsets: int, kid_subset_size: int,
                      is_splits: int, seed: int) -> dict[str, Any]:
    return class_metrics(
        np.stack([r["pool3"] for r in real]) if real else np.zeros((0, 2048), np.float32),
        np.stack([r["pool3"] for r in synthetic]) if synthetic else np.zeros((0, 2048), np.float32),
        np.stack([r["logits"] for r in synthetic]) if synthetic else np.zeros((0, 1008), np.float32),
        np.array([r["clip"] for r in synthetic], dtype=np.float64),
        kid_subsets, kid_subset_size, is_splits, seed=seed,
    )


def _fmt(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def table1(metrics_table: pa.Table, model: str) -> tuple[str, str]:
    """Table-I-style summary per class (mean ± std over folds): (csv, markdown). With stand-in
    networks every row says so, in the csv's `networks` column and in the markdown's Model cell."""
    import pandas as pd

    df = metrics_table.to_pandas()
    networks = sorted(set(df["networks"])) if "networks" in df and len(df) else [REAL_NETWORKS]
    stand_in = [n for n in networks if n.startswith(STAND_IN)]
    if stand_in:
        model = f"{model} [{STAND_IN}]"
    grouped = df.groupby("class", sort=False)
    summary = pd.DataFrame({
        "model": model,
        "class": list(grouped.groups),
        "folds": grouped["fold"].nunique().to_numpy(),
        "fid_mean": grouped["fid"].mean().to_numpy(), "fid_std": grouped["fid"].std(ddof=1).to_numpy(),
        "kid_mean": grouped["kid_mean"].mean().to_numpy(), "kid_std": grouped["kid_mean"].std(ddof=1).to_numpy(),
        "is_mean": grouped["is_mean"].mean().to_numpy(), "is_std": grouped["is_mean"].std(ddof=1).to_numpy(),
        "clip_mean": grouped["clip_score"].mean().to_numpy(),
        "clip_std": grouped["clip_score"].std(ddof=1).to_numpy(),
        "n_real": grouped["n_real"].sum().to_numpy(), "n_synthetic": grouped["n_synthetic"].sum().to_numpy(),
        "networks": "; ".join(networks),
        "synthetic_source": "; ".join(sorted(set(df["synthetic_source"].dropna()))) if "synthetic_source" in df else "",
    })
    lines = [
        "| Model | Class | Folds | FID ↓ | KID ×10³ ↓ | IS ↑ | CLIP Score ↑ | n real | n synthetic "
        "| Paper FID / IS / CLIP (SDXL-LoRA) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples(index=False):
        paper = PAPER_TABLE1.get(str(row[1]).lower())
        paper_cell = f"{paper[0]} / {paper[1]} / {paper[2]}" if paper else "-"
        lines.append(
            f"| {row.model} | {row[1]} | {row.folds} | {_fmt(row.fid_mean, row.fid_std, 2)} "
            f"| {_fmt(row.kid_mean * 1e3, row.kid_std * 1e3, 2)} | {_fmt(row.is_mean, row.is_std, 3)} "
            f"| {_fmt(row.clip_mean, row.clip_std, 2)} | {row.n_real} | {row.n_synthetic} | {paper_cell} |"
        )
    sources = sorted(set(df["synthetic_source"].dropna())) if "synthetic_source" in df else []
    sizes = sorted({int(v) for v in df["imgsz"].dropna()}) if "imgsz" in df else []
    note = ("\nMean ± std over folds (sample std, ddof=1; one fold: no std). Real reference per fold = that fold's "
            "validation images of the class (the generator never saw them); n counts sum over folds. KID: unbiased "
            "polynomial-kernel MMD², subset size ≤ the smaller set.\n")
    if sources:
        note += f"Synthetic images measured: {'; '.join(sources)}.\n"
    if sizes:
        note += (f"Real and synthetic images were first resized to the detector's input size "
                 f"({', '.join(map(str, sizes))} px, long side) as the detector sees them.\n")
    if stand_in:
        note += (f"\n**Metric networks: {'; '.join(stand_in)}.** Random networks give numbers that mean nothing "
                 f"beside the paper's; `t2id models cache` fetches the real ones.\n")
    return summary.to_csv(index=False), "\n".join(lines) + "\n" + note
