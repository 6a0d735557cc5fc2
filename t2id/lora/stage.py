"""Stage `lora`: one SDXL LoRA adapter per fold, trained on that fold's TRAIN images of the target classes.

Per fold k (DESIGN.md store layout), under `layout.lora.fold(k)`:
  adapter       pytorch_lora_weights.safetensors (diffusers format: pipe.load_lora_weights(dir))
  train_ids     train_ids.json: {"fold", "image_ids", "examples": [{image_id, class, prompt}]}
  train_log     train_log.parquet: step, epoch, loss, lr, time
  validation    validation/epoch=<e>/<class>-<i>.png: a few images per target class after epochs
  ranks         ranks/rank=<r>.json: examples each DDP rank processed; its final adapter digest
  memo          _memo.json (t2id.resume): the fold's identity and output hashes, written last
lora.method (t2id.lora.methods) changes what a fold trains, never on what: dreambooth_lora prompts
with the identifier and first draws the class-prior images under prior/ (t2id.lora.prior);
textual_inversion writes learned_embeds.safetensors + tokens.json instead of an adapter; ddpm trains
one unconditional DDPM per class from scratch instead (t2id.lora.ddpm: ddpm/<class>/, ddpm/models.json).
Ray Train's checkpoints live under `layout.lora.ray_storage`. A fold whose memo matches (lora
settings, seed, training examples) and whose outputs are intact is reused, so a killed stage redoes
only the unfinished folds; an unfinished fold resumes from its last checkpoint (the Ray Train run
name is the identity's digest). --force retrains from scratch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from t2id import layout
from t2id.data.manifest import fold_ids, load_classes, load_fold_rows, select_folds
from t2id.errors import UserError
from t2id.events import Advance
from t2id.lora.config import LoraConfig
from t2id.lora.data import Example, select_examples
from t2id.lora.methods import LayoutConfig, method_prompt, method_tokens
from t2id.lora.settings import LoraSettings, settings
from t2id.resume import Memo, memoized
from t2id.runner import Stage, StageContext, StageResult
from t2id.store import Store
from t2id.tracking import start as start_tracking


SEED_SALT = "lora"  # hashed with run.seed and the fold into the fold's seed (not a store key)


def fold_seed(run_seed: int | None, fold: int, override: int | None) -> int:
    """Training seed of a fold: lora.seed when set, else derived from run.seed and the fold."""
    if override is not None:
        return override
    return int.from_bytes(hashlib.sha256(f"{SEED_SALT}/{run_seed}/{fold}".encode()).digest()[:4], "little")


def fold_examples(store: Store, fold: int, class_names: list[str],
                  targets: list[tuple[str, list[str]]]) -> list[Example]:
    """The fold's training examples: its TRAIN rows holding a target class, checked against its val part."""
    examples = select_examples(load_fold_rows(store, fold, "train"), class_names, targets, store)
    if not examples:
        raise UserError(f"fold {fold}: no training image holds any of {[n for n, _ in targets]}; check "
                        f"lora.target_classes against {layout.data.classes}")
    val_ids = set(fold_ids(store, fold, "val"))
    leaked = [e.image_id for e in examples if e.image_id in val_ids]
    if leaked:  # the split contract makes this impossible; fail loudly if it ever is not
        raise RuntimeError(f"fold {fold}: validation images {leaked[:3]} are in the training set")
    return examples


def method_targets(cfg: LoraConfig) -> list[tuple[str, list[str]]]:
    """(class, prompts as the chosen method trains them) of every target class (t2id.lora.methods)."""
    return [(t.name, [method_prompt(p, t.name, cfg.method, cfg.dreambooth, cfg.textual_inversion)
                      for p in t.prompts]) for t in cfg.target_classes]


def identity_section(cfg: LoraConfig) -> dict:
    """The lora section as a fold's identity: less `folds` (which only says which folds to train) and, for
    the default method, less the method keys, so adapters trained before lora.method existed stay valid."""
    if cfg.method == "ddpm":  # the SDXL/LoRA settings it does not read are left out (t2id.lora.ddpm.ddpm_view)
        from t2id.lora.ddpm import ddpm_view

        cfg = ddpm_view(cfg)
    exclude = {"folds"} | ({"method", "dreambooth", "textual_inversion", "layout"} if cfg.method == "lora" else set())
    if cfg.ddpm is None:  # added with lora.method ddpm: folds trained before it stay valid
        exclude.add("ddpm")
    return cfg.model_dump(mode="json", exclude=exclude)


def with_layout(store: Store, fold: int, class_names: list[str], examples: list[Example],
                layout_cfg: LayoutConfig) -> list[Example]:
    """layout_lora's training prompts: the class prompt followed by the image's boxes of that class as
    GeoDiffusion-style location tokens."""
    from dataclasses import replace

    from t2id.lora.location import class_boxes, layout_prompt

    boxes_of = {r["image_id"]: r["boxes"] or [] for r in load_fold_rows(store, fold, "train").to_pylist()}
    out = []
    for e in examples:
        boxes = class_boxes(boxes_of[e.image_id], class_names.index(e.class_name), layout_cfg.max_boxes)
        out.append(replace(e, prompt=layout_prompt(e.prompt, e.class_name, boxes, layout_cfg.bins)))
    return out


def fold_memo(ctx: StageContext, s: LoraSettings, fold: int, seed: int, examples: list[Example]) -> Memo:
    """What makes a fold's adapter what it is: the lora section (less `folds`, which only says which
    folds to train), the fold's seed and its training examples (ids, content hashes, prompts)."""
    identity = {"lora": identity_section(s.lora), "seed": seed,
                "examples": [[e.image_id, e.sha256, e.prompt] for e in examples]}
    return Memo(ctx.store, layout.memo(layout.lora.fold(fold)), identity, ignore=ctx.force)


def fold_steps(s: LoraSettings, n_examples: int) -> int | None:
    """Optimizer steps of a fold's training (None when its images cannot fill a batch: training says why)."""
    from t2id.lora.train import make_schedule

    try:
        return make_schedule(n_examples, s.lora, s.lora.num_workers).total_steps
    except ValueError:
        return None


def train_one_fold(ctx: StageContext, s: LoraSettings, fold: int, seed: int, examples: list[Example],
                   memo: Memo, advance: Advance | None = None) -> list[str]:
    """Train the fold's adapter on Ray; return the fold's output keys. `advance` counts optimizer steps."""
    from t2id.lora.ray_layer import train_fold
    from t2id.raycluster import ensure_ray, progress_relay

    store = ctx.store
    cfg = s.lora
    if cfg.method == "ddpm":  # no base model: one DDPM per class from scratch
        from t2id.lora.ddpm import train_ddpm_fold

        return train_ddpm_fold(ctx, s, fold, seed, examples, memo, advance)
    prior_examples, prior = None, None
    if cfg.method == "dreambooth_lora":  # the base model draws the class priors first (on Ray actors)
        from t2id.lora.prior import make_prior_images

        ensure_ray(ctx.cluster)
        prior_examples, prior = make_prior_images(store, cfg, fold, seed, str(Path(ctx.cache_dir).expanduser()),
                                                  ctx.endpoint_url)
    provenance = {
        "fold": fold,
        "image_ids": [e.image_id for e in examples],
        "examples": [{"image_id": e.image_id, "class": e.class_name, "prompt": e.prompt} for e in examples],
    }
    if cfg.method != "lora":  # the default's file stays as it was
        provenance["method"] = cfg.method
        provenance["tokens"] = {t.name: method_tokens(t.name, cfg.method, cfg.dreambooth, cfg.textual_inversion)
                                for t in cfg.target_classes}
    if prior is not None:
        provenance["prior"] = prior
    store.write_text(layout.lora.train_ids(fold), json.dumps(provenance, indent=1))
    run_name = f"fold={fold}-{memo.digest[:12]}"
    if ctx.force:  # retrain from scratch: Ray Train would otherwise restore this run's last checkpoint
        store.delete_prefix(layout.lora.ray_run(run_name))
    ensure_ray(ctx.cluster)
    start_tracking(ctx.tracking)  # an unusable MLflow URI fails here, before training
    with progress_relay(advance or (lambda n=1, status=None: None)) as relay:
        train_fold(store, fold, examples, s.lora, seed, Path(ctx.cache_dir), run_name=run_name,
                   endpoint_url=ctx.endpoint_url, progress=relay, tracking=ctx.tracking,
                   prior_examples=prior_examples, prompts=dict(method_targets(cfg)))
    weights = ([layout.lora.embeddings(fold), layout.lora.tokens(fold)] if cfg.method == "textual_inversion"
               else [layout.lora.adapter(fold)])
    priors = [] if prior is None else [layout.lora.prior_plan(fold),
                                       *(k for r in prior["images"] for k in (r["key"], r["record"]))]
    return [*weights, layout.lora.train_ids(fold), layout.lora.train_log(fold), *priors]


def run(ctx: StageContext, s: LoraSettings) -> StageResult:
    store = ctx.store
    class_names = load_classes(store)
    targets = method_targets(s.lora)
    outputs: dict[str, str] = {}
    summary: dict[str, object] = {"folds": {}}
    folds = select_folds(store, s.lora.folds, "lora.folds")
    examples_of = {fold: fold_examples(store, fold, class_names, targets) for fold in folds}
    if s.lora.layout is not None:  # layout_lora: each image's prompt also states its boxes (t2id.lora.location)
        examples_of = {fold: with_layout(store, fold, class_names, examples, s.lora.layout)
                       for fold, examples in examples_of.items()}
    if s.lora.method == "ddpm":
        from t2id.lora.ddpm import fold_steps as ddpm_fold_steps

        steps = {fold: ddpm_fold_steps(s.lora, examples) for fold, examples in examples_of.items()}
    else:
        steps = {fold: fold_steps(s, len(examples)) for fold, examples in examples_of.items()}
    total = None if None in steps.values() else sum(steps.values())
    with ctx.events.progress("lora: optimizer steps, all folds", total) as advance:
        for fold in folds:
            examples = examples_of[fold]
            seed = fold_seed(s.run_seed, fold, s.lora.seed)
            memo = fold_memo(ctx, s, fold, seed, examples)
            _, reused = memoized(memo, lambda: train_one_fold(ctx, s, fold, seed, examples, memo, advance))
            if reused:
                advance(steps[fold] or 0)
                ctx.events.info(f"lora: fold {fold} is up to date, reusing its adapter")
            # Published: everything the fold wrote but the per-rank records and the memo itself.
            for key in store.list(layout.lora.fold(fold)):
                if not key.startswith(layout.lora.ranks(fold) + "/") and key != memo.key:
                    outputs[key] = store.sha256(key)
            log = store.read_table(layout.lora.train_log(fold)).to_pylist()
            summary["folds"][str(fold)] = {"images": len(examples), "steps": len(log), "reused": reused,
                                           "first_loss": round(log[0]["loss"], 5) if log else None,
                                           "last_loss": round(log[-1]["loss"], 5) if log else None}
    return StageResult(outputs=outputs, summary=summary)


STAGE = Stage(name="lora", settings=settings, depends_on=("data", "split"), run=run)
