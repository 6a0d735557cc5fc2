"""Generation of one fold, exactly once: plan -> verify the store -> execute -> top-up -> manifest.

  1. Plan round 0: N rows per class (t2id.generate.plan), deterministic seeds and keys.
  2. Verify: list the fold's prefix once; a row is done when its JSON record exists, was made
     with the same parameters (params_digest) and the PNG's sha256 equals the record's. Only
     missing or corrupt rows go to the executor. A retried task or a rerun writes the same key
     again, so there is never a second copy, and a row is never lost: until its record is
     written, it counts as missing.
  3. Execute the pending rows: an `Executor` renders them and hands back finished batches. The
     stage's executor is t2id.generate.ray_layer.WarmPool (warm Ray actors for every fold); this module
     stays Ray-free, and `LocalExecutor` runs one worker in-process (tests, debugging).
  4. Gate: re-judge every row from its recorded std/entropy/CLIP score with the current
     thresholds. A class short of N kept images gets a top-up round of (N - kept) rows with the
     next indices (fresh seeds), until N are kept or ceil(max_attempts_factor x N) rows were tried;
     a class still short is reported. Rejected images stay in the store and in the manifest.
  5. Publish plan.parquet (all rounds) and manifest.parquet (SYNTHETIC_SCHEMA, one row per plan
     row); PNGs/records under the fold's prefix that are not in the plan (left by an older config)
     are removed so the store holds exactly the plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from t2id import layout
from t2id.data.manifest import SYNTHETIC_SCHEMA, image_id_of, load_fold_rows
from t2id.events import Events, LogEvents
from t2id.generate.plan import PlanClass, gen_params, initial_plan, params_digest, plan_rows, to_table
from t2id.generate.quality import judge
from t2id.generate.settings import GenerateSettings
from t2id.store import Store

OnBatch = Callable[[dict[str, Any]], None]
# An executor renders plan rows and calls on_batch with each finished batch of the worker's result columns.
Executor = Callable[[list[dict], OnBatch], None]


@dataclass
class ClassOutcome:
    planned: int  # target: images_per_class
    attempted: int
    kept: int
    shortfall: int


@dataclass
class FoldOutcome:
    plan: list[dict]
    records: dict[str, dict]  # image key -> record (as written by the worker, gate re-judged)
    generated: int = 0  # images rendered by this call
    reused: int = 0  # rows found done and verified in the store
    removed: int = 0  # stale objects removed from the fold's prefix
    classes: dict[str, ClassOutcome] = field(default_factory=dict)


def verified_records(store: Store, rows: list[dict], listed: set[str], need_clip: bool) -> dict[str, dict]:
    """Records of the rows already done: record present, same parameters, PNG checksum matches."""
    done: dict[str, dict] = {}
    for row in rows:
        if row["record_key"] not in listed or row["key"] not in listed:
            continue
        try:
            record = json.loads(store.read_text(row["record_key"]))
        except (ValueError, UnicodeDecodeError):
            continue  # unreadable record: redo the row
        if record.get("params_digest") != row["params_digest"]:
            continue
        if need_clip and record.get("clip_score") is None:
            continue
        if store.sha256(row["key"]) != record.get("sha256"):
            continue  # PNG replaced or corrupt since its record was written
        done[row["key"]] = record
    return done


def worker_batch(rows: list[dict], columns: Iterable[str]) -> dict[str, np.ndarray]:
    """Plan rows as the numpy batch a worker's __call__ takes (what Ray Data hands it)."""
    return {c: np.array([r[c] for r in rows], dtype=np.int64 if c == "seed" else object) for c in columns}


class LocalExecutor:
    """In-process executor (no Ray): one already-built worker, reused across top-up rounds and calls."""

    def __init__(self, worker: Any, batch_size: int) -> None:
        self.worker, self.batch_size = worker, batch_size

    def __call__(self, rows: list[dict], on_batch: OnBatch) -> None:
        for start in range(0, len(rows), self.batch_size):
            on_batch(self.worker(worker_batch(rows[start:start + self.batch_size], self.worker.PLAN_COLUMNS)))


def record_from_batch(batch: dict[str, Any], i: int, row: dict, base_model: str, scheduler: str,
                      lora_sha256: str) -> dict:
    """The per-image record of row `row`, rebuilt on the driver from result column i of a worker batch."""
    clip = float(batch["clip_score"][i])
    return {"key": row["key"], "sha256": str(batch["sha256"][i]), "params_digest": row["params_digest"],
            "seed": row["seed"], "prompt": row["prompt"], "width": int(batch["width"][i]),
            "height": int(batch["height"][i]), "std": float(batch["std"][i]),
            "entropy": float(batch["entropy"][i]), "clip_score": None if math.isnan(clip) else clip,
            "kept": bool(batch["kept"][i]), "reject_reason": str(batch["reject_reason"][i]),
            "base_model": base_model, "lora_sha256": lora_sha256, "scheduler": scheduler}


def execute_rows(what: str, rows: list[dict], executor: Executor, records: dict[str, dict],
                 make_record: Callable[[dict[str, Any], int, dict], dict],
                 advance: Callable[[int], None] = lambda n: None) -> int:
    """Run `rows` through the executor, adding each finished row's record to `records`; returns how many.

    Raises when the executor returned without some rows: a manifest is never published with gaps.
    """
    by_key = {r["key"]: r for r in rows}
    made = 0

    def on_batch(batch: dict[str, Any]) -> None:
        nonlocal made
        for i, key in enumerate(batch["key"]):
            records[str(key)] = make_record(batch, i, by_key[str(key)])
        made += len(batch["key"])
        advance(len(batch["key"]))

    executor(rows, on_batch)
    missing = [k for k in by_key if k not in records]
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} planned images were not made, e.g. {missing[0]}; rerun to resume")
    return made


def generate_fold(store: Store, s: GenerateSettings, fold: int, classes: list[PlanClass], executor: Executor,
                  events: Events | None = None) -> FoldOutcome:
    """Steps 1-5 of the module docstring for one fold; idempotent and resumable."""
    events = events or LogEvents()
    g = s.generate
    lora_sha256 = store.sha256(s.generator_key(fold)) if s.use_adapter else ""
    params = gen_params(s, lora_sha256)
    n = g.images_per_class
    budget = math.ceil(g.max_attempts_factor * n)
    need_clip = g.quality.min_clip_score is not None
    by_name = {c.name: c for c in classes}

    def make_record(batch: dict[str, Any], i: int, row: dict) -> dict:
        return record_from_batch(batch, i, row, s.base_model, params.scheduler, lora_sha256)

    requested = fold_layouts(store, s, fold, classes)
    plan = with_requested_boxes(initial_plan(s.run_seed, fold, classes, params, n), requested, s, params)
    outcome = FoldOutcome(plan=plan, records={})
    pending_round = plan
    round_ = 0
    while pending_round:
        store.write_table(layout.generate.plan(fold), to_table(plan))  # inspectable while running
        listed = set(store.list(layout.generate.fold(fold)))
        done = verified_records(store, pending_round, listed, need_clip)
        outcome.records.update(done)
        outcome.reused += len(done)
        todo = [r for r in pending_round if r["key"] not in done]
        if todo:
            with events.progress(f"generate fold {fold}, round {round_}: images", len(todo)) as advance:
                outcome.generated += execute_rows(f"generate fold {fold}", todo, executor, outcome.records, make_record, advance)
        # 4. Re-judge with the current gate (thresholds may have changed since a record was written).
        for record in outcome.records.values():
            verdict = judge(record["std"], record["entropy"], record.get("clip_score"), g.quality)
            record["kept"], record["reject_reason"] = verdict.kept, verdict.reject_reason
        round_ += 1
        pending_round = []
        for cls in classes:
            rows = [r for r in plan if r["class_name"] == cls.name]
            kept = sum(outcome.records[r["key"]]["kept"] for r in rows)
            add = min(n - kept, budget - len(rows))
            if add > 0:
                pending_round += with_requested_boxes(
                    plan_rows(s.run_seed, fold, by_name[cls.name], params, start=len(rows), count=add, round_=round_),
                    requested, s, params)
        plan.extend(pending_round)

    for cls in classes:
        rows = [r for r in plan if r["class_name"] == cls.name]
        kept = sum(outcome.records[r["key"]]["kept"] for r in rows)
        outcome.classes[cls.name] = ClassOutcome(planned=n, attempted=len(rows), kept=kept, shortfall=n - kept)
        if kept < n:
            events.warning(f"generate fold {fold} class '{cls.name}': {kept}/{n} images passed the quality gate "
                           f"after {len(rows)} attempts (generate.max_attempts_factor={g.max_attempts_factor}); "
                           f"shortfall {n - kept}")
    outcome.removed = remove_stale(store, plan, [layout.generate.images(fold), layout.generate.records(fold)])
    store.write_table(layout.generate.plan(fold), to_table(plan))
    store.write_table(layout.generate.manifest(fold), manifest_table(store, s, fold, plan, outcome.records))
    return outcome


def fold_layouts(store: Store, s: GenerateSettings, fold: int, classes: list[PlanClass]) -> dict[int, list[list[dict]]]:
    """layout_lora: per class id, the layouts (that class's boxes) of the fold's TRAIN images holding it,
    which requested boxes are drawn from (t2id.lora.location); {} for the other methods."""
    if s.layout is None:
        return {}
    from t2id.lora.location import class_boxes

    rows = load_fold_rows(store, fold, "train").to_pylist()
    return {c.class_id: [class_boxes(r["boxes"], c.class_id, s.layout.max_boxes) for r in rows
                         if any(b["class_id"] == c.class_id for b in r["boxes"] or [])] for c in classes}


def with_requested_boxes(rows: list[dict], layouts: dict[int, list[list[dict]]], s: GenerateSettings,
                         params) -> list[dict]:
    """layout_lora: each plan row asks for one real layout of its class (chosen by the row's seed), written
    into its prompt as location tokens; the row keeps the boxes it asked for (`requested_boxes`)."""
    if s.layout is None:
        return rows
    from t2id.lora.location import layout_prompt, sample_layout

    out = []
    for row in rows:
        boxes = sample_layout(layouts.get(row["class_id"], []), row["seed"], s.layout.bins)
        prompt = layout_prompt(row["prompt"], row["class_name"], boxes, s.layout.bins)
        out.append({**row, "prompt": prompt, "params_digest": params_digest(prompt, row["seed"], params),
                    "requested_boxes": boxes})
    return out


def remove_stale(store: Store, plan: list[dict], prefixes: list[str]) -> int:
    """Delete images/records under `prefixes` that the current plan does not name (an older config's)."""
    wanted = {r["key"] for r in plan} | {r["record_key"] for r in plan}
    stale = [k for prefix in prefixes for k in store.list(prefix) if k not in wanted]
    for key in stale:
        store.delete(key)
    return len(stale)


def manifest_table(store: Store, s: GenerateSettings, fold: int, plan: list[dict], records: dict[str, dict]
                   ) -> pa.Table:
    """One SYNTHETIC_SCHEMA row per plan row, in plan order; boxes are filled by the label stage."""
    params = gen_params(s, "")  # steps, guidance, scheduler as drawn (lora.method ddpm has its own)
    tokens, prior = method_provenance(store, s, fold)
    class_weights = ddpm_class_weights(store, s, fold)
    rows = []
    for row in plan:
        rec = records[row["key"]]
        requested = row.get("requested_boxes")  # layout_lora: the boxes the prompt asked for
        rows.append({
            "image_id": image_id_of(rec["sha256"]),
            "uri": store.ref(row["key"]),
            "width": rec["width"],
            "height": rec["height"],
            "group": f"synthetic-fold{fold}-{layout.slug(row['class_name'])}",
            "source": "synthetic",
            "boxes": requested or [],
            "sha256": rec["sha256"],
            "fold": fold,
            "class_id": row["class_id"],
            "prompt": row["prompt"],
            "negative_prompt": row["negative_prompt"],
            "seed": row["seed"],
            "steps": params.steps,
            "guidance": params.guidance,
            "scheduler": params.scheduler,
            "base_model": s.base_model,
            "lora_sha256": class_weights.get(row["class_name"], rec["lora_sha256"]),
            "entropy": rec["entropy"],
            "std": rec["std"],
            "clip_score": rec.get("clip_score"),
            "kept": rec["kept"],
            "reject_reason": rec["reject_reason"] or None,
            "label_source": "layout" if requested is not None else None,
            "method": s.method,
            "tokens": location_tokens(row, s) if requested is not None else tokens.get(row["class_name"]),
            "prior_images": prior,
            "requested_boxes": requested,
        })
    return pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA)


def location_tokens(row: dict, s: GenerateSettings) -> str:
    """layout_lora: the location phrase the prompt carries (t2id.lora.location)."""
    from t2id.lora.location import location_phrase

    assert s.layout is not None
    return location_phrase(row["class_name"], row["requested_boxes"], s.layout.bins)


def ddpm_class_weights(store: Store, s: GenerateSettings, fold: int) -> dict[str, str]:
    """lora.method ddpm: class -> the sha256 of its UNet weights (a row's lora_sha256), from the fold's
    ddpm/models.json; {} for the other methods."""
    if s.method != "ddpm" or not s.use_adapter:
        return {}
    models = json.loads(store.read_text(s.generator_key(fold)))["classes"]
    return {name: m["weights_sha256"] for name, m in models.items()}


def method_provenance(store: Store, s: GenerateSettings, fold: int) -> tuple[dict[str, str], dict | None]:
    """(class -> the tokens its prompts carry, the class-prior set {count, digest}) of the fold's generator,
    from the lora stage's train_ids.json (t2id.lora.stage); ({}, None) for plain LoRA or the base model."""
    if s.method == "lora" or not s.use_adapter:
        return {}, None
    record = json.loads(store.read_text(layout.lora.train_ids(fold)))
    tokens = {name: str(t) for name, t in (record.get("tokens") or {}).items() if t is not None}
    prior = record.get("prior")
    return tokens, None if prior is None else {"count": prior["count"], "digest": prior["digest"]}
