"""Generation of one fold, exactly once: plan -> verify the store -> Ray Data -> top-up -> manifest.

  1. Plan round 0: N rows per class (t2id.generate.plan), deterministic seeds and keys.
  2. Verify: list the fold's prefix once; a row is done when its JSON record exists, was made
     with the same parameters (params_digest) and the PNG's sha256 equals the record's. Only
     missing or corrupt rows go to Ray Data. A retried task or a rerun writes the same key again,
     so there is never a second copy, and a row is never lost: until its record is written, it
     counts as missing.
  3. Generate the pending rows with `map_batches(ImageGenerator)` on an actor pool (one actor per
     GPU, or CPU actors), with actor restarts + task retries for crashed actors; progress shows
     images done / planned.
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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from t2id.generate.config import GenerateConfig
from t2id.generate.plan import (GenParams, PlanClass, class_slug, fold_prefix, initial_plan, plan_rows,
                                to_table)
from t2id.generate.quality import judge
from t2id.generate.worker import ImageGenerator
from t2id.store import Store

console = Console(stderr=True)


def plan_key(fold: int) -> str:
    return f"{fold_prefix(fold)}/plan.parquet"


def manifest_key(fold: int) -> str:
    return f"{fold_prefix(fold)}/manifest.parquet"


@dataclass
class FoldJob:
    """Everything needed to generate one fold (picklable pieces only)."""

    store: Store  # the run's store
    fold: int
    classes: list[PlanClass]
    run_seed: int
    cfg: GenerateConfig
    base_model: str
    cache_dir: str
    adapter_key: str | None = None  # lora/fold=<k>/pytorch_lora_weights.safetensors; None = base model only
    allow_network: bool = False
    endpoint_url: str | None = None
    clip_weights: str = "tiny"
    # Hook for other image makers on the same machinery (e.g. t2id.label.inpaint): extra keyword
    # arguments of the worker class and extra plan columns handed to its __call__.
    worker_kwargs: dict[str, Any] = field(default_factory=dict)
    row_columns: tuple[str, ...] = ()


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


def gen_params(job: FoldJob, lora_sha256: str) -> GenParams:
    c = job.cfg
    return GenParams(negative_prompt=c.negative_prompt, steps=c.steps, guidance=float(c.guidance),
                     scheduler=c.scheduler, width=c.width, height=c.height, base_model=job.base_model,
                     lora_sha256=lora_sha256)


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


def resources(cfg: GenerateConfig) -> tuple[str, int, float, float]:
    """(device, actors, cpus per actor, gpus per actor) from the config and the Ray cluster."""
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    device = cfg.device if cfg.device != "auto" else ("cuda" if gpus else "cpu")
    if device == "cuda":
        actors = cfg.concurrency or max(gpus, 1)
        return device, actors, cfg.cpus_per_actor, 1.0
    actors = cfg.concurrency or max(1, int(total.get("CPU", 1) // cfg.cpus_per_actor))
    return device, actors, cfg.cpus_per_actor, 0.0


def worker_kwargs(job: FoldJob, lora_sha256: str, device: str, torch_threads: int | None) -> dict[str, Any]:
    """Constructor arguments of the worker class (all picklable)."""
    cfg = job.cfg
    return dict(store=job.store, base_model=job.base_model, cache_dir=job.cache_dir, adapter_key=job.adapter_key,
                lora_sha256=lora_sha256, scheduler=cfg.scheduler, steps=cfg.steps, guidance=cfg.guidance,
                width=cfg.width, height=cfg.height, gate=cfg.quality.model_dump(), device=device, dtype=cfg.dtype,
                allow_network=job.allow_network, endpoint_url=job.endpoint_url,
                batched_pipeline=cfg.batched_pipeline, clip_weights=job.clip_weights, torch_threads=torch_threads,
                **job.worker_kwargs)


PLAN_COLUMNS_FOR_WORKER = ("key", "record_key", "params_digest", "prompt", "negative_prompt", "seed")

# An executor turns pending plan rows into finished batches: (rows, job, lora_sha256, worker_cls, on_batch).
Executor = Callable[[list[dict], FoldJob, str, type, Callable[[dict[str, Any]], None]], None]


def run_ray(rows: list[dict], job: FoldJob, lora_sha256: str, worker_cls: type,
            on_batch: Callable[[dict[str, Any]], None]) -> None:
    """Generate `rows` with Ray Data on an actor pool; `on_batch` sees each finished batch of result columns."""
    import ray

    cfg = job.cfg
    device, actors, cpus, gpus = resources(cfg)
    n_batches = math.ceil(len(rows) / cfg.batch_size)
    ray.data.DataContext.get_current().enable_progress_bars = False  # rich shows images done / planned
    ctor = worker_kwargs(job, lora_sha256, device, max(1, int(cpus)) if device == "cpu" else None)
    ds = ray.data.from_items([{c: r[c] for c in (*PLAN_COLUMNS_FOR_WORKER, *job.row_columns)} for r in rows],
                             override_num_blocks=n_batches)
    # Crashed actors are restarted (max_restarts) and their unfinished batches retried (max_task_retries=-1:
    # as long as restarts remain); a retried batch rewrites the same keys, so it cannot duplicate an image.
    # Ray 2.60 deprecates passing these as ray_remote_args (no named parameter replaces them yet); once it
    # is removed, Ray Data's own default applies: unbounded restarts and retries.
    pool = ray.data.ActorPoolStrategy(size=max(1, min(actors, n_batches)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        ds = ds.map_batches(worker_cls, fn_constructor_kwargs=ctor, batch_size=cfg.batch_size, batch_format="numpy",
                            compute=pool, num_cpus=cpus, num_gpus=gpus or None, max_restarts=cfg.max_restarts,
                            max_task_retries=-1)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        on_batch(batch)


class LocalExecutor:
    """In-process executor (no Ray): one worker, built once and reused across top-up rounds.
    For tests of the orchestration and for debugging; the stage uses `run_ray`."""

    def __init__(self) -> None:
        self._worker: Any = None

    def __call__(self, rows: list[dict], job: FoldJob, lora_sha256: str, worker_cls: type,
                 on_batch: Callable[[dict[str, Any]], None]) -> None:
        if self._worker is None:
            self._worker = worker_cls(**worker_kwargs(job, lora_sha256, "cpu", None))
        size = job.cfg.batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            batch = {c: np.array([r[c] for r in chunk], dtype=np.int64 if c == "seed" else object)
                     for c in (*PLAN_COLUMNS_FOR_WORKER, *job.row_columns)}
            on_batch(self._worker(batch))


def _record_from_batch(batch: dict[str, Any], i: int, row: dict, job: FoldJob, lora_sha256: str) -> dict:
    clip = float(batch["clip_score"][i])
    return {"key": row["key"], "sha256": str(batch["sha256"][i]), "params_digest": row["params_digest"],
            "seed": row["seed"], "prompt": row["prompt"], "width": int(batch["width"][i]),
            "height": int(batch["height"][i]), "std": float(batch["std"][i]),
            "entropy": float(batch["entropy"][i]), "clip_score": None if math.isnan(clip) else clip,
            "kept": bool(batch["kept"][i]), "reject_reason": str(batch["reject_reason"][i]),
            "base_model": job.base_model, "lora_sha256": lora_sha256, "scheduler": job.cfg.scheduler}


def generate_fold(job: FoldJob, worker_cls: type = ImageGenerator, show_progress: bool = True,
                  executor: Executor = run_ray) -> FoldOutcome:
    """Steps 1-5 of the module docstring for one fold; idempotent and resumable."""
    cfg, store = job.cfg, job.store
    lora_sha256 = store.sha256(job.adapter_key) if job.adapter_key else ""
    params = gen_params(job, lora_sha256)
    n = cfg.images_per_class
    budget = math.ceil(cfg.max_attempts_factor * n)
    need_clip = cfg.quality.min_clip_score is not None
    by_name = {c.name: c for c in job.classes}

    plan = initial_plan(job.run_seed, job.fold, job.classes, params, n)
    outcome = FoldOutcome(plan=plan, records={})
    pending_round = plan
    progress = Progress(TextColumn(f"generate fold {job.fold}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("images"), TimeElapsedColumn(), console=console, disable=not show_progress)
    with progress:
        task = progress.add_task("images", total=len(plan))
        round_ = 0
        while pending_round:
            store.write_table(plan_key(job.fold), to_table(plan))  # inspectable while running
            listed = set(store.list(fold_prefix(job.fold)))
            done = verified_records(store, pending_round, listed, need_clip)
            outcome.records.update(done)
            outcome.reused += len(done)
            progress.update(task, total=len(plan), advance=len(done))
            todo = [r for r in pending_round if r["key"] not in done]
            if todo:
                by_key = {r["key"]: r for r in todo}

                def on_batch(batch: dict[str, Any]) -> None:
                    for i, key in enumerate(batch["key"]):
                        row = by_key[str(key)]
                        outcome.records[row["key"]] = _record_from_batch(batch, i, row, job, lora_sha256)
                    outcome.generated += len(batch["key"])
                    progress.update(task, advance=len(batch["key"]))

                executor(todo, job, lora_sha256, worker_cls, on_batch)
                missing = [k for k in by_key if k not in outcome.records]
                if missing:  # Ray Data returned without them: never publish a manifest with gaps
                    raise RuntimeError(f"fold {job.fold}: {len(missing)} planned images were not generated, "
                                       f"e.g. {missing[0]}; rerun to resume")
            # 4. Re-judge with the current gate (thresholds may have changed since a record was written).
            for record in outcome.records.values():
                verdict = judge(record["std"], record["entropy"], record.get("clip_score"), cfg.quality)
                record["kept"], record["reject_reason"] = verdict.kept, verdict.reject_reason
            round_ += 1
            pending_round = []
            for cls in job.classes:
                rows = [r for r in plan if r["class_name"] == cls.name]
                kept = sum(outcome.records[r["key"]]["kept"] for r in rows)
                add = min(n - kept, budget - len(rows))
                if add > 0:
                    pending_round += plan_rows(job.run_seed, job.fold, by_name[cls.name], params,
                                               start=len(rows), count=add, round_=round_)
            plan.extend(pending_round)

    for cls in job.classes:
        rows = [r for r in plan if r["class_name"] == cls.name]
        kept = sum(outcome.records[r["key"]]["kept"] for r in rows)
        outcome.classes[cls.name] = ClassOutcome(planned=n, attempted=len(rows), kept=kept, shortfall=n - kept)
        if kept < n:
            console.print(f"[yellow]![/] fold {job.fold} class '{cls.name}': {kept}/{n} images passed the quality "
                          f"gate after {len(rows)} attempts (generate.max_attempts_factor={cfg.max_attempts_factor}); "
                          f"shortfall {n - kept}")
    outcome.removed = remove_stale(store, job.fold, plan)
    store.write_table(plan_key(job.fold), to_table(plan))
    store.write_table(manifest_key(job.fold), manifest_table(store, plan, outcome.records, job))
    return outcome


def remove_stale(store: Store, fold: int, plan: list[dict]) -> int:
    """Delete images/records under the fold that the current plan does not name (an older config's)."""
    wanted = {r["key"] for r in plan} | {r["record_key"] for r in plan}
    prefix = fold_prefix(fold)
    stale = [k for sub in ("images", "records") for k in store.list(f"{prefix}/{sub}") if k not in wanted]
    for key in stale:
        store.delete(key)
    return len(stale)


def manifest_table(store: Store, plan: list[dict], records: dict[str, dict], job: FoldJob) -> pa.Table:
    """One SYNTHETIC_SCHEMA row per plan row, in plan order; boxes are filled by the label stage."""
    from t2id.data.manifest import SYNTHETIC_SCHEMA, image_id_of

    rows = []
    for row in plan:
        rec = records[row["key"]]
        rows.append({
            "image_id": image_id_of(rec["sha256"]),
            "uri": store.uri(row["key"]),
            "width": rec["width"],
            "height": rec["height"],
            "group": f"synthetic-fold{job.fold}-{class_slug(row['class_name'])}",
            "source": "synthetic",
            "boxes": [],
            "sha256": rec["sha256"],
            "fold": job.fold,
            "class_id": row["class_id"],
            "prompt": row["prompt"],
            "negative_prompt": row["negative_prompt"],
            "seed": row["seed"],
            "steps": job.cfg.steps,
            "guidance": job.cfg.guidance,
            "scheduler": job.cfg.scheduler,
            "base_model": job.base_model,
            "lora_sha256": rec["lora_sha256"],
            "entropy": rec["entropy"],
            "std": rec["std"],
            "clip_score": rec.get("clip_score"),
            "kept": rec["kept"],
            "reject_reason": rec["reject_reason"] or None,
            "label_source": None,
        })
    return pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA)
