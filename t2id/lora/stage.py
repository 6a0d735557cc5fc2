"""Stage `lora`: one SDXL LoRA adapter per fold, trained on that fold's TRAIN images of the target classes.

Per fold k (DESIGN.md store layout, common contracts), under `lora/fold=<k>/`:
  pytorch_lora_weights.safetensors   the adapter (diffusers format: pipe.load_lora_weights(dir))
  train_ids.json                     {"fold", "image_ids", "examples": [{image_id, class, prompt}]}
  train_log.parquet                  step, epoch, loss, lr, time
  validation/epoch=<e>/<class>-<i>.png   a few images per target class after epochs
  ranks/rank=<r>.json                examples each DDP rank processed; its final adapter digest
  done.json                          the fold's fingerprint, written last
Ray Train's checkpoints live under `lora/_ray/`. A fold whose done.json matches the current
fingerprint (lora config, seed, training examples) is reused, so a killed stage redoes only the
unfinished folds; an unfinished fold resumes from its last checkpoint (same Ray Train run name).
"""

from __future__ import annotations

import hashlib
import json

from t2id.config import sha256_json
from t2id.data.manifest import fold_ids, load_classes, load_fold_rows, load_folds
from t2id.errors import UserError
from t2id.lora.data import Example, select_examples
from t2id.lora.train import ADAPTER_FILE
from t2id.runner import Stage, StageContext, StageResult


def fold_prefix(fold: int) -> str:
    return f"lora/fold={fold}"


def fold_seed(run_seed: int, fold: int, override: int | None) -> int:
    """Training seed of a fold: lora.seed when set, else derived from run.seed and the fold."""
    if override is not None:
        return override
    return int.from_bytes(hashlib.sha256(f"lora/{run_seed}/{fold}".encode()).digest()[:4], "little")


def _folds(ctx: StageContext) -> list[int]:
    available = sorted({int(f) for f in load_folds(ctx.store)["fold"].to_pylist()})
    wanted = ctx.config.lora.folds
    if wanted is None:
        return available
    missing = [f for f in wanted if f not in available]
    if missing:
        raise UserError(f"lora.folds {missing} do not exist: split/folds.parquet has folds {available}")
    return sorted(set(wanted))


def fold_examples(store, fold: int, class_names: list[str], targets: list[tuple[str, list[str]]]) -> list[Example]:
    """The fold's training examples: its TRAIN rows holding a target class, checked against its val part."""
    examples = select_examples(load_fold_rows(store, fold, "train"), class_names, targets, store)
    if not examples:
        raise UserError(f"fold {fold}: no training image holds any of {[n for n, _ in targets]}; check "
                        "lora.target_classes against data/classes.json")
    val_ids = set(fold_ids(store, fold, "val"))
    leaked = [e.image_id for e in examples if e.image_id in val_ids]
    if leaked:  # the split contract makes this impossible; fail loudly if it ever is not
        raise RuntimeError(f"fold {fold}: validation images {leaked[:3]} are in the training set")
    return examples


def run(ctx: StageContext) -> StageResult:
    from t2id.lora.ray_train import train_fold
    from t2id.raycluster import ensure_ray

    cfg = ctx.config.lora
    store = ctx.store
    class_names = load_classes(store)
    targets = [(t.name, list(t.prompts)) for t in cfg.target_classes]
    outputs: dict[str, str] = {}
    summary: dict[str, object] = {"folds": {}}
    for fold in _folds(ctx):
        prefix = fold_prefix(fold)
        examples = fold_examples(store, fold, class_names, targets)
        seed = fold_seed(ctx.config.run.seed, fold, cfg.seed)
        fingerprint = sha256_json({"lora": cfg.model_dump(mode="json"), "seed": seed,
                                   "examples": [(e.image_id, e.sha256, e.prompt) for e in examples]})
        done_key = f"{prefix}/done.json"
        done = json.loads(store.read_text(done_key)) if store.exists(done_key) else None
        if not (done and done.get("fingerprint") == fingerprint and store.exists(f"{prefix}/{ADAPTER_FILE}")):
            store.delete(done_key)
            store.write_text(f"{prefix}/train_ids.json", json.dumps({
                "fold": fold,
                "image_ids": [e.image_id for e in examples],
                "examples": [{"image_id": e.image_id, "class": e.class_name, "prompt": e.prompt} for e in examples],
            }, indent=1))
            ensure_ray(ctx.config.cluster)
            train_fold(store, prefix, examples, cfg, seed, ctx.cache_dir, run_name=f"fold={fold}-{fingerprint[:12]}")
            store.write_text(done_key, json.dumps({"fingerprint": fingerprint}))
        log = store.read_table(f"{prefix}/train_log.parquet").to_pylist()
        for key in store.list(prefix):
            if not key.startswith(f"{prefix}/ranks/") and key != done_key:
                outputs[key] = store.sha256(key)
        summary["folds"][str(fold)] = {"images": len(examples), "steps": len(log),
                                       "first_loss": round(log[0]["loss"], 5) if log else None,
                                       "last_loss": round(log[-1]["loss"], 5) if log else None}
    return StageResult(outputs=outputs, summary=summary)


STAGE = Stage(name="lora", sections=("lora",), depends_on=("data", "split"), run=run)
