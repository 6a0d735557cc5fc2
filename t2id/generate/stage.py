"""Stage `generate`: per fold, N synthetic images per target class from that fold's LoRA adapter.

Per fold k (DESIGN.md store layout), under `generate/fold=<k>/`:
  plan.parquet                     every image attempted: index, round, seed, prompt, key (t2id.generate.plan)
  images/<class-slug>/<name>.png   the images, kept AND rejected (rejected ones are never deleted)
  records/<class-slug>/<name>.json one provenance record per image, written after its PNG (commit point)
  manifest.parquet                 SYNTHETIC_SCHEMA rows (provenance, std, entropy, kept, reject_reason)
  contact_sheets/<class-slug>.png  real (fold's train part) vs kept synthetic, like the paper's Fig. 3
The adapter is `lora/fold=<k>/pytorch_lora_weights.safetensors`; a generator never sees the fold's
validation images. With the `lora` stage disabled, the base model generates (no adapter).
A killed stage is rerun: images already present and verified are not generated again.
"""

from __future__ import annotations

import io

import pyarrow.compute as pc
from PIL import Image

from t2id.data.manifest import load_classes, load_fold_rows, load_folds
from t2id.errors import UserError
from t2id.generate.contact_sheet import contact_sheet
from t2id.generate.plan import PlanClass, class_slug, fold_prefix
from t2id.generate.run import FoldJob, FoldOutcome, generate_fold, manifest_key, plan_key
from t2id.runner import Stage, StageContext, StageResult
from t2id.store import Store

ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def adapter_key(fold: int) -> str:
    return f"lora/fold={fold}/{ADAPTER_FILE}"


def sheet_key(fold: int, class_name: str) -> str:
    return f"{fold_prefix(fold)}/contact_sheets/{class_slug(class_name)}.png"


def target_classes(ctx: StageContext) -> list[PlanClass]:
    """lora.target_classes with their ids in data/classes.json."""
    names = load_classes(ctx.store)
    classes = []
    for target in ctx.config.lora.target_classes:
        if target.name not in names:
            raise UserError(f"lora.target_classes: class {target.name!r} is not in data/classes.json {names}; "
                            "fix the name in the config")
        classes.append(PlanClass(target.name, names.index(target.name), tuple(target.prompts)))
    return classes


def folds_to_generate(ctx: StageContext) -> list[int]:
    available = sorted({int(f) for f in load_folds(ctx.store)["fold"].to_pylist()})
    wanted = ctx.config.generate.folds
    if wanted is None and ctx.stage_enabled("lora"):
        wanted = ctx.config.lora.folds  # only folds that have an adapter
    if wanted is None:
        return available
    missing = [f for f in wanted if f not in available]
    if missing:
        raise UserError(f"generate.folds {missing} do not exist: split/folds.parquet has folds {available}")
    return sorted(wanted)


def write_contact_sheets(store: Store, fold: int, classes: list[PlanClass], outcome: FoldOutcome,
                         per_side: int, thumb: int) -> dict[str, str]:
    """One sheet per class; real images are the fold's TRAIN images holding the class, by image id."""
    real_rows = load_fold_rows(store, fold, "train").to_pylist()
    outputs = {}
    for cls in classes:
        holding = sorted((r for r in real_rows if any(b["class_id"] == cls.class_id for b in r["boxes"])),
                         key=lambda r: r["image_id"])[:per_side]
        real = [Image.open(io.BytesIO(store.read_bytes(store.key_of(r["uri"])))) for r in holding]
        kept = [r for r in outcome.plan
                if r["class_name"] == cls.name and outcome.records[r["key"]]["kept"]][:per_side]
        synthetic = [Image.open(io.BytesIO(store.read_bytes(r["key"]))) for r in kept]
        key = sheet_key(fold, cls.name)
        outputs[key] = store.write_bytes(key, contact_sheet(real, synthetic, cls.name, fold, per_side, thumb))
    return outputs


def run(ctx: StageContext) -> StageResult:
    from t2id.raycluster import ensure_ray

    cfg, store = ctx.config.generate, ctx.store
    classes = target_classes(ctx)
    use_adapter = ctx.stage_enabled("lora")
    ensure_ray(ctx.config.cluster)
    outputs: dict[str, str] = {}
    summary: dict[str, object] = {"folds": {}, "shortfall": 0, "generated": 0, "reused": 0,
                                  "entropy_units": "bits (Shannon, 256 grey levels)", "std_units": "grey levels 0-255"}
    for fold in folds_to_generate(ctx):
        key = adapter_key(fold) if use_adapter else None
        if key and not store.exists(key):
            raise UserError(f"{store.uri(key)} is missing: run the lora stage for fold {fold} "
                            f"(`t2id run CONFIG --only lora`) or leave fold {fold} out of generate.folds")
        job = FoldJob(store=store, fold=fold, classes=classes, run_seed=ctx.config.run.seed, cfg=cfg,
                      base_model=ctx.config.lora.base_model, cache_dir=str(ctx.cache_dir), adapter_key=key,
                      allow_network=ctx.config.lora.allow_network, endpoint_url=ctx.config.store.endpoint_url,
                      clip_weights=ctx.config.evaluate.clip_weights)
        outcome = generate_fold(job)
        for k in (plan_key(fold), manifest_key(fold)):
            outputs[k] = store.sha256(k)
        outputs.update(write_contact_sheets(store, fold, classes, outcome, cfg.contact_sheet_images,
                                            cfg.contact_sheet_thumb))
        manifest = store.read_table(manifest_key(fold))
        summary["folds"][str(fold)] = {
            "generated": outcome.generated, "reused": outcome.reused, "removed_stale": outcome.removed,
            "kept_fraction": round(pc.mean(manifest["kept"].cast("int8")).as_py() or 0.0, 4),
            "classes": {name: vars(c) for name, c in outcome.classes.items()},
        }
        summary["shortfall"] += sum(c.shortfall for c in outcome.classes.values())
        summary["generated"] += outcome.generated
        summary["reused"] += outcome.reused
    return StageResult(outputs=outputs, summary=summary)


def fingerprint(ctx: StageContext) -> dict[str, str]:
    """The CLIP weights matter only when the CLIP gate is on (they live in the evaluate section)."""
    if ctx.config.generate.quality.min_clip_score is None:
        return {}
    return {"evaluate.clip_weights": ctx.config.evaluate.clip_weights}


STAGE = Stage(name="generate", sections=("generate", "lora"), depends_on=("data", "split", "lora"), run=run,
              fingerprint=fingerprint)
