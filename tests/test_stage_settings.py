"""A changed config value re-runs exactly the stages whose settings use it.

Every stage's settings come from its real `settings(cfg)`; the stage bodies are stand-ins that
write a constant output, so a stage re-runs only when its own settings (or its external inputs)
changed, never because an upstream output changed. Each case changes one value, most of them read
across sections, and checks which markers are redone.
"""

from __future__ import annotations

import copy

import pytest

from t2id.config import REPO_CONFIGS, STAGES, load_config, validate_config, apply_override
from t2id.runner import Stage, StageResult, load_stages, run_pipeline, settings_hash

BASE = load_config(REPO_CONFIGS / "demo.yaml")
ALL = set(STAGES)


def with_values(cfg, **dotted):
    raw = copy.deepcopy(cfg.model_dump(mode="json"))
    for key, value in dotted.items():
        apply_override(raw, key.replace("__", "."), value)
    return validate_config(raw)


def constant_stages() -> dict[str, Stage]:
    def body(ctx, settings) -> StageResult:
        key = f"{ctx.stage}/out.txt"
        return StageResult(outputs={key: ctx.store.write_text(key, "same every time")})

    return {name: Stage(name, s.settings, s.depends_on, body, s.external_inputs) for name, s in load_stages().items()}


TEACHER = {"label__method": "teacher"}
CLIP_GATE = {"generate__quality__min_clip_score": 0.1}
CASES = [
    # (what changes, the base it changes from, the stages that must re-run)
    ({"run__description": "another text"}, {}, {"report"}),
    ({"cluster__num_cpus": 1}, {}, set()),
    ({"store__max_attempts": 3}, {}, set()),
    ({"data__phantom__subjects": 10}, {}, {"data"}),
    ({"split__folds": 3}, {}, {"split"}),
    ({"lora__rank": 8}, {}, {"lora"}),
    ({"lora__base_model": "/models/sdxl"},  # a real base model needs real metric networks (issue 15)
     {"evaluate__inception_weights": "/models/inception.pth", "evaluate__clip_weights": "/models/clip"},
     {"lora", "generate", "label", "evaluate"}),
    ({"lora__target_classes": [{"name": "tracheal ring", "prompts": ["a ring"]}]}, {},
     {"lora", "generate", "label", "report"}),
    ({"generate__steps": 3}, {}, {"generate", "label"}),  # inpainting reuses generate's sampler settings
    ({"evaluate__clip_weights": "/models/clip"}, {}, {"evaluate"}),  # CLIP gate off: generate ignores it
    ({"evaluate__clip_weights": "/models/clip"}, CLIP_GATE, {"generate", "evaluate"}),
    ({"grid__detector__epochs": 3}, {}, {"grid", "report"}),
    ({"grid__detector__epochs": 3}, TEACHER, {"label", "grid", "report"}),  # the teacher is grid's detector
    ({"label__memorization__threshold": 0.5}, {}, {"label", "report"}),
    ({"run__stages": [s for s in STAGES if s != "lora"]}, {}, {"generate", "label"}),  # no adapter to use
]


def changed_by_settings(before, after) -> set[str]:
    return {name for name, stage in load_stages().items()
            if settings_hash(stage.settings(before)) != settings_hash(stage.settings(after))}


@pytest.mark.parametrize(("change", "base", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_settings_hold_exactly_what_each_stage_reads(change, base, expected):
    before = with_values(BASE, **base)
    assert changed_by_settings(before, with_values(before, **change)) == expected


@pytest.mark.parametrize(("change", "base", "expected"), [c for c in CASES if "run__stages" not in c[0]],
                         ids=[str(c[0]) for c in CASES if "run__stages" not in c[0]])
def test_runner_redoes_exactly_those_markers(tmp_path, change, base, expected):
    before = with_values(BASE, store__uri=str(tmp_path / "store"), store__cache_dir=str(tmp_path / "cache"),
                         **base)
    stages = constant_stages()
    assert {o.stage for o in run_pipeline(before, stages=stages) if o.status == "ran"} == ALL
    after = with_values(before, **change)
    assert {o.stage for o in run_pipeline(after, stages=stages) if o.status == "ran"} == expected


def test_seed_reaches_every_stage_that_draws_random_numbers():
    base = with_values(BASE, grid__seeds=None)  # the detector seed follows run.seed
    changed = changed_by_settings(base, with_values(base, run__seed=base.run.seed + 1))
    assert changed >= {"split", "lora", "generate", "label", "evaluate", "grid"}
    # the demo lists its detector seeds (grid.seeds), so run.seed no longer reaches the grid
    assert BASE.grid.seeds and "grid" not in changed_by_settings(BASE, with_values(BASE, run__seed=BASE.run.seed + 1))
