"""DreamBooth's class-prior images (Ruiz et al. 2023, arXiv 2208.12242, Sec. 4.3), drawn by the base model.

Per fold and target class, lora.dreambooth.prior_images_per_class images of the plain class prompt
(no identifier), made by the generate machinery (plan rows, `ImageGenerator` on a Ray actor pool, the
record-after-PNG commit point) with the base model alone: no adapter, no quality gate (the paper keeps
every sample). Seeds come from the fold's training seed in a namespace of their own
(methods.PRIOR_SEED_NAMESPACE), so they never repeat an image of the generate stage. Images, records
and the plan live under `layout.lora.prior(fold)`; a rerun verifies what is there and draws only the
missing ones. The set is listed, with its digest, in the fold's train_ids.json (the adapter's provenance).
"""

from __future__ import annotations

import hashlib
import json
from functools import partial

from t2id import layout
from t2id.data.manifest import image_id_of
from t2id.generate.config import GenerateConfig
from t2id.generate.core import execute_rows, record_from_batch, verified_records
from t2id.generate.plan import PlanClass, gen_params, plan_rows, to_table
from t2id.generate.settings import GenerateSettings
from t2id.lora.config import LoraConfig, TargetClass
from t2id.lora.data import Example
from t2id.lora.methods import PRIOR_SEED_NAMESPACE, prior_prompts
from t2id.store import Store


def prior_settings(cfg: LoraConfig, seed: int) -> GenerateSettings:
    """The generate settings the prior images are drawn with: base model, lora.resolution, prior steps/CFG."""
    db = cfg.dreambooth
    assert db is not None
    g = GenerateConfig(images_per_class=db.prior_images_per_class, width=cfg.resolution, height=cfg.resolution,
                       guidance=db.prior_guidance, steps=db.prior_steps, quality={"min_std": 0, "min_entropy": 0},
                       device="cuda" if cfg.use_gpu else "cpu", cpus_per_actor=cfg.cpus_per_worker)
    classes = [TargetClass(name=t.name, prompts=prior_prompts(db, t.name, list(t.prompts)))
               for t in cfg.target_classes]
    return GenerateSettings(generate=g, target_classes=classes, base_model=cfg.base_model,
                            allow_network=cfg.allow_network, run_seed=seed, use_adapter=False, folds=None,
                            clip_weights=None)


def prior_plan(s: GenerateSettings, fold: int) -> list[dict]:
    """Plan rows of the fold's prior images, at keys under layout.lora.prior(fold)."""
    params = gen_params(s, "")
    rows = []
    for class_id, t in enumerate(s.target_classes):  # class_id: position in lora.target_classes (unused downstream)
        cls = PlanClass(t.name, class_id, tuple(t.prompts))
        for row in plan_rows(s.run_seed, fold, cls, params, 0, s.generate.images_per_class,
                             seed_namespace=PRIOR_SEED_NAMESPACE):
            rows.append({**row, "key": layout.lora.prior_image(fold, t.name, row["name"]),
                         "record_key": layout.lora.prior_record(fold, t.name, row["name"])})
    return rows


def make_prior_images(store: Store, cfg: LoraConfig, fold: int, seed: int, cache_dir: str,
                      endpoint_url: str | None = None) -> tuple[list[Example], dict]:
    """Draw (or verify) the fold's prior images; (their training examples, their provenance summary)."""
    from t2id.generate.ray_layer import run_ray
    from t2id.generate.worker import ImageGenerator

    s = prior_settings(cfg, seed)
    rows = prior_plan(s, fold)
    store.write_table(layout.lora.prior_plan(fold), to_table(rows))
    listed = set(store.list(layout.lora.prior(fold)))
    records = verified_records(store, rows, listed, need_clip=False)
    todo = [r for r in rows if r["key"] not in records]
    if todo:
        executor = partial(run_ray, worker_cls=ImageGenerator, settings=s, store=store, g=s.generate,
                           cache_dir=cache_dir, endpoint_url=endpoint_url)
        execute_rows(f"lora fold {fold}: dreambooth prior images", todo, executor, records,
                     lambda batch, i, row: record_from_batch(batch, i, row, s.base_model, s.generate.scheduler, ""))
    examples = [Example(image_id_of(records[r["key"]]["sha256"]), r["key"], records[r["key"]]["sha256"],
                        r["class_name"], r["prompt"]) for r in rows]
    return examples, prior_provenance(rows, records)


def prior_digest(pairs: list[tuple[str, str]]) -> str:
    """sha256 over the prior set's (key, image sha256) pairs, in plan order."""
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def prior_provenance(rows: list[dict], records: dict[str, dict]) -> dict:
    """train_ids.json's `prior`: count, digest, and each image's key, record, class, prompt, seed."""
    pairs = [(r["key"], records[r["key"]]["sha256"]) for r in rows]
    return {"count": len(rows), "digest": prior_digest(pairs),
            "images": [{"key": r["key"], "record": r["record_key"], "class": r["class_name"], "prompt": r["prompt"],
                        "seed": r["seed"], "sha256": records[r["key"]]["sha256"]} for r in rows]}
