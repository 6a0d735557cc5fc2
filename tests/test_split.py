"""Subject-grouped, class-stratified folds: no leakage, balanced rare classes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from t2id import layout
from t2id.config import validate_config
from t2id.data.manifest import load_fold_rows, load_manifest
from t2id.data.phantom import write_phantom
from t2id.data.stage import STAGE as DATA_STAGE
from t2id.errors import UserError
from t2id.events import LogEvents
from t2id.runner import run_pipeline, run_store
from t2id.split.folds import assert_no_leak, assign_folds, check_feasible
from t2id.split.stage import STAGE as SPLIT_STAGE

STAGES = {"data": DATA_STAGE, "split": SPLIT_STAGE}


@st.composite
def groupings(draw):
    n_classes = draw(st.integers(1, 5))
    n_groups = draw(st.integers(2, 14))
    folds = draw(st.integers(2, n_groups))
    counts = {f"g{i}": np.array(draw(st.lists(st.integers(0, 9), min_size=n_classes, max_size=n_classes)))
              for i in range(n_groups)}
    sizes = {g: int(c.max(initial=0)) + draw(st.integers(1, 12)) for g, c in counts.items()}
    return counts, sizes, folds, draw(st.integers(0, 2**16)), draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(groupings())
def test_folds_never_share_a_subject(case):
    counts, sizes, folds, seed, stratify = case
    assignment = assign_folds(counts, sizes, folds, seed=seed, stratify=stratify)
    assert set(assignment) == set(counts)  # every group exactly once (a dict: one fold per group)
    assert set(assignment.values()) == set(range(folds))  # no empty fold
    # expand to images and run the same check the stage runs before writing
    groups = [g for g, n in sizes.items() for _ in range(n)]
    assert_no_leak(groups, [assignment[g] for g in groups])
    assert assign_folds(counts, sizes, folds, seed=seed, stratify=stratify) == assignment  # seeded


def test_assert_no_leak_catches_a_split_subject():
    with pytest.raises(AssertionError, match="'s1' is in folds 0 and 1"):
        assert_no_leak(["s0", "s1", "s1"], [0, 0, 1])


def test_rare_class_lands_in_every_fold():
    # 8 subjects; class 1 is rare and held by exactly 4 of them: each of the 4 folds gets one.
    counts = {f"s{i}": np.array([10, 2 if i in (1, 3, 4, 6) else 0]) for i in range(8)}
    sizes = {g: 12 for g in counts}
    for seed in range(5):
        assignment = assign_folds(counts, sizes, 4, seed=seed)
        assert sorted(assignment[f"s{i}"] for i in (1, 3, 4, 6)) == [0, 1, 2, 3]
        assert sorted(np.bincount(list(assignment.values()), minlength=4)) == [2, 2, 2, 2]


def test_too_few_subjects_for_a_class_names_it_and_the_fix():
    counts = {"s0": np.array([3, 1]), "s1": np.array([2, 0]), "s2": np.array([4, 1]), "s3": np.array([1, 0])}
    with pytest.raises(UserError) as err:
        check_feasible(counts, ["common", "rare"], 3)
    message = str(err.value)
    assert "'rare' in 2 subject(s)" in message and "split.folds=3" in message and "split.folds <= 2" in message
    with pytest.raises(UserError, match="only 4 subject"):
        check_feasible(counts, ["common", "rare"], 5)


class Recorded(LogEvents):
    """The events a stage emits, kept for asserting (stages never print)."""

    def __init__(self):
        self.tables: dict[str, tuple[list, list]] = {}

    def table(self, title, columns, rows):
        self.tables[title] = (list(columns), [list(r) for r in rows])


def test_split_stage_on_the_phantom(tmp_path):
    src = write_phantom(tmp_path / "ph", subjects=6, frames_per_subject=4, size=64)
    cfg = validate_config({
        "run": {"id": "r", "seed": 3, "stages": ["data", "split"]},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "data": {"source": str(src)},
        "split": {"folds": 3},
    })
    events = Recorded()
    assert [o.status for o in run_pipeline(cfg, stages=STAGES, events=events)] == ["ran", "ran"]
    columns, rows = events.tables["instances and images per class"]  # the data stage's class table
    assert columns == ["class", "instances", "images", "share"] and len(rows) == 6
    columns, rows = events.tables["instances per fold (subject-grouped)"]  # the split stage's fold table
    assert columns[:3] == ["fold", "images", "subjects"] and [r[:3] for r in rows] == [[0, 8, 2], [1, 8, 2], [2, 8, 2]]
    store = run_store(cfg)
    folds = store.read_table(layout.split.folds)
    assert folds.column_names == ["image_id", "fold", "group"]
    per_group = {}
    for row in folds.to_pylist():
        assert per_group.setdefault(row["group"], row["fold"]) == row["fold"]
    assert sorted(per_group.values()) == [0, 0, 1, 1, 2, 2]  # 6 subjects of equal size -> 2 per fold
    table = store.read_table(layout.split.fold_classes).to_pylist()
    assert len(table) == 3 * 6 and all(r["subjects"] >= 1 for r in table)  # every class in every fold
    manifest_ids = set(load_manifest(store)["image_id"].to_pylist())
    for fold in range(3):
        train = set(load_fold_rows(store, fold, "train")["image_id"].to_pylist())
        val = set(load_fold_rows(store, fold, "val")["image_id"].to_pylist())
        assert train and val and not train & val and train | val == manifest_ids
        assert not ({g for g in load_fold_rows(store, fold, "train")["group"].to_pylist()}
                    & {g for g in load_fold_rows(store, fold, "val")["group"].to_pylist()})
    assert [o.status for o in run_pipeline(cfg, stages=STAGES)] == ["skipped", "skipped"]
    again = validate_config({**cfg.model_dump(mode="json"), "split": {"folds": 2}})
    assert [o.status for o in run_pipeline(again, stages=STAGES)] == ["skipped", "ran"]
    # run.seed is the split's only input from another section: it redoes split, not data
    reseeded = validate_config({**again.model_dump(mode="json"), "run": {**again.run.model_dump(), "seed": 4}})
    assert [o.status for o in run_pipeline(reseeded, stages=STAGES)] == ["skipped", "ran"]


def test_leak_check_uses_the_manifest_subjects_not_the_folds_group_column():
    import pyarrow as pa

    from t2id.split.leakcheck import check_tables
    manifest = pa.table({"image_id": ["a", "b", "c", "d"], "group": ["s1", "s1", "s2", "s2"]})
    # folds.parquet's own group column is self-consistent (it says b belongs to s2), so a check on
    # it passes; the data manifest says b is s1's frame, so s1 sits in folds 0 and 1.
    folds = pa.table({"image_id": ["a", "b", "c", "d"], "fold": [0, 1, 1, 1], "group": ["s1", "s2", "s2", "s2"]})
    assert_no_leak(folds["group"].to_pylist(), folds["fold"].to_pylist())
    check = check_tables(manifest, folds)
    assert check.several_folds == {"s1": [0, 1]} and not check.ok
    assert "1 of 2 subjects in more than one fold: 's1' in folds [0, 1]" in check.describe()
    check = check_tables(manifest, folds.slice(0, 3).set_column(1, "fold", pa.array([0, 0, 1])))
    assert check.several_folds == {} and check.images_without_fold == ["d"] and not check.ok
    good = check_tables(manifest, pa.table({"image_id": ["a", "b", "c", "d"], "fold": [0, 0, 1, 1]}))
    assert good.ok and good.describe() == "subjects in more than one fold: 0 of 2 (data manifest vs folds)"


def test_split_stage_runs_the_independent_leak_check(tmp_path):
    from t2id.split.leakcheck import subjects_in_several_folds
    src = write_phantom(tmp_path / "ph", subjects=4, frames_per_subject=4, size=64)
    cfg = validate_config({
        "run": {"id": "r", "seed": 0, "stages": ["data", "split"]},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "data": {"source": str(src)}, "split": {"folds": 2},
    })
    outcomes = run_pipeline(cfg, stages=STAGES)
    assert outcomes[-1].status == "ran"
    store = run_store(cfg)
    assert subjects_in_several_folds(store) == {}
    import json
    marker = json.loads(store.read_text(layout.marker("split")))
    assert marker["summary"]["subjects_in_several_folds"] == 0, marker
