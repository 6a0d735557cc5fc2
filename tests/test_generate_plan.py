"""The generation plan: deterministic seeds and names, stable across processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from t2id.config import validate_config
from t2id.errors import ConfigError, UserError
from t2id import layout
from t2id.generate.plan import GenParams, PlanClass, derive_seed, initial_plan, plan_classes, plan_rows, to_table
from t2id.lora.config import TargetClass

PARAMS = GenParams(negative_prompt="blurry", steps=4, guidance=7.5, scheduler="euler", width=64, height=64,
                   base_model="tiny", lora_sha256="ab" * 32)
CLASSES = [PlanClass("tracheal ring", 2, ("ring a", "ring b")), PlanClass("vocal fold", 5, ("fold",))]


def test_same_config_same_plan():
    a = initial_plan(0, 1, CLASSES, PARAMS, 5)
    b = initial_plan(0, 1, CLASSES, PARAMS, 5)
    assert a == b
    assert to_table(a).num_rows == 10


def test_seeds_differ_across_fold_class_index_and_run_seed():
    seeds = {derive_seed(s, f, c, i) for s in (0, 1) for f in (0, 1, 2) for c in ("tracheal ring", "vocal fold")
             for i in range(50)}
    assert len(seeds) == 2 * 3 * 2 * 50
    assert all(0 <= s < 2**63 for s in seeds)


def test_seed_is_stable_across_processes():
    """sha256-derived, not Python's salted hash(): a fresh interpreter gets the same seed."""
    code = "from t2id.generate.plan import derive_seed; print(derive_seed(7, 3, 'vocal fold', 11))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123"}).stdout
    assert int(out) == derive_seed(7, 3, "vocal fold", 11)


def test_names_keys_and_prompts():
    rows = initial_plan(0, 1, CLASSES, PARAMS, 3)
    ring = [r for r in rows if r["class_name"] == "tracheal ring"]
    assert [r["prompt"] for r in ring] == ["ring a", "ring b", "ring a"]  # prompts cycle over the index
    assert ring[0]["key"].startswith("generate/fold=1/images/tracheal-ring/tracheal-ring-f1-00000-")
    assert ring[0]["key"].endswith(".png")
    assert ring[0]["record_key"].startswith("generate/fold=1/records/tracheal-ring/")
    assert len({r["key"] for r in rows}) == len(rows)
    assert all(r["negative_prompt"] == "blurry" and r["class_id"] in (2, 5) for r in rows)


def test_top_up_rows_continue_the_index_with_fresh_seeds():
    first = plan_rows(0, 0, CLASSES[0], PARAMS, start=0, count=4)
    more = plan_rows(0, 0, CLASSES[0], PARAMS, start=4, count=2, round_=1)
    assert [r["index"] for r in more] == [4, 5] and all(r["round"] == 1 for r in more)
    assert not {r["seed"] for r in first} & {r["seed"] for r in more}


def test_params_digest_tracks_what_changes_pixels():
    base = initial_plan(0, 0, CLASSES, PARAMS, 2)
    other = initial_plan(0, 0, CLASSES, GenParams(**{**PARAMS.__dict__, "steps": 5}), 2)
    assert [r["key"] for r in base] == [r["key"] for r in other]
    assert all(a["params_digest"] != b["params_digest"] for a, b in zip(base, other))


def test_class_slug():
    assert layout.slug("Tracheal Ring") == "tracheal-ring"
    with pytest.raises(ValueError):
        layout.slug("***")


def test_plan_classes_take_ids_from_the_dataset_and_reject_unknown_names():
    targets = [TargetClass(name="vocal fold", prompts=["fold"]), TargetClass(name="tracheal ring", prompts=["r"])]
    names = ["a", "b", "tracheal ring", "c", "d", "vocal fold"]
    assert plan_classes(targets, names) == [PlanClass("vocal fold", 5, ("fold",)), PlanClass("tracheal ring", 2, ("r",))]
    with pytest.raises(UserError, match="lora.target_classes.*'vocal fold'"):
        plan_classes(targets, ["a", "tracheal ring"])


def test_config_rejects_size_not_multiple_of_8():
    with pytest.raises(ConfigError, match="generate.*multiple of 8"):
        validate_config({"generate": {"width": 100}})
    with pytest.raises(ConfigError, match="scheduler"):
        validate_config({"generate": {"scheduler": "nope"}})


# --- settings: what generate takes from other sections -------------------------------------------------

def test_settings_name_cross_section_inputs_only_when_they_change_the_images():
    from t2id.generate.settings import settings
    from t2id.runner import settings_hash

    base = {"run": {"stages": ["data", "split", "lora", "generate"]}, "lora": {"folds": [1]}}
    s = settings(validate_config(base))
    assert s.use_adapter and s.folds == [1] and s.folds_field == "lora.folds"  # only folds with an adapter
    assert s.clip_weights is None  # no CLIP gate: evaluate.clip_weights does not matter ...
    other_clip = validate_config({**base, "evaluate": {"clip_weights": "/elsewhere"}})
    assert settings_hash(settings(other_clip)) == settings_hash(s)  # ... so changing it re-runs nothing
    gated = {**base, "generate": {"quality": {"min_clip_score": 20}}}
    assert settings(validate_config(gated)).clip_weights == "tiny"
    assert settings_hash(settings(validate_config({**gated, "evaluate": {"clip_weights": "/elsewhere"}}))) != \
        settings_hash(settings(validate_config(gated)))
    for changed in ({"run": {**base["run"], "seed": 1}}, {"lora": {"folds": [1], "base_model": "/other"}},
                    {"lora": {"folds": [1], "target_classes": [{"name": "vocal fold", "prompts": ["new"]}]}}):
        assert settings_hash(settings(validate_config({**base, **changed}))) != settings_hash(s), changed
    assert settings_hash(settings(validate_config({**base, "lora": {"folds": [1], "epochs": 3}}))) == \
        settings_hash(s)  # a training knob changes the adapter (an input hash), not generate's settings
    no_lora = settings(validate_config({"run": {"stages": ["data", "split", "generate"]}, "lora": {"folds": [1]}}))
    assert not no_lora.use_adapter and no_lora.folds is None and no_lora.folds_field == "generate.folds"
