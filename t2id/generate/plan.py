"""The generation plan: one row per image to attempt, fully determined by the config.

Every image gets a seed derived from (run seed, fold, class, index) through sha256, so the
plan is the same in every process and on every machine (Python's `hash()` is salted per
process and must not be used). An image's name and store key follow from its fold, class
and index alone, so a rerun or a retried Ray task writes the same key again instead of a
second copy. Top-up rounds (images rejected by the quality gate) continue the index, which
gives them fresh seeds without touching earlier rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import pyarrow as pa

SEED_NAMESPACE = "t2id/generate/seed/v1"

PLAN_SCHEMA = pa.schema([
    ("fold", pa.int32()),
    ("class_id", pa.int32()),
    ("class_name", pa.string()),
    ("index", pa.int32()),
    ("round", pa.int32()),
    ("seed", pa.int64()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("name", pa.string()),
    ("key", pa.string()),  # run-relative store key of the PNG
    ("record_key", pa.string()),  # run-relative key of the per-image JSON record (written after the PNG)
    ("params_digest", pa.string()),  # sha256 of everything that determines the pixels
])


@dataclass(frozen=True)
class PlanClass:
    """A class to generate: its id in data/classes.json and its prompts (lora.target_classes)."""

    name: str
    class_id: int
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class GenParams:
    """Everything besides seed and prompt that determines an image's pixels."""

    negative_prompt: str
    steps: int
    guidance: float
    scheduler: str
    width: int
    height: int
    base_model: str
    lora_sha256: str


def class_slug(name: str) -> str:
    """'tracheal ring' -> 'tracheal-ring': a folder-safe, stable class name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"class name {name!r} has no letters or digits to name a folder after")
    return slug


def derive_seed(run_seed: int, fold: int, class_name: str, index: int) -> int:
    """A 63-bit seed from sha256 of (run seed, fold, class, index): stable across processes and versions."""
    text = json.dumps([SEED_NAMESPACE, int(run_seed), int(fold), class_name, int(index)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1  # fits int64


def image_name(fold: int, class_name: str, index: int, seed: int) -> str:
    return f"{class_slug(class_name)}-f{fold}-{index:05d}-{seed:016x}"


def fold_prefix(fold: int) -> str:
    return f"generate/fold={fold}"


def params_digest(prompt: str, seed: int, params: GenParams) -> str:
    payload = {"prompt": prompt, "seed": int(seed), **params.__dict__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_rows(run_seed: int, fold: int, cls: PlanClass, params: GenParams, start: int, count: int,
              round_: int = 0) -> list[dict]:
    """Rows for indices [start, start + count) of one (fold, class); prompts cycle over the index."""
    rows = []
    for index in range(start, start + count):
        seed = derive_seed(run_seed, fold, cls.name, index)
        prompt = cls.prompts[index % len(cls.prompts)]
        name = image_name(fold, cls.name, index, seed)
        slug = class_slug(cls.name)
        rows.append({
            "fold": fold,
            "class_id": cls.class_id,
            "class_name": cls.name,
            "index": index,
            "round": round_,
            "seed": seed,
            "prompt": prompt,
            "negative_prompt": params.negative_prompt,
            "name": name,
            "key": f"{fold_prefix(fold)}/images/{slug}/{name}.png",
            "record_key": f"{fold_prefix(fold)}/records/{slug}/{name}.json",
            "params_digest": params_digest(prompt, seed, params),
        })
    return rows


def initial_plan(run_seed: int, fold: int, classes: list[PlanClass], params: GenParams,
                 images_per_class: int) -> list[dict]:
    """Round 0: indices 0..N-1 of every class."""
    return [row for cls in classes for row in plan_rows(run_seed, fold, cls, params, 0, images_per_class)]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
