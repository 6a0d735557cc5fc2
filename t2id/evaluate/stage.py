"""Stage `evaluate`: FID, KID, Inception Score and CLIP score per fold and target class (paper Table I).

For fold k and class c:
  real      = fold k's TRAIN real images holding at least one box of c (what the fold's
              generator was fine-tuned on; its val images stay unseen by everything here),
  synthetic = kept rows of generate/fold=<k>/manifest.parquet with class_id c.
FID and KID compare 2048-d pool3 InceptionV3 features of the two sets; IS uses the synthetic
images' 1008-way logits; CLIP score is each synthetic image against its own prompt.

Steps:
  1. resolve and check the weights on the driver (a missing file is a UserError naming the key);
  2. gather the image sets; reuse the per-fold features cached in the store
     (evaluate/cache/fold=<k>/{real,synthetic}_features.parquet) while the weights and the
     image bytes are unchanged, so changing KID/IS settings or rerunning never re-extracts;
  3. extract what is missing in one Ray Data pass (an actor per GPU, or one CPU actor);
  4. compute the metrics (pure maths in t2id.evaluate.metrics), write metrics.parquet and
     a Table-I-style table (csv + markdown).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from t2id.errors import UserError
from t2id.evaluate import metrics
from t2id.runner import Stage, StageContext, StageResult
from t2id.store import Store, sha256_file

METRICS_KEY = "evaluate/metrics.parquet"
TABLE_CSV_KEY = "evaluate/table1.csv"
TABLE_MD_KEY = "evaluate/table1.md"
REAL_CACHE_KEY = "evaluate/cache/fold={fold}/real_features.parquet"
SYN_CACHE_KEY = "evaluate/cache/fold={fold}/synthetic_features.parquet"
GENERATE_MANIFEST_KEY = "generate/fold={fold}/manifest.parquet"

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
])

CACHE_SCHEMA = pa.schema([  # per-fold feature cache; id = image_id (real) or uri (synthetic)
    pa.field("id", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("pool3", pa.list_(pa.float32())),
    pa.field("logits", pa.list_(pa.float32())),  # synthetic only (Inception Score)
    pa.field("clip", pa.float64()),  # synthetic only
])


# ---------------------------------------------------------------- Ray Data callable (thin layer)
class FeatureBatch:
    """Ray Data callable: image URIs (+ prompts) -> pool3, IS logits and CLIP score per row.

    Loads the models once per actor. Only rows with `score_clip` (synthetic images) get a CLIP score.
    """

    def __init__(self, store: Store, inception: str, clip: str, cache_dir: str, device: str,
                 batch_size: int, endpoint_url: str | None = None) -> None:
        from t2id.evaluate.features import load_inception, resolve_inception

        self.store = store
        self.device = device
        self.batch_size = batch_size
        self.inception = load_inception(resolve_inception(inception, Path(cache_dir), endpoint_url), device)
        self.clip_source, self.cache_dir, self.endpoint_url = clip, cache_dir, endpoint_url
        self._clip = None

    def _clip_scorer(self):
        if self._clip is None:  # only actors that see synthetic rows load CLIP
            from t2id.evaluate.clip_score import ClipScorer

            self._clip = ClipScorer(self.clip_source, self.cache_dir, self.device, self.endpoint_url,
                                    batch_size=self.batch_size)
        return self._clip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import io

        from PIL import Image

        from t2id.evaluate.features import extract_features

        uris = [str(u) for u in batch["uri"]]
        prompts = [str(p) for p in batch["prompt"]]
        images = []
        for uri in uris:
            with Image.open(io.BytesIO(self.store.read_bytes(self.store.key_of(uri)))) as im:
                images.append(im.convert("RGB"))
        pool3, logits = extract_features(self.inception, images, self.batch_size, self.device)
        clip = np.full(len(uris), np.nan)
        with_prompt = [i for i, flag in enumerate(batch["score_clip"]) if flag]
        if with_prompt:
            clip[with_prompt] = self._clip_scorer()([images[i] for i in with_prompt],
                                                    [prompts[i] for i in with_prompt])
        return {"uri": np.array(uris, dtype=object), "pool3": pool3, "logits": logits, "clip": clip}


def _device_and_gpus(device: str) -> tuple[str, float]:
    """Resolve evaluate.device against the Ray cluster: ('cuda', 1 GPU per actor) or ('cpu', 0)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and gpus < 1:
        raise UserError("evaluate.device: 'cuda' but the Ray cluster has no GPU; use 'auto' or 'cpu'")
    if device == "cuda" or (device == "auto" and gpus >= 1):
        return "cuda", 1.0
    return "cpu", 0.0


def extract_with_ray(ctx: StageContext, items: list[dict[str, str]]) -> dict[str, dict[str, Any]]:
    """Run FeatureBatch over `items` ({uri, prompt, score_clip}) with Ray Data; uri -> {pool3, logits, clip}."""
    if not items:
        return {}
    import ray

    from t2id.raycluster import ensure_ray

    ev = ctx.config.evaluate
    ensure_ray(ctx.config.cluster)
    device, gpus = _device_and_gpus(ev.device)
    actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1
    dataset = ray.data.from_items(items).map_batches(
        FeatureBatch,
        fn_constructor_kwargs=dict(store=ctx.store, inception=ev.inception_weights, clip=ev.clip_weights,
                                   cache_dir=str(ctx.cache_dir), device=device, batch_size=ev.batch_size,
                                   endpoint_url=ctx.config.store.endpoint_url),
        batch_size=ev.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(items))),
        num_gpus=gpus, num_cpus=1,
    )
    return {row["uri"]: row for row in dataset.iter_rows()}


# ---------------------------------------------------------------- pure core
@dataclass
class ClassSet:
    fold: int
    class_id: int
    name: str
    real: pa.Table  # image rows (image_id, uri, sha256, ...)
    synthetic: pa.Table  # kept synthetic rows of the class


def real_rows_of_class(rows: pa.Table, class_id: int) -> pa.Table:
    """Image rows holding at least one box of `class_id`."""
    mask = [any(b["class_id"] == class_id for b in (boxes or [])) for boxes in rows["boxes"].to_pylist()]
    return rows.filter(pa.array(mask, pa.bool_()))


def gather_sets(store: Store, folds: Iterable[int], names: list[str]) -> list[ClassSet]:
    """The (fold, class) image sets to evaluate; classes are those the fold's generator was asked for."""
    import pyarrow.compute as pc

    from t2id.data.manifest import load_fold_rows

    sets = []
    for fold in folds:
        manifest = store.read_table(GENERATE_MANIFEST_KEY.format(fold=fold))
        for column in ("uri", "class_id", "prompt", "kept"):
            if column not in manifest.column_names:
                raise UserError(f"{store.uri(GENERATE_MANIFEST_KEY.format(fold=fold))}: column '{column}' "
                                "is missing; rerun the generate stage (`t2id run CONFIG --force generate`)")
        kept = manifest.filter(pc.fill_null(manifest["kept"], False))
        train = load_fold_rows(store, fold, "train")
        for class_id in sorted(set(manifest["class_id"].to_pylist())):
            if not 0 <= class_id < len(names):
                raise UserError(f"{store.uri(GENERATE_MANIFEST_KEY.format(fold=fold))}: class_id {class_id} "
                                f"is not in data/classes.json ({len(names)} classes)")
            sets.append(ClassSet(fold, class_id, names[class_id], real_rows_of_class(train, class_id),
                                 kept.filter(pc.equal(kept["class_id"], class_id))))
    return sets


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
        score = metrics.inception_score(syn_logits, splits=is_splits, seed=seed)
        out.update(is_mean=score.mean, is_std=score.std)
        if np.isfinite(syn_clip).any():
            out["clip_score"] = float(np.nanmean(syn_clip))
    return out


def _fmt(mean: float, std: float, digits: int) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if np.isfinite(std) else f"{mean:.{digits}f}"


def table1(metrics_table: pa.Table, model: str) -> tuple[str, str]:
    """Table-I-style summary per class (mean ± std over folds): (csv, markdown)."""
    import pandas as pd

    df = metrics_table.to_pandas()
    grouped = df.groupby("class", sort=False)
    summary = pd.DataFrame({
        "model": model,
        "class": list(grouped.groups),
        "folds": grouped["fold"].nunique().to_numpy(),
        "fid_mean": grouped["fid"].mean().to_numpy(), "fid_std": grouped["fid"].std(ddof=0).to_numpy(),
        "kid_mean": grouped["kid_mean"].mean().to_numpy(), "kid_std": grouped["kid_mean"].std(ddof=0).to_numpy(),
        "is_mean": grouped["is_mean"].mean().to_numpy(), "is_std": grouped["is_mean"].std(ddof=0).to_numpy(),
        "clip_mean": grouped["clip_score"].mean().to_numpy(),
        "clip_std": grouped["clip_score"].std(ddof=0).to_numpy(),
        "n_real": grouped["n_real"].sum().to_numpy(), "n_synthetic": grouped["n_synthetic"].sum().to_numpy(),
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
    note = ("\nMean ± std over folds. Real reference per fold = that fold's training images of the class; "
            "n counts sum over folds. KID: unbiased polynomial-kernel MMD², subset size ≤ the smaller set.\n")
    return summary.to_csv(index=False), "\n".join(lines) + "\n" + note


# ---------------------------------------------------------------- feature caches (per fold, in the store)
def _load_cache(store: Store, key: str, fingerprint: str, wanted: list[tuple[str, str]]) -> dict[str, dict] | None:
    """id -> {pool3, logits, clip} from a cache table, or None unless it was made by the same models
    (fingerprint) from the same image bytes (sha256 per id) and covers every wanted id."""
    if not store.exists(key):
        return None
    table = store.read_table(key)
    if (table.schema.metadata or {}).get(b"fingerprint", b"").decode() != fingerprint:
        return None
    rows = {r["id"]: r for r in table.to_pylist()}
    if any(i not in rows or rows[i]["sha256"] != sha for i, sha in wanted):
        return None
    return {i: {"pool3": np.asarray(r["pool3"], np.float32),
                "logits": None if r["logits"] is None else np.asarray(r["logits"], np.float32),
                "clip": math.nan if r["clip"] is None else r["clip"]} for i, r in rows.items()}


def _write_cache(store: Store, key: str, fingerprint: str, wanted: list[tuple[str, str]],
                 features: dict[str, dict]) -> None:
    table = pa.Table.from_pylist(
        [{"id": i, "sha256": sha, "pool3": features[i]["pool3"].tolist(),
          "logits": None if features[i].get("logits") is None else features[i]["logits"].tolist(),
          "clip": None if not np.isfinite(features[i].get("clip", math.nan)) else float(features[i]["clip"])}
         for i, sha in wanted],
        schema=CACHE_SCHEMA.with_metadata({"fingerprint": fingerprint}),
    )
    store.write_table(key, table)


def _clip_fingerprint(source: str, endpoint_url: str | None) -> str:
    """Identity of the CLIP weights without reading them: file listing with sizes (local) or sha256s (s3)."""
    from t2id.store import open_store

    if source == "tiny":
        return "tiny-seed0"
    if source.startswith("s3://"):
        remote = open_store(source.rstrip("/"), endpoint_url=endpoint_url)
        listing = {k: remote.sha256(k) for k in remote.list()}
    else:
        root = Path(source).expanduser()
        listing = {p.relative_to(root).as_posix(): f"{p.stat().st_size}:{p.stat().st_mtime_ns}"
                   for p in sorted(root.rglob("*")) if p.is_file()}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- stage
def evaluated_folds(store: Store) -> list[int]:
    """Folds with a generate manifest, in order."""
    from t2id.data.manifest import load_folds

    folds = sorted(set(load_folds(store)["fold"].to_pylist()))
    present = [k for k in folds if store.exists(GENERATE_MANIFEST_KEY.format(fold=k))]
    if not present:
        raise UserError(f"no {GENERATE_MANIFEST_KEY.format(fold='<k>')} in {store.root}: run the generate "
                        "stage first (`t2id run CONFIG --only generate`)")
    return present


def _fold_images(sets: list[ClassSet], fold: int) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(real, synthetic) images of a fold as (id, sha256, uri|prompt) lists, each image once, in order."""
    real: dict[str, tuple[str, str, str]] = {}
    synthetic: dict[str, tuple[str, str, str]] = {}
    for s in (s for s in sets if s.fold == fold):
        for r in s.real.select(["image_id", "sha256", "uri"]).to_pylist():
            real.setdefault(r["image_id"], (r["image_id"], r["sha256"], r["uri"]))
        for r in s.synthetic.select(["uri", "sha256", "prompt"]).to_pylist():
            synthetic.setdefault(r["uri"], (r["uri"], r["sha256"], r["prompt"] or ""))
    return list(real.values()), list(synthetic.values())


def run(ctx: StageContext) -> StageResult:
    from t2id.data.manifest import load_classes
    from t2id.evaluate.clip_score import check_clip_source
    from t2id.evaluate.features import resolve_inception

    cfg, store, ev = ctx.config, ctx.store, ctx.config.evaluate
    endpoint = cfg.store.endpoint_url

    # 1. Weights: resolved here so a missing file fails before any Ray work, naming its key.
    inception_path = resolve_inception(ev.inception_weights, ctx.cache_dir, endpoint)
    check_clip_source(ev.clip_weights, endpoint)
    real_fp = f"inception:{sha256_file(inception_path)}"
    synthetic_fp = f"{real_fp}|clip:{_clip_fingerprint(ev.clip_weights, endpoint)}"

    # 2. Image sets per (fold, class); features the store already holds for unchanged images.
    folds = evaluated_folds(store)
    sets = gather_sets(store, folds, load_classes(store))
    real_feats: dict[int, dict[str, dict]] = {}
    syn_feats: dict[int, dict[str, dict]] = {}
    todo: dict[str, dict[str, Any]] = {}  # uri -> Ray Data item
    cache_hits = []
    for fold in folds:
        real, synthetic = _fold_images(sets, fold)
        cached_real = _load_cache(store, REAL_CACHE_KEY.format(fold=fold), real_fp,
                                  [(i, sha) for i, sha, _ in real]) if ev.cache_features else None
        cached_syn = _load_cache(store, SYN_CACHE_KEY.format(fold=fold), synthetic_fp,
                                 [(i, sha) for i, sha, _ in synthetic]) if ev.cache_features else None
        real_feats[fold], syn_feats[fold] = cached_real or {}, cached_syn or {}
        if cached_real is not None and cached_syn is not None:
            cache_hits.append(fold)
        if cached_real is None:
            for _, _, uri in real:
                todo.setdefault(uri, {"uri": uri, "prompt": "", "score_clip": False})
        if cached_syn is None:
            for uri, _, prompt in synthetic:
                todo[uri] = {"uri": uri, "prompt": prompt, "score_clip": True}

    # 3. One Ray Data pass over every image still needing features (a real image shared by folds once).
    extracted = extract_with_ray(ctx, list(todo.values()))
    for fold in folds:
        real, synthetic = _fold_images(sets, fold)
        if not real_feats[fold] and real:
            real_feats[fold] = {i: extracted[uri] for i, _, uri in real}
            if ev.cache_features:
                _write_cache(store, REAL_CACHE_KEY.format(fold=fold), real_fp,
                             [(i, sha) for i, sha, _ in real], real_feats[fold])
        if not syn_feats[fold] and synthetic:
            syn_feats[fold] = {uri: extracted[uri] for uri, _, _ in synthetic}
            if ev.cache_features:
                _write_cache(store, SYN_CACHE_KEY.format(fold=fold), synthetic_fp,
                             [(uri, sha) for uri, sha, _ in synthetic], syn_feats[fold])

    # 4. Metrics per (fold, class).
    records = []
    for s in sets:
        real = [real_feats[s.fold][i] for i in s.real["image_id"].to_pylist()]
        syn = [syn_feats[s.fold][u] for u in s.synthetic["uri"].to_pylist()]
        values = class_metrics(
            np.stack([r["pool3"] for r in real]) if real else np.zeros((0, 2048), np.float32),
            np.stack([r["pool3"] for r in syn]) if syn else np.zeros((0, 2048), np.float32),
            np.stack([r["logits"] for r in syn]) if syn else np.zeros((0, 1008), np.float32),
            np.array([r["clip"] for r in syn], dtype=np.float64),
            ev.kid_subsets, ev.kid_subset_size, ev.is_splits, seed=cfg.run.seed + s.fold,
        )
        records.append({"fold": s.fold, "class": s.name, "class_id": s.class_id, **values})
    table = pa.Table.from_pylist(records, schema=METRICS_SCHEMA)
    base = cfg.lora.base_model
    model = "tiny SDXL-LoRA (random stand-in)" if base == "tiny" else f"SDXL-LoRA ({base.rstrip('/').split('/')[-1]})"
    csv_text, md_text = table1(table, model)
    outputs = {
        METRICS_KEY: store.write_table(METRICS_KEY, table),
        TABLE_CSV_KEY: store.write_text(TABLE_CSV_KEY, csv_text),
        TABLE_MD_KEY: store.write_text(TABLE_MD_KEY, md_text),
    }
    summary = {
        "folds": folds,
        "rows": table.num_rows,
        "extracted_images": len(todo),
        "cache_hits": cache_hits,
        "fid": {f"{r['fold']}/{r['class']}": None if math.isnan(r["fid"]) else round(r["fid"], 3) for r in records},
        "n_synthetic": {f"{r['fold']}/{r['class']}": r["n_synthetic"] for r in records},
    }
    return StageResult(outputs=outputs, summary=summary)


STAGE = Stage(
    name="evaluate",
    sections=("evaluate", "lora"),  # lora: the model label of the table
    depends_on=("data", "split", "generate"),
    run=run,
)
