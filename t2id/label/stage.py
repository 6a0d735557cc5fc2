"""Stage `label`: boxes for synthetic images (teacher or inpaint), memorization check, labels.parquet.

Per fold k (label.folds, default every fold):
  1. teacher: generate/fold=<k>/manifest.parquet rows get boxes from the fold's teacher
     (t2id.label.teacher; trained on the fold's real TRAIN images only) and the class-consistency gate;
     inpaint: new images are made from the fold's real TRAIN images (t2id.label.inpaint) and inherit
     their boxes.
  2. Memorization: each row's similarity to the nearest image its generator trained on
     (lora/fold=<k>/train_ids.json; without it, the fold's real TRAIN images), flag and optionally reject.
  3. label/fold=<k>/labels.parquet: LABELS_SCHEMA rows, rejected ones included with their reason.
Then label/memorization_hist.png over all folds. The grid trains *_sdxl strategies on the kept rows
with boxes; t2id.data.materialize_fold reads them as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from t2id.config import sha256_json
from t2id.data.manifest import SYNTHETIC_SCHEMA, load_classes, load_fold_rows, load_folds, load_manifest
from t2id.errors import UserError
from t2id.runner import Stage, StageContext, StageResult, console
from t2id.store import Store

HIST_KEY = "label/memorization_hist.png"

LABELS_SCHEMA = pa.schema(list(SYNTHETIC_SCHEMA) + [
    pa.field("confidence", pa.float32()),  # teacher: best confidence of a target-class box; inpaint: null
    pa.field("nn_similarity", pa.float32()),  # similarity to the nearest generator-training image
    pa.field("nn_image_id", pa.string()),  # that training image
    pa.field("memorized", pa.bool_()),  # nn_similarity >= label.memorization.threshold
    pa.field("source_image_id", pa.string()),  # inpaint: the real image that was inpainted
    pa.field("mask_rects", pa.string()),  # inpaint: JSON list of normalized [x0, y0, x1, y1] masks
])


def labels_key(fold: int) -> str:
    return f"label/fold={fold}/labels.parquet"


def generate_manifest_key(fold: int) -> str:
    return f"generate/fold={fold}/manifest.parquet"


def adapter_key(fold: int) -> str:
    return f"lora/fold={fold}/pytorch_lora_weights.safetensors"


def label_folds(ctx: StageContext) -> list[int]:
    available = sorted({int(f) for f in load_folds(ctx.store)["fold"].to_pylist()})
    folds = ctx.config.label.folds
    if folds is not None:
        missing = sorted(set(folds) - set(available))
        if missing:
            raise UserError(f"label.folds {folds}: fold(s) {missing} do not exist; the split has folds {available}")
        return list(folds)
    if ctx.config.label.method == "teacher":
        return [f for f in available if ctx.store.exists(generate_manifest_key(f))]
    return available


def teacher_detector(ctx: StageContext):
    return ctx.config.label.teacher.detector or ctx.config.grid.detector


def generator_training_rows(store: Store, fold: int) -> tuple[list[dict], str]:
    """(image rows the fold's generator trained on, which reference was used)."""
    key = f"lora/fold={fold}/train_ids.json"
    if store.exists(key):
        data = json.loads(store.read_text(key))
        ids = set(data.get("image_ids", data.get("train_ids", [])) if isinstance(data, dict) else data)
        manifest = load_manifest(store)
        rows = manifest.filter(pc.is_in(manifest["image_id"], value_set=pa.array(sorted(ids), pa.string())))
        return rows.select(["image_id", "uri"]).to_pylist(), "lora train_ids"
    return load_fold_rows(store, fold, "train").select(["image_id", "uri"]).to_pylist(), "fold train images"


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "0" if torch.cuda.is_available() else "cpu"
    return "0" if choice == "cuda" else "cpu"


def label_fold_teacher(ctx: StageContext, fold: int, names: list[str], seed: int) -> tuple[list[dict], dict]:
    from t2id.label.teacher import Teacher, label_with_teacher, local_weights, resolve_teacher

    lab = ctx.config.label
    key = generate_manifest_key(fold)
    if not ctx.store.exists(key):
        raise UserError(f"{ctx.store.uri(key)} is missing: run the generate stage for fold {fold} first, or set "
                        "label.method: inpaint")
    rows = ctx.store.read_table(key).to_pylist()
    detector = teacher_detector(ctx)
    device = _device(lab.teacher.device)
    weights_key = resolve_teacher(ctx.store, fold, lab.teacher.source, detector, Path(ctx.cache_dir), seed,
                                  device=device, workers=lab.teacher.workers)
    teacher = Teacher(local_weights(ctx.store, weights_key, Path(ctx.cache_dir)), lab.teacher.imgsz or detector.imgsz,
                      device=device, iou=lab.teacher.iou, min_confidence=lab.min_confidence)
    labelled = label_with_teacher(ctx.store, rows, teacher, names, lab.min_confidence, lab.class_consistency)
    return labelled, {"teacher": weights_key}


def label_fold_inpaint(ctx: StageContext, fold: int, names: list[str], seed: int) -> tuple[list[dict], dict]:
    from t2id.generate.plan import PlanClass
    from t2id.label.inpaint import InpaintJob, inpaint_fold
    from t2id.raycluster import ensure_ray

    cfg = ctx.config
    classes = [PlanClass(t.name, names.index(t.name), tuple(t.prompts)) for t in cfg.lora.target_classes]
    adapter = adapter_key(fold) if ctx.store.exists(adapter_key(fold)) else None
    if adapter is None:
        console.print(f"[yellow]![/] label fold {fold}: no {adapter_key(fold)}; inpainting with the base model "
                      f"{cfg.lora.base_model!r} alone")
    ensure_ray(cfg.cluster)
    job = InpaintJob(store=ctx.store, fold=fold, classes=classes, run_seed=seed, generate=cfg.generate,
                     inpaint=cfg.label.inpaint, base_model=cfg.lora.base_model,
                     cache_dir=str(Path(ctx.cache_dir).expanduser().resolve()), adapter_key=adapter,
                     allow_network=cfg.lora.allow_network, endpoint_url=cfg.store.endpoint_url)
    rows, summary = inpaint_fold(job)
    made = {r["class_id"] for r in rows}
    for cls in classes:
        if cls.class_id not in made:
            console.print(f"[yellow]![/] label fold {fold}: no real TRAIN image holds class '{cls.name}', "
                          "so nothing was inpainted for it")
    return rows, {**summary, "adapter": adapter}


def run(ctx: StageContext) -> StageResult:
    from t2id.label.memorization import histogram_png, score_rows

    lab = ctx.config.label
    names = load_classes(ctx.store)
    unknown = [t.name for t in ctx.config.lora.target_classes if t.name not in names]
    if unknown:
        raise UserError(f"lora.target_classes {unknown} are not classes of the dataset {names}; fix the names")
    seed = ctx.config.run.seed if lab.seed is None else lab.seed
    folds = label_folds(ctx)
    if not folds:
        raise UserError("label: no generate/fold=<k>/manifest.parquet found; run the generate stage first, or set "
                        "label.method: inpaint")
    outputs: dict[str, str] = {}
    summary: dict[str, dict] = {}
    scores: list[float] = []
    for fold in folds:
        if lab.method == "teacher":
            rows, facts = label_fold_teacher(ctx, fold, names, seed)
        else:
            rows, facts = label_fold_inpaint(ctx, fold, names, seed)
        training, reference = generator_training_rows(ctx.store, fold)
        mem = lab.memorization
        rows = score_rows(ctx.store, rows, training, mem.feature, mem.size, mem.threshold, mem.reject)
        table = pa.Table.from_pylist([{n: r.get(n) for n in LABELS_SCHEMA.names} for r in rows], schema=LABELS_SCHEMA)
        outputs[labels_key(fold)] = ctx.store.write_table(labels_key(fold), table)
        scores += [r["nn_similarity"] for r in rows if r["nn_similarity"] is not None]
        usable = sum(1 for r in rows if r["kept"] and r["boxes"])
        reasons: dict[str, int] = {}
        for r in rows:
            if not r["kept"]:
                reason = (r["reject_reason"] or "rejected").split(":")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
        summary[str(fold)] = {"rows": len(rows), "usable": usable, "rejected": reasons,
                              "memorized": sum(bool(r["memorized"]) for r in rows),
                              "memorization_reference": reference, **facts}
        console.print(f"label fold {fold} ({lab.method}): {usable}/{len(rows)} images kept with boxes; "
                      f"rejected {reasons or 'none'}")
    outputs[HIST_KEY] = ctx.store.write_bytes(HIST_KEY, histogram_png(scores, lab.memorization.threshold))
    return StageResult(outputs=outputs, summary={"method": lab.method, "folds": summary})


def fingerprint(ctx: StageContext) -> dict[str, str]:
    """Inputs outside the label section: the teacher's detector settings (default grid.detector) and any
    reused grid weights."""
    from t2id.label.teacher import grid_baseline_key

    lab = ctx.config.label
    if lab.method != "teacher":
        return {}
    found = {"teacher_detector": sha256_json(teacher_detector(ctx).model_dump(mode="json"))}
    if lab.teacher.source in ("grid", "auto"):
        for fold in sorted({int(f) for f in load_folds(ctx.store)["fold"].to_pylist()}):
            key = grid_baseline_key(fold)
            if ctx.store.exists(key):
                found[key] = ctx.store.sha256(key)
    return found


STAGE = Stage(name="label", sections=("label", "lora", "generate"), depends_on=("data", "split", "lora", "generate"),
              run=run, fingerprint=fingerprint)
