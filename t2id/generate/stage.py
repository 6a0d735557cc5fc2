"""Stage `generate`: per fold, N synthetic images per target class from that fold's LoRA adapter.

Per fold k (DESIGN.md store layout, keys from t2id.layout.generate), under `generate/fold=<k>/`:
  plan.parquet                     every image attempted: index, round, seed, prompt, key (t2id.generate.plan)
  images/<class-slug>/<name>.png   the images, kept AND rejected (rejected ones are never deleted)
  records/<class-slug>/<name>.json one provenance record per image, written after its PNG (commit point)
  manifest.parquet                 SYNTHETIC_SCHEMA rows (provenance, std, entropy, kept, reject_reason)
  contact_sheets/<class-slug>.png  real (fold's train part) vs kept synthetic, like the paper's Fig. 3
  _memo.json                       the fold's unit memo (t2id.resume): a finished fold is not re-verified
The adapter is the lora stage's `layout.lora.adapter(k)`; a generator never sees the fold's
validation images. With the `lora` stage disabled, the base model generates (no adapter).
A killed stage is rerun: images already present and verified are not generated again.
"""

from __future__ import annotations

import io
from functools import partial
from typing import TYPE_CHECKING

import pyarrow.compute as pc
from PIL import Image

from t2id import layout
from t2id.data.manifest import load_classes, load_fold_rows, select_folds
from t2id.errors import UserError
from t2id.generate.contact_sheet import contact_sheet
from t2id.generate.core import FoldOutcome, generate_fold
from t2id.generate.plan import PlanClass, method_classes
from t2id.generate.settings import GenerateSettings, settings
from t2id.resume import Memo, memoized
from t2id.runner import Stage, StageContext, StageResult
from t2id.store import Store

if TYPE_CHECKING:
    from t2id.generate.ray_layer import WarmPool


def write_contact_sheets(store: Store, fold: int, classes: list[PlanClass], outcome: FoldOutcome,
                         per_side: int, thumb: int) -> list[str]:
    """One sheet per class; real images are the fold's TRAIN images holding the class, by image id."""
    real_rows = load_fold_rows(store, fold, "train").to_pylist()
    keys = []
    for cls in classes:
        holding = sorted((r for r in real_rows if any(b["class_id"] == cls.class_id for b in r["boxes"])),
                         key=lambda r: r["image_id"])[:per_side]
        real = [Image.open(io.BytesIO(store.read_bytes(store.key_of(r["uri"])))) for r in holding]
        kept = [r for r in outcome.plan
                if r["class_name"] == cls.name and outcome.records[r["key"]]["kept"]][:per_side]
        synthetic = [Image.open(io.BytesIO(store.read_bytes(r["key"]))) for r in kept]
        key = layout.generate.contact_sheet(fold, cls.name)
        store.write_bytes(key, contact_sheet(real, synthetic, cls.name, fold, per_side, thumb))
        keys.append(key)
    return keys


def fold_memo(ctx: StageContext, s: GenerateSettings, fold: int, classes: list[PlanClass]) -> Memo:
    """The fold as a unit of work: everything its outputs depend on, and nothing about other folds."""
    store = ctx.store
    identity = {
        "fold": fold,
        "settings": s.model_dump(mode="json", exclude={"folds": True, "generate": {"folds"}}),
        "classes": [[c.name, c.class_id] for c in classes],
        "adapter": store.sha256(s.generator_key(fold)) if s.use_adapter else None,
        # the contact sheets show the fold's real TRAIN images
        "inputs": {k: store.sha256(k) for k in (layout.data.manifest, layout.split.folds)},
    }
    return Memo(store, layout.memo(layout.generate.fold(fold)), identity, ignore=ctx.force)


def generate_one_fold(ctx: StageContext, s: GenerateSettings, fold: int, classes: list[PlanClass],
                      pool: WarmPool) -> tuple[list[str], dict]:
    """Generate the fold on the stage's warm actor pool; (output keys, summary facts)."""
    from t2id.raycluster import ensure_ray

    store, g = ctx.store, s.generate
    ensure_ray(ctx.cluster)
    outcome = generate_fold(store, s, fold, classes, pool, ctx.events)
    sheets = write_contact_sheets(store, fold, classes, outcome, g.contact_sheet_images, g.contact_sheet_thumb)
    manifest = store.read_table(layout.generate.manifest(fold))
    facts = {
        "generated": outcome.generated, "reused": outcome.reused, "removed_stale": outcome.removed,
        "kept_fraction": round(pc.mean(manifest["kept"].cast("int8")).as_py() or 0.0, 4),
        "classes": {name: vars(c) for name, c in outcome.classes.items()},
        "pool": pool_facts(pool),
    }
    # Every image and record is an output: the fold memo and the stage marker then vouch for each file, so a
    # truncated or deleted PNG is caught before a skip (t2id.resume.check_outputs) instead of in a later stage.
    images = [key for row in outcome.plan for key in (row["key"], row["record_key"])]
    return [layout.generate.plan(fold), layout.generate.manifest(fold), *sheets, *images], facts


def pool_facts(pool: WarmPool) -> dict:
    """The warm pool so far in this stage: the actors it started, the live ones, and how often these loaded
    the pipeline and adapters."""
    stats = pool.stats() if pool.actors else []
    return {"actors_started": pool.started, "actors": len(stats),
            "pipeline_loads": sum(a["pipeline_loads"] for a in stats),
            "adapter_loads": sum(a["adapter_loads"] for a in stats), "pids": sorted(a["pid"] for a in stats)}


def worker_class(s: GenerateSettings) -> type:
    """The callable class that draws the fold's images: SDXL's ImageGenerator, or for lora.method ddpm the
    fold's per-class DDPMs (t2id.generate.ddpm_worker.DdpmGenerator). Also label's teacher top-up's."""
    if s.method == "ddpm" and s.use_adapter:
        from t2id.generate.ddpm_worker import DdpmGenerator

        return DdpmGenerator
    from t2id.generate.worker import ImageGenerator

    return ImageGenerator


def run(ctx: StageContext, s: GenerateSettings) -> StageResult:
    from t2id.generate.ray_layer import WarmPool

    # One pool for every fold and top-up round: each actor loads the pipeline once and swaps adapters.
    with WarmPool(worker_class(s), s, ctx.store, s.generate, str(ctx.cache_dir), ctx.endpoint_url) as pool:
        return run_folds(ctx, s, pool)


def run_folds(ctx: StageContext, s: GenerateSettings, pool: WarmPool) -> StageResult:
    store = ctx.store
    classes = method_classes(s, load_classes(store))
    folds = select_folds(store, s.folds, s.folds_field)
    if s.use_adapter:
        for fold in folds:
            key = s.generator_key(fold)
            if not store.exists(key):
                raise UserError(f"{store.uri(key)} is missing: run the lora stage for fold {fold} "
                                f"(`t2id run CONFIG --only lora`) or leave fold {fold} out of {s.folds_field}")
    outputs: dict[str, str] = {}
    summary: dict[str, object] = {"folds": {}, "shortfall": 0, "generated": 0, "reused": 0,
                                  "entropy_units": "bits (Shannon, 256 grey levels)", "std_units": "grey levels 0-255"}
    for fold in folds:
        memo, reused = memoized(fold_memo(ctx, s, fold, classes),
                                partial(generate_one_fold, ctx, s, fold, classes, pool))
        facts = memo["extra"]
        if reused:  # a finished fold of an earlier run with the same identity: nothing re-verified
            attempted = sum(c["attempted"] for c in facts["classes"].values())
            facts = {**facts, "generated": 0, "reused": attempted, "removed_stale": 0, "fold_memo": "reused"}
            ctx.events.info(f"generate fold {fold}: done before with the same settings and inputs, reused")
        outputs.update(memo["outputs"])
        summary["folds"][str(fold)] = facts
        summary["shortfall"] += sum(c["shortfall"] for c in facts["classes"].values())
        summary["generated"] += facts["generated"]
        summary["reused"] += facts["reused"]
    return StageResult(outputs=outputs, summary=summary)


STAGE = Stage(name="generate", settings=settings, depends_on=("data", "split", "lora"), run=run)
