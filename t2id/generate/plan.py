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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from t2id import layout
from t2id.errors import UserError

if TYPE_CHECKING:
    from t2id.generate.settings import GenerateSettings
    from t2id.lora.config import TargetClass

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
    ("key", pa.string()),  # run-relative store key of the PNG (layout.generate.image)
    ("record_key", pa.string()),  # key of the per-image JSON record, written after the PNG (layout.generate.record)
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


def gen_params(s: GenerateSettings, lora_sha256: str) -> GenParams:
    g = s.generate
    if s.ddpm is not None:  # lora.method ddpm: its own size and sampler, no text (t2id.generate.ddpm_worker)
        d = s.ddpm
        return GenParams(negative_prompt="", steps=d.inference_steps, guidance=0.0, scheduler="ddpm",
                         width=d.resolution, height=d.resolution, base_model=s.base_model, lora_sha256=lora_sha256)
    return GenParams(negative_prompt=g.negative_prompt, steps=g.steps, guidance=float(g.guidance),
                     scheduler=g.scheduler, width=g.width, height=g.height, base_model=s.base_model,
                     lora_sha256=lora_sha256)


def plan_classes(targets: Sequence[TargetClass], names: Sequence[str]) -> list[PlanClass]:
    """lora.target_classes with their ids in data/classes.json (`names`)."""
    unknown = [t.name for t in targets if t.name not in names]
    if unknown:
        raise UserError(f"lora.target_classes {unknown} are not classes of the dataset (data/classes.json: "
                        f"{list(names)}); fix the names in the config")
    return [PlanClass(t.name, list(names).index(t.name), tuple(t.prompts)) for t in targets]


def method_classes(s: GenerateSettings, names: Sequence[str]) -> list[PlanClass]:
    """`plan_classes` with each prompt as the fold's generator was trained on it (lora.method: the
    DreamBooth identifier or the learnt token in place of the class name; t2id.lora.methods)."""
    from t2id.lora.methods import method_prompt

    return [PlanClass(c.name, c.class_id, tuple(method_prompt(p, c.name, s.method, s.dreambooth,
                                                              s.textual_inversion) for p in c.prompts))
            for c in plan_classes(s.target_classes, names)]


def derive_seed(run_seed: int, fold: int, class_name: str, index: int) -> int:
    """A 63-bit seed from sha256 of (run seed, fold, class, index): stable across processes and versions."""
    text = json.dumps([SEED_NAMESPACE, int(run_seed), int(fold), class_name, int(index)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1  # fits int64


def image_name(fold: int, class_name: str, index: int, seed: int) -> str:
    return f"{layout.slug(class_name)}-f{fold}-{index:05d}-{seed:016x}"


def params_digest(prompt: str, seed: int, params: GenParams) -> str:
    payload = {"prompt": prompt, "seed": int(seed), **params.__dict__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_rows(run_seed: int, fold: int, cls: PlanClass, params: GenParams, start: int, count: int,
              round_: int = 0, seed_namespace: str = "") -> list[dict]:
    """Rows for indices [start, start + count) of one (fold, class); prompts cycle over the index.

    `seed_namespace` prefixes the class name in the seed derivation, so another stage drawing with the
    same generator (label's top-up) gets seeds of its own instead of repeating generate's images."""
    rows = []
    for index in range(start, start + count):
        seed = derive_seed(run_seed, fold, seed_namespace + cls.name, index)
        prompt = cls.prompts[index % len(cls.prompts)]
        name = image_name(fold, cls.name, index, seed)
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
            "key": layout.generate.image(fold, cls.name, name),
            "record_key": layout.generate.record(fold, cls.name, name),
            "params_digest": params_digest(prompt, seed, params),
        })
    return rows


def initial_plan(run_seed: int, fold: int, classes: list[PlanClass], params: GenParams,
                 images_per_class: int) -> list[dict]:
    """Round 0: indices 0..N-1 of every class."""
    return [row for cls in classes for row in plan_rows(run_seed, fold, cls, params, 0, images_per_class)]


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)
