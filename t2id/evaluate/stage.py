"""Stage `evaluate`: FID, KID, Inception Score and CLIP score per fold and target class (paper Table I).

  1. resolve and check the weights on the driver (a missing file is a UserError naming the key);
  2. gather the (fold, class) image sets (t2id.evaluate.core: the fold's validation images of the
     class against the synthetic rows the detector trains on, label's when the label stage runs,
     both resized to grid.detector.imgsz first); reuse the per-fold features cached
     in the store while the weights and image bytes are unchanged (t2id.evaluate.cache);
  3. extract what is missing in one Ray Data pass (t2id.evaluate.ray_layer);
  4. compute the metrics, write metrics.parquet and a Table-I-style table (csv + markdown).
"""

from __future__ import annotations

import math

import pyarrow as pa

from t2id import layout
from t2id.evaluate import cache
from t2id.evaluate.core import (METRICS_SCHEMA, evaluated_folds, fold_images, gather_sets, networks_note, set_metrics,
                                table1)
from t2id.evaluate.settings import EvaluateSettings, settings
from t2id.resume import Memo
from t2id.runner import Stage, StageContext, StageResult


def weights_inputs(ctx: StageContext, s: EvaluateSettings) -> dict[str, str]:
    """The weights' content, outside the config: new weights at the same path redo the stage."""
    ev = s.evaluate
    return {"weights:inception": cache.weights_fingerprint(ev.inception_weights, ctx.endpoint_url),
            "weights:clip": cache.weights_fingerprint(ev.clip_weights, ctx.endpoint_url)}


def run(ctx: StageContext, s: EvaluateSettings) -> StageResult:
    from t2id.data.manifest import load_classes
    from t2id.evaluate.clip_score import check_clip_source
    from t2id.evaluate.features import check_inception_source
    from t2id.evaluate.ray_layer import extract_with_ray
    from t2id.raycluster import ensure_ray

    store, ev = ctx.store, s.evaluate

    # 1. Weights: checked here so a missing file fails before any Ray work, naming its key.
    check_inception_source(ev.inception_weights, ctx.endpoint_url)
    check_clip_source(ev.clip_weights, ctx.endpoint_url)
    weights = weights_inputs(ctx, s)
    inception, clip = weights["weights:inception"], weights["weights:clip"]

    # 2. Image sets per (fold, class); features the store already holds for unchanged images.
    from_label = s.label_method is not None
    folds = evaluated_folds(store, from_label)
    sets = gather_sets(store, folds, load_classes(store), from_label)
    features: dict[tuple[int, str], cache.Features] = {}
    memos: dict[tuple[int, str], Memo] = {}
    todo: dict[str, dict] = {}  # uri -> Ray Data item; a real image shared by folds is extracted once
    cache_hits = []
    images = {fold: fold_images(sets, fold) for fold in folds}
    for fold in folds:
        hits = 0
        for kind, unit_images in images[fold].items():
            memo = cache.feature_memo(store, fold, kind, cache.unit_weights(kind, inception, clip, s.imgsz),
                                      [(im.key, im.sha256) for im in unit_images], force=ctx.force)
            memos[fold, kind] = memo
            found = cache.load_features(store, memo, fold, kind) if ev.cache_features else None
            if found is not None:
                features[fold, kind] = found
                hits += 1
                continue
            for im in unit_images:
                todo.setdefault(im.uri, {"uri": im.uri, "prompt": im.prompt or "",
                                         "score_clip": im.prompt is not None})
        if hits == len(cache.KINDS):
            cache_hits.append(fold)

    # 3. One Ray Data pass over every image still needing features.
    extracted = {}
    if todo:
        ensure_ray(ctx.cluster)
        with ctx.events.progress("evaluate: image features", len(todo)) as advance:
            extracted = extract_with_ray(store, ev, list(todo.values()), ctx.cache_dir, ctx.endpoint_url, advance,
                                         imgsz=s.imgsz)
    for fold in folds:
        for kind, unit_images in images[fold].items():
            if (fold, kind) not in features:
                features[fold, kind] = {im.key: extracted[im.uri] for im in unit_images}
                if ev.cache_features:
                    cache.save_features(store, memos[fold, kind], fold, kind,
                                        [(im.key, im.sha256) for im in unit_images], features[fold, kind])

    # 4. Metrics per (fold, class).
    records = []
    for st in sets:
        real = [features[st.fold, "real"][i] for i in st.real["image_id"].to_pylist()]
        syn = [features[st.fold, "synthetic"][u] for u in st.synthetic["uri"].to_pylist()]
        records.append({**set_metrics(st, real, syn, ev.kid_subsets, ev.kid_subset_size, ev.is_splits,
                                      seed=s.run_seed + st.fold),
                        "networks": networks_note(ev.inception_weights, ev.clip_weights),
                        "synthetic_source": s.synthetic_source, "imgsz": s.imgsz})
    table = pa.Table.from_pylist(records, schema=METRICS_SCHEMA)
    csv_text, md_text = table1(table, s.model_label)
    outputs = {
        layout.evaluate.metrics: store.write_table(layout.evaluate.metrics, table),
        layout.evaluate.table1_csv: store.write_text(layout.evaluate.table1_csv, csv_text),
        layout.evaluate.table1_md: store.write_text(layout.evaluate.table1_md, md_text),
    }
    summary = {
        "folds": folds,
        "rows": table.num_rows,
        "extracted_images": len(todo),
        "cache_hits": cache_hits,
        "networks": networks_note(ev.inception_weights, ev.clip_weights),
        "synthetic_source": s.synthetic_source,
        "fid": {f"{r['fold']}/{r['class']}": None if math.isnan(r["fid"]) else round(r["fid"], 3) for r in records},
        "n_synthetic": {f"{r['fold']}/{r['class']}": r["n_synthetic"] for r in records},
    }
    return StageResult(outputs=outputs, summary=summary)


STAGE = Stage(
    name="evaluate",
    settings=settings,
    depends_on=("data", "split", "generate", "label"),  # label: only when enabled (then its rows are measured)
    run=run,
    external_inputs=weights_inputs,
)
