"""Stage `label`: boxes for synthetic images (teacher or inpaint), memorization check, labels.parquet.

Per fold k (label.folds, default every fold; keys from t2id.layout.label):
  1. teacher: generate's manifest rows of the fold get boxes from the fold's teacher
     (t2id.label.teacher; trained on the fold's real TRAIN images only) and the class-consistency
     gate, in one Ray task per fold with the teacher's resources (t2id.label.ray_layer);
     inpaint: new images are made from the fold's real TRAIN images (t2id.label.inpaint) on
     generate's Ray Data machinery, and inherit their boxes.
  2. Memorization: each row's similarity to the nearest image its generator trained on (the lora
     stage's train_ids.json when lora runs; else the fold's real TRAIN images), flag and optionally
     reject.
  3. labels.parquet: LABELS_SCHEMA rows, rejected ones included with their reason; its schema metadata
     (CLASS_COUNTS_KEY) and the summary hold per-class counts: target, rejected by gate / by
     memorization, used, shortfall (no top-up follows label's rejections).
Then the memorization histogram over all folds. The grid trains *_sdxl strategies on the kept rows
with boxes; t2id.data.materialize_fold reads them as they are.
"""

from __future__ import annotations

import json
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from t2id import layout
from t2id.data.manifest import (SYNTHETIC_SCHEMA, available_folds, load_classes, load_fold_rows, load_manifest,
                                select_folds)
from t2id.errors import UserError
from t2id.label.settings import LabelSettings, settings
from t2id.runner import Stage, StageContext, StageResult
from t2id.store import Store

LABELS_SCHEMA = pa.schema(list(SYNTHETIC_SCHEMA) + [
    pa.field("confidence", pa.float32()),  # teacher: best confidence of a target-class box; inpaint: null
    pa.field("nn_similarity", pa.float32()),  # similarity to the nearest generator-training image
    pa.field("nn_image_id", pa.string()),  # that training image
    pa.field("memorized", pa.bool_()),  # nn_similarity >= label.memorization.threshold
    pa.field("source_image_id", pa.string()),  # inpaint: the real image that was inpainted
    pa.field("mask_rects", pa.string()),  # inpaint: JSON list of normalized [x0, y0, x1, y1] masks
])


CLASS_COUNTS_KEY = b"class_counts"  # labels.parquet schema metadata: JSON list of class_counts() rows


def class_counts(rows: list[dict], names: list[str], target: int) -> list[dict]:
    """Per class of a fold: what was asked for, made, rejected (by the quality/teacher gate, by the
    memorization check) and used (kept with boxes: what the detector trains on); shortfall =
    target - used. No top-up follows label's rejections, so the report shows this instead."""
    out = []
    for class_id in sorted({int(r["class_id"]) for r in rows}):
        mine = [r for r in rows if r["class_id"] == class_id]
        memorized = sum(1 for r in mine if not r["kept"] and (r["reject_reason"] or "").startswith("memorized"))
        rejected = sum(1 for r in mine if not r["kept"])
        used = sum(1 for r in mine if r["kept"] and r["boxes"])
        out.append({"class_id": class_id, "class": names[class_id] if 0 <= class_id < len(names) else str(class_id),
                    "target": target, "rows": len(mine), "rejected_gate": rejected - memorized,
                    "rejected_memorization": memorized, "kept_without_boxes": sum(1 for r in mine if r["kept"])
                    - used, "used": used, "shortfall": max(0, target - used)})
    return out


def label_folds(store: Store, s: LabelSettings) -> list[int]:
    """label.folds, else every fold (teacher: every fold generate produced)."""
    folds = select_folds(store, s.label.folds, "label.folds")
    if s.label.folds is None and s.label.method == "teacher":
        folds = [f for f in folds if store.exists(layout.generate.manifest(f))]
    if not folds:
        raise UserError("label: no generate manifest found for any fold; run the generate stage first, or set "
                        "label.method: inpaint")
    return folds


def generator_training_rows(store: Store, fold: int, use_adapter: bool) -> tuple[list[dict], str]:
    """(image rows the fold's generator trained on, which reference was used)."""
    if not use_adapter:  # the base model drew the images: the fold's real TRAIN images are the reference
        return load_fold_rows(store, fold, "train").select(["image_id", "uri"]).to_pylist(), "fold train images"
    key = layout.lora.train_ids(fold)
    if not store.exists(key):
        raise UserError(f"{store.uri(key)} is missing: run the lora stage for fold {fold} "
                        "(`t2id run CONFIG --only lora`)")
    ids = sorted(set(json.loads(store.read_text(key))["image_ids"]))
    manifest = load_manifest(store)
    rows = manifest.filter(pc.is_in(manifest["image_id"], value_set=pa.array(ids, pa.string())))
    return rows.select(["image_id", "uri"]).to_pylist(), "lora train_ids"


def teacher_labels(ctx: StageContext, s: LabelSettings, folds: list[int]) -> dict[int, tuple[list[dict], dict]]:
    from t2id.label.ray_layer import teacher_folds
    from t2id.raycluster import ensure_ray

    for fold in folds:
        key = layout.generate.manifest(fold)
        if not ctx.store.exists(key):
            raise UserError(f"{ctx.store.uri(key)} is missing: run the generate stage for fold {fold} first, or "
                            "set label.method: inpaint")
    ensure_ray(ctx.cluster)
    return teacher_folds(ctx.store, s, folds, str(ctx.cache_dir), ctx.force, ctx.events)


def inpaint_labels(ctx: StageContext, s: LabelSettings, folds: list[int]) -> dict[int, tuple[list[dict], dict]]:
    from t2id.generate.plan import plan_classes
    from t2id.generate.ray_layer import run_ray
    from t2id.label.inpaint import InpaintGenerator, inpaint_fold
    from t2id.raycluster import ensure_ray

    assert s.inpainting is not None  # settings() sets it for the inpaint method
    store, gen = ctx.store, s.inpainting
    classes = plan_classes(gen.target_classes, load_classes(store))
    if gen.use_adapter:
        for fold in folds:
            if not store.exists(layout.lora.adapter(fold)):
                raise UserError(f"{store.uri(layout.lora.adapter(fold))} is missing: run the lora stage for fold "
                                f"{fold} (`t2id run CONFIG --only lora`) or leave it out of label.folds")
    else:
        ctx.events.info(f"label: lora is not in run.stages; inpainting with the base model {gen.base_model!r} alone")
    ensure_ray(ctx.cluster)
    results = {}
    for fold in folds:
        executor = partial(run_ray, worker_cls=InpaintGenerator, settings=s, store=store, fold=fold, g=gen.generate,
                           cache_dir=str(ctx.cache_dir), endpoint_url=ctx.endpoint_url)
        rows, facts = inpaint_fold(store, s, fold, classes, executor, ctx.events)
        made = {r["class_id"] for r in rows}
        for cls in classes:
            if cls.class_id not in made:
                ctx.events.warning(f"label fold {fold}: no real TRAIN image holds class '{cls.name}', so nothing "
                                   "was inpainted for it")
        results[fold] = rows, {**facts, "adapter": layout.lora.adapter(fold) if gen.use_adapter else None}
    return results


def run(ctx: StageContext, s: LabelSettings) -> StageResult:
    from t2id.label.memorization import histogram_png, score_rows

    lab, store = s.label, ctx.store
    folds = label_folds(store, s)
    names = load_classes(store)
    labelled = teacher_labels(ctx, s, folds) if lab.method == "teacher" else inpaint_labels(ctx, s, folds)
    outputs: dict[str, str] = {}
    summary: dict[str, dict] = {}
    scores: list[float] = []
    mem = lab.memorization
    for fold in folds:
        rows, facts = labelled[fold]
        training, reference = generator_training_rows(store, fold, s.use_adapter)
        rows = score_rows(store, rows, training, mem.feature, mem.size, mem.threshold, mem.reject)
        counts = class_counts(rows, names, s.target_per_class)
        table = pa.Table.from_pylist([{n: r.get(n) for n in LABELS_SCHEMA.names} for r in rows], schema=LABELS_SCHEMA)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), CLASS_COUNTS_KEY: json.dumps(counts)})
        key = layout.label.labels(fold)
        outputs[key] = store.write_table(key, table)
        scores += [r["nn_similarity"] for r in rows if r["nn_similarity"] is not None]
        usable = sum(1 for r in rows if r["kept"] and r["boxes"])
        reasons: dict[str, int] = {}
        for r in rows:
            if not r["kept"]:
                reason = (r["reject_reason"] or "rejected").split(":")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
        summary[str(fold)] = {"rows": len(rows), "usable": usable, "rejected": reasons,
                              "memorized": sum(bool(r["memorized"]) for r in rows),
                              "memorization_reference": reference,
                              "classes": {c["class"]: {k: v for k, v in c.items() if k not in ("class", "class_id")}
                                          for c in counts}, **facts}
        ctx.events.info(f"label fold {fold} ({lab.method}): {usable}/{len(rows)} images kept with boxes; "
                        f"rejected {reasons or 'none'}")
    key = layout.label.memorization_hist
    outputs[key] = store.write_bytes(key, histogram_png(scores, mem.threshold))
    return StageResult(outputs=outputs, summary={"method": lab.method, "folds": summary})


def external_inputs(ctx: StageContext, s: LabelSettings) -> dict[str, str]:
    """Store files outside the config that the teacher may reuse: the grid's baseline weights per fold."""
    if s.label.method != "teacher" or s.label.teacher.source not in ("grid", "auto"):
        return {}
    found = {}
    for fold in available_folds(ctx.store):
        key = layout.grid.weights(fold, "baseline")
        if ctx.store.exists(key):
            found[key] = ctx.store.sha256(key)
    return found


STAGE = Stage(name="label", settings=settings, depends_on=("data", "split", "lora", "generate"), run=run,
              external_inputs=external_inputs)
