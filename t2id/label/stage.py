"""Stage `label`: boxes for synthetic images (teacher or inpaint), memorization check, labels.parquet.

Per fold k (label.folds, default every fold; keys from t2id.layout.label):
  1. teacher: generate's manifest rows of the fold get boxes from the fold's teacher
     (t2id.label.teacher; trained on the fold's real TRAIN images only) and the class-consistency
     gate, in one Ray task per fold with the teacher's resources (t2id.label.ray_layer);
     inpaint: new images are made from the fold's real TRAIN images (t2id.label.inpaint) on
     generate's Ray Data machinery, and inherit their boxes; inpaint_outpaint (t2id.label.outpaint)
     also regenerates the border, and inherits the boxes it left untouched.
  2. Memorization: each row's similarity to the nearest image its generator trained on (the lora
     stage's train_ids.json when lora runs; else the fold's real TRAIN images), flag and optionally
     reject.
  3. Top-up: while a class has fewer usable images (kept with boxes) than its target, new candidates are
     made and go through steps 1-2 (teacher: text-to-image with the fold's generator, seeds of their own,
     under layout.label.topup(k), on one warm pool for every fold and round that leaves the teacher its
     resources; inpaint: the next indices of the inpaint plan), until the target is
     reached or ceil(label.max_attempts_factor x target) candidates were tried. Each row records its
     round (0: the first candidates).
  4. labels.parquet: LABELS_SCHEMA rows, rejected ones included with their reason; its schema metadata
     (CLASS_COUNTS_KEY) and the summary hold per-class counts: target, rejected by gate / by
     memorization, topped up, used, shortfall (target not reached within the attempt budget).
Then the memorization histogram over all folds. The grid trains *_sdxl strategies on the kept rows
with boxes; t2id.data.materialize_fold reads them as they are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from t2id import layout
from t2id.data.manifest import (BOX_TYPE, SYNTHETIC_SCHEMA, available_folds, load_classes, load_fold_rows, load_manifest,
                                select_folds)
from t2id.errors import UserError
from t2id.generate.plan import PlanClass
from t2id.label.settings import LabelSettings, settings
from t2id.runner import Stage, StageContext, StageResult
from t2id.store import Store

if TYPE_CHECKING:
    from t2id.generate.ray_layer import WarmPool

LABELS_SCHEMA = pa.schema(list(SYNTHETIC_SCHEMA) + [
    pa.field("confidence", pa.float32()),  # teacher: best confidence of a target-class box; inpaint: null
    pa.field("nn_similarity", pa.float32()),  # similarity to the nearest generator-training image
    pa.field("nn_image_id", pa.string()),  # that training image
    pa.field("memorized", pa.bool_()),  # nn_similarity >= label.memorization.threshold
    pa.field("source_image_id", pa.string()),  # inpaint: the real image that was inpainted
    pa.field("mask_rects", pa.string()),  # inpaint: JSON list of normalized [x0, y0, x1, y1] masks
    pa.field("round", pa.int32()),  # 0: the first candidates; k: the k-th top-up round after label's rejections
    pa.field("adapter_method", pa.string()),  # inpaint*: lora.method of the adapter that painted (`method` holds
    #                                           the generator: inpaint | inpaint_outpaint)
    # inpaint_outpaint only (t2id.label.outpaint):
    pa.field("keep_rect", pa.string()),  # JSON normalized [x0, y0, x1, y1]: kept from step 1; outside was outpainted
    pa.field("dropped_boxes", pa.list_(BOX_TYPE)),  # source boxes crossing or outside keep (pixels regenerated)
    pa.field("dropped_count", pa.int32()),  # len(dropped_boxes)
    pa.field("step_seeds", pa.string()),  # JSON {"inpaint": step 1's seed (= seed), "outpaint": step 2's sub-seed}
])


CLASS_COUNTS_KEY = b"class_counts"
TOPUP_SEEDS = "label-topup:"  # seed namespace of the teacher's top-up images (generate.plan.plan_rows)  # labels.parquet schema metadata: JSON list of class_counts() rows


def class_counts(rows: list[dict], names: list[str], target: int) -> list[dict]:
    """Per class of a fold: what was asked for, made, rejected (by the quality/teacher gate, by the
    memorization check), made by top-up rounds, and used (kept with boxes: what the detector trains on);
    shortfall = target - used (left when the attempt budget ran out)."""
    out = []
    for class_id in sorted({int(r["class_id"]) for r in rows}):
        mine = [r for r in rows if r["class_id"] == class_id]
        memorized = sum(1 for r in mine if not r["kept"] and (r["reject_reason"] or "").startswith("memorized"))
        rejected = sum(1 for r in mine if not r["kept"])
        used = sum(1 for r in mine if r["kept"] and r["boxes"])
        out.append({"class_id": class_id, "class": names[class_id] if 0 <= class_id < len(names) else str(class_id),
                    "target": target, "rows": len(mine), "rejected_gate": rejected - memorized,
                    "rejected_memorization": memorized, "kept_without_boxes": sum(1 for r in mine if r["kept"])
                    - used, "topped_up": sum(1 for r in mine if (r.get("round") or 0) > 0), "used": used,
                    "shortfall": max(0, target - used)})
    return out


def layout_fidelity(rows: list[dict], names: list[str]) -> list[dict]:
    """layout_lora's layout fidelity per class: of the boxes its images asked for, the fraction the fold's
    real-data teacher detected as that class with IoU >= lora.layout.fidelity_iou (t2id.label.teacher)."""
    out = []
    scored = [r for r in rows if r.get("label_source") == "layout" and r.get("layout_matched") is not None]
    for class_id in sorted({int(r["class_id"]) for r in scored}):
        mine = [r for r in scored if r["class_id"] == class_id]
        requested = sum(len(r["requested_boxes"] or []) for r in mine)
        matched = sum(int(r["layout_matched"]) for r in mine)
        out.append({"class_id": class_id, "class": names[class_id] if 0 <= class_id < len(names) else str(class_id),
                    "images": len(mine), "requested": requested, "matched": matched,
                    "fidelity": round(matched / requested, 4) if requested else None})
    return out


def write_layout_fidelity(store: Store, fold: int, fidelity: list[dict]) -> str:
    """`layout.label.layout_fidelity(fold)`: {"fold", "classes": layout_fidelity rows}; returns its sha256."""
    return store.write_text(layout.label.layout_fidelity(fold), json.dumps({"fold": fold, "classes": fidelity},
                                                                           indent=1))


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


def inpaint_pool(ctx: StageContext, s: LabelSettings) -> WarmPool:
    """The stage's warm pool of inpainting actors: every fold and top-up round, one pipeline load per actor."""
    from t2id.generate.ray_layer import WarmPool
    from t2id.label.inpaint import InpaintGenerator
    from t2id.label.outpaint import InpaintOutpaintGenerator

    assert s.inpainting is not None
    worker = InpaintOutpaintGenerator if s.label.method == "inpaint_outpaint" else InpaintGenerator
    return WarmPool(worker, s, ctx.store, s.inpainting.generate, str(ctx.cache_dir), ctx.endpoint_url)


def inpaint_labels(ctx: StageContext, s: LabelSettings, folds: list[int], classes: list[PlanClass],
                   executor: Callable) -> dict[int, tuple[list[dict], dict]]:
    from t2id.label.inpaint import inpaint_fold
    from t2id.raycluster import ensure_ray

    assert s.inpainting is not None  # settings() sets it for the inpaint method
    store, gen = ctx.store, s.inpainting
    if gen.use_adapter:
        for fold in folds:
            if not store.exists(gen.generator_key(fold)):
                raise UserError(f"{store.uri(gen.generator_key(fold))} is missing: run the lora stage for fold "
                                f"{fold} (`t2id run CONFIG --only lora`) or leave it out of label.folds")
    else:
        ctx.events.info(f"label: lora is not in run.stages; inpainting with the base model {gen.base_model!r} alone")
    ensure_ray(ctx.cluster)
    results = {}
    for fold in folds:
        rows, facts = inpaint_fold(store, s, fold, classes, executor, ctx.events)
        made = {r["class_id"] for r in rows}
        for cls in classes:
            if cls.class_id not in made:
                ctx.events.warning(f"label fold {fold}: no real TRAIN image holds class '{cls.name}', so nothing "
                                   "was inpainted for it")
        results[fold] = rows, {**facts, "adapter": layout.lora.adapter(fold) if gen.use_adapter else None}
    return results


def inpaint_topup(ctx: StageContext, s: LabelSettings, classes: list[PlanClass], executor: Callable, fold: int,
                  ranges: dict[str, tuple[int, int]], round_: int) -> list[dict]:
    """A top-up round of inpainting: the next indices of the fold's inpaint plan."""
    from t2id.label.inpaint import inpaint_fold

    rows, _ = inpaint_fold(ctx.store, s, fold, classes, executor, ctx.events, ranges, round_)
    return rows


def topup_pool(ctx: StageContext, s: LabelSettings) -> WarmPool:
    """The teacher's top-up generators, warm for every fold and round: as many actors as leave the teacher's
    task its CPUs and GPU (label.teacher.cpus / device), so the teacher runs beside them. Where not even one
    actor leaves that free (one GPU for both), the pool is closed before each teacher run (`make_room`)."""
    from t2id.generate.ray_layer import WarmPool
    from t2id.generate.stage import worker_class
    from t2id.label.ray_layer import teacher_resources
    from t2id.raycluster import ensure_ray

    assert s.topup is not None
    ensure_ray(ctx.cluster)
    return WarmPool(worker_class(s.topup), s.topup, ctx.store, s.topup.generate, str(ctx.cache_dir),
                    ctx.endpoint_url, leave=teacher_resources(s))


def teacher_topup(ctx: StageContext, s: LabelSettings, classes: list[PlanClass], pool: WarmPool, fold: int,
                  ranges: dict[str, tuple[int, int]], round_: int) -> list[dict]:
    """A top-up round of the teacher method: new text-to-image candidates from the fold's generator (generate's
    worker and gate, seeds of their own, on the stage's warm `pool`), stored under layout.label.topup(fold),
    then labelled by the teacher."""
    from t2id.generate.core import execute_rows, manifest_table, record_from_batch, verified_records
    from t2id.generate.plan import gen_params, plan_rows
    from t2id.generate.quality import judge
    from t2id.label.ray_layer import teacher_folds

    store, gen = ctx.store, s.topup
    assert gen is not None  # settings() sets it when the teacher tops up
    g = gen.generate
    lora_sha256 = store.sha256(gen.generator_key(fold)) if gen.use_adapter else ""
    params = gen_params(gen, lora_sha256)
    by_name = {c.name: c for c in classes}
    plan = []
    for name, (start, count) in ranges.items():
        for row in plan_rows(gen.run_seed, fold, by_name[name], params, start, count, round_, TOPUP_SEEDS):
            row.update(key=layout.label.topup_image(fold, name, row["name"]),
                       record_key=layout.label.topup_record(fold, name, row["name"]))
            plan.append(row)
    need_clip = g.quality.min_clip_score is not None
    records = verified_records(store, plan, set(store.list(layout.label.topup(fold))), need_clip)
    todo = [r for r in plan if r["key"] not in records]
    if todo:
        def make_record(batch: dict, i: int, row: dict) -> dict:
            return record_from_batch(batch, i, row, gen.base_model, params.scheduler, lora_sha256)

        with ctx.events.progress(f"label fold {fold}: top-up round {round_} images", len(todo)) as advance:
            execute_rows(f"label fold {fold} top-up", todo, pool, records, make_record, advance)
    if not pool.make_room():  # the teacher's task below needs what the generation actors held
        ctx.events.info(f"label fold {fold}: top-up generators closed to free label.teacher's resources; the "
                        "next round starts them again")
    for record in records.values():  # generate's gate with the current thresholds
        verdict = judge(record["std"], record["entropy"], record.get("clip_score"), g.quality)
        record["kept"], record["reject_reason"] = verdict.kept, verdict.reject_reason
    candidates = manifest_table(store, gen, fold, plan, records).to_pylist()
    labelled, _ = teacher_folds(store, s, [fold], str(ctx.cache_dir), False, ctx.events, {fold: candidates})[fold]
    return [{**r, "round": round_, "key": p["key"], "record_key": p["record_key"]} for r, p in zip(labelled, plan)]


def usable(row: dict) -> bool:
    """What the detector trains on: kept, with at least one box."""
    return bool(row["kept"] and row["boxes"])


def topup_ranges(rows: list[dict], classes: list[PlanClass], target: int, budget: int,
                 start_of: Callable[[list[dict]], int]) -> dict[str, tuple[int, int]]:
    """class name -> (first index, count) of the next top-up round: the classes short of `target` usable rows
    that have tried fewer than `budget` candidates; `start_of(a class's rows)` is the index to continue at."""
    ranges = {}
    for cls in classes:
        mine = [r for r in rows if r["class_id"] == cls.class_id]
        short, room = target - sum(usable(r) for r in mine), budget - len(mine)
        if short > 0 and room > 0:
            ranges[cls.name] = (start_of(mine), min(short, room))
    return ranges


def top_up(ctx: StageContext, fold: int, rows: list[dict], classes: list[PlanClass], target: int, budget: int,
           start_of: Callable[[list[dict]], int], more: Callable[[int, dict, int], list[dict]],
           score: Callable[[list[dict]], list[dict]]) -> tuple[list[dict], int]:
    """Rounds of new candidates until every class has `target` usable rows or tried `budget`: (rows, rounds)."""
    round_ = 0
    while ranges := topup_ranges(rows, classes, target, budget, start_of):
        round_ += 1
        ctx.events.info(f"label fold {fold}: top-up round {round_}: "
                        + ", ".join(f"{count} more '{name}'" for name, (_, count) in ranges.items()))
        new = more(fold, ranges, round_)
        if not new:  # nothing could be made (e.g. no source image for inpainting): stop, report the shortfall
            break
        rows = rows + score(new)
    return rows, round_


def run(ctx: StageContext, s: LabelSettings) -> StageResult:
    if s.label.method != "teacher":  # inpaint, inpaint_outpaint
        with inpaint_pool(ctx, s) as pool:
            return run_with(ctx, s, pool)
    if s.topup is not None:
        with topup_pool(ctx, s) as pool:
            return run_with(ctx, s, pool)
    return run_with(ctx, s, None)


def run_with(ctx: StageContext, s: LabelSettings, pool: WarmPool | None) -> StageResult:
    """The stage with `pool`, its warm generation actors: the inpainting ones (inpaint methods), the teacher's
    top-up generators (teacher with top-up), else None."""
    from t2id.generate.core import remove_stale
    from t2id.generate.plan import method_classes
    from t2id.label.inpaint import remove_stale_inpaint
    from t2id.label.memorization import histogram_png, load_grey, score_rows

    lab, store = s.label, ctx.store
    folds = label_folds(store, s)
    names = load_classes(store)
    teacher = lab.method == "teacher"
    gen = s.topup if teacher else s.inpainting
    classes = method_classes(gen, names) if gen is not None else []
    labelled = teacher_labels(ctx, s, folds) if teacher else inpaint_labels(ctx, s, folds, classes, pool)
    target = s.target_per_class
    budget = math.ceil(lab.max_attempts_factor * target)
    outputs: dict[str, str] = {}
    summary: dict[str, dict] = {}
    scores: list[float] = []
    mem = lab.memorization
    for fold in folds:
        rows, facts = labelled[fold]
        training, reference = generator_training_rows(store, fold, s.use_adapter)
        train_pixels = [load_grey(store, r["uri"]) for r in training]

        def score(candidates: list[dict]) -> list[dict]:
            return score_rows(store, candidates, training, mem.feature, mem.size, mem.threshold, mem.reject,
                              train_pixels)

        rows = score([{**r, "round": r.get("round") or 0} for r in rows])
        rounds = 0
        if teacher:
            if s.topup is not None:
                assert pool is not None
                rows, rounds = top_up(ctx, fold, rows, classes, target, budget,
                                      lambda mine: sum(1 for r in mine if r["round"] > 0),
                                      partial(teacher_topup, ctx, s, classes, pool), score)
                facts = {**facts, "topup_pool": {"actors_started": pool.started, "warm": bool(pool.actors)}}
            removed = remove_stale(store, [r for r in rows if r["round"] > 0],
                                   [layout.label.topup_images(fold), layout.label.topup_records(fold)])
        else:
            rows, rounds = top_up(ctx, fold, rows, classes, target, budget, len,
                                  partial(inpaint_topup, ctx, s, classes, pool), score)
            removed = remove_stale_inpaint(store, fold, rows, lab.method)
        counts = class_counts(rows, names, target)
        fidelity = layout_fidelity(rows, names)
        if fidelity:
            key = layout.label.layout_fidelity(fold)
            outputs[key] = write_layout_fidelity(store, fold, fidelity)
        table = pa.Table.from_pylist([{n: r.get(n) for n in LABELS_SCHEMA.names} for r in rows], schema=LABELS_SCHEMA)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), CLASS_COUNTS_KEY: json.dumps(counts)})
        key = layout.label.labels(fold)
        outputs[key] = store.write_table(key, table)
        for r in rows:  # the images label made (inpainted, topped up), each vouched for by the marker
            for made in (r.get("key"), r.get("record_key")):
                if made:
                    outputs[made] = store.sha256(made)
        scores += [r["nn_similarity"] for r in rows if r["nn_similarity"] is not None]
        used = sum(usable(r) for r in rows)
        reasons: dict[str, int] = {}
        for r in rows:
            if not r["kept"]:
                reason = (r["reject_reason"] or "rejected").split(":")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
        summary[str(fold)] = {"rows": len(rows), "usable": used, "rejected": reasons,
                              "memorized": sum(bool(r["memorized"]) for r in rows),
                              "memorization_reference": reference, "topup_rounds": rounds,
                              "topped_up": sum(1 for r in rows if r["round"] > 0), "removed_stale": removed,
                              "classes": {c["class"]: {k: v for k, v in c.items() if k not in ("class", "class_id")}
                                          for c in counts}, **facts}
        if lab.method == "inpaint_outpaint":  # nothing silently lost: boxes dropped with the regenerated border
            summary[str(fold)]["dropped_boxes"] = sum(r["dropped_count"] for r in rows)
        if fidelity:
            summary[str(fold)]["layout_fidelity"] = {c["class"]: c["fidelity"] for c in fidelity}
        short = {c["class"]: c["shortfall"] for c in counts if c["shortfall"]}
        ctx.events.info(f"label fold {fold} ({lab.method}): {used}/{len(rows)} images kept with boxes"
                        f"{f' after {rounds} top-up round(s)' if rounds else ''}; rejected {reasons or 'none'}"
                        f"{f'; shortfall {short}' if short else ''}")
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
