"""Stage runner: markers, skip-if-done, --only/--force, resumption after a crash."""

from __future__ import annotations

import json

import pytest

from t2id.config import validate_config
from t2id.configbase import StageSettings
from t2id.errors import UserError
from t2id.runner import MARKER, Stage, StageResult, run_pipeline, run_store, settings_hash


class FakeSettings(StageSettings):
    values: dict


class Recorder:
    """Fake stage bodies that write real outputs and count their runs."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail_in: set[str] = set()

    def body(self, name: str, output=lambda s: "v"):
        def run(ctx, settings) -> StageResult:
            self.calls.append(name)
            if name in self.fail_in:
                raise RuntimeError(f"{name} crashed")
            key = f"{name}/out.txt"
            return StageResult(outputs={key: ctx.store.write_text(key, str(output(settings)))}, summary={"n": 1})

        return run


def make(tmp_path, rec: Recorder, **sections):
    raw = {"run": {"id": "r1", "stages": ["data", "split", "lora"]},
           "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")}, **sections}
    cfg = validate_config(raw)
    source = tmp_path / "source.txt"
    if not source.exists():
        source.write_text("dataset v1")

    def settings_of(**values):
        return lambda cfg: FakeSettings(values=values)

    stages = {
        "data": Stage("data", settings_of(source=cfg.data.source), (),
                      rec.body("data", lambda s: source.read_text()),
                      external_inputs=lambda ctx, s: {"source": source.read_text()}),
        "split": Stage("split", settings_of(folds=cfg.split.folds), ("data",),
                       rec.body("split", lambda s: s.values["folds"])),
        "lora": Stage("lora", settings_of(rank=cfg.lora.rank), ("split",),
                      rec.body("lora", lambda s: s.values["rank"])),
    }
    return cfg, stages


def test_second_run_skips_everything(tmp_path):
    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    first = run_pipeline(cfg, stages=stages)
    assert [o.status for o in first] == ["ran", "ran", "ran"]
    second = run_pipeline(cfg, stages=stages)
    assert [o.status for o in second] == ["skipped"] * 3
    assert rec.calls == ["data", "split", "lora"]


def test_marker_contents_and_saved_config(tmp_path):
    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    run_pipeline(cfg, stages=stages)
    store = run_store(cfg)
    marker = json.loads(store.read_text(f"split/{MARKER}"))
    assert marker["settings_hash"] == settings_hash(stages["split"].settings(cfg))
    assert marker["settings"] == {"values": {"folds": 4}}
    assert set(marker["input_hashes"]) == {"stage:data"}
    assert marker["outputs"] == {"split/out.txt": store.sha256("split/out.txt")}
    assert marker["timings"]["seconds"] >= 0 and marker["timings"]["started_at"]
    assert "folds: 4" in store.read_text("config.yaml")


def test_config_change_reruns_that_stage_and_what_its_outputs_feed(tmp_path):
    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    run_pipeline(cfg, stages=stages)
    cfg2, stages2 = make(tmp_path, rec, split={"folds": 3})
    outcomes = run_pipeline(cfg2, stages=stages2)
    # split's output changed (3 folds), so lora's input changed too; data is untouched.
    assert [o.status for o in outcomes] == ["skipped", "ran", "ran"]


def test_unchanged_outputs_do_not_ripple(tmp_path):
    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    run_pipeline(cfg, stages=stages)
    rec.calls.clear()
    run_pipeline(cfg, force="data", stages=stages)  # data redone, same bytes; force covers later stages too
    assert rec.calls == ["data", "split", "lora"]
    rec.calls.clear()
    cfg_desc, stages_desc = make(tmp_path, rec, run={"id": "r1", "stages": ["data", "split", "lora"],
                                                     "description": "changed text"})
    run_pipeline(cfg_desc, stages=stages_desc)
    assert rec.calls == []  # run.description is no stage's input


def test_external_input_change_reruns(tmp_path):
    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    run_pipeline(cfg, stages=stages)
    (tmp_path / "source.txt").write_text("dataset v2")
    rec.calls.clear()
    run_pipeline(cfg, stages=stages)
    # data reruns on new input; split's input changed so it reruns, yields the same folds-count
    # output, so lora (whose input is split's output) is skipped.
    assert rec.calls == ["data", "split"]


def test_force_redoes_stage_and_everything_after(tmp_path):
    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    run_pipeline(cfg, stages=stages)
    rec.calls.clear()
    outcomes = run_pipeline(cfg, force="split", stages=stages)
    assert [o.status for o in outcomes] == ["skipped", "ran", "ran"]
    assert rec.calls == ["split", "lora"]


def test_only_runs_one_stage_and_needs_its_upstream(tmp_path):
    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    with pytest.raises(UserError, match="needs stage 'data' first"):
        run_pipeline(cfg, only="split", stages=stages)
    run_pipeline(cfg, only="data", stages=stages)
    assert rec.calls == ["data"]
    run_pipeline(cfg, only="split", stages=stages)
    assert rec.calls == ["data", "split"]
    assert not run_store(cfg).exists(f"lora/{MARKER}")


def test_crashed_stage_leaves_no_marker_and_is_redone(tmp_path):
    rec = Recorder()
    rec.fail_in = {"split"}
    cfg, stages = make(tmp_path, rec)
    with pytest.raises(RuntimeError):
        run_pipeline(cfg, stages=stages)
    store = run_store(cfg)
    assert store.exists(f"data/{MARKER}") and not store.exists(f"split/{MARKER}")
    rec.fail_in.clear()
    rec.calls.clear()
    outcomes = run_pipeline(cfg, stages=stages)
    assert [o.status for o in outcomes] == ["skipped", "ran", "ran"]


def test_bad_stage_names_are_user_errors(tmp_path):
    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    with pytest.raises(UserError, match="unknown stage"):
        run_pipeline(cfg, only="trian", stages=stages)
    with pytest.raises(UserError, match="not enabled"):
        run_pipeline(cfg, force="report", stages=stages)


def test_force_reaches_the_stage_so_it_can_ignore_its_unit_memos(tmp_path):
    seen: dict[str, bool] = {}
    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    for name, stage in stages.items():
        inner = stage.run
        stages[name] = Stage(name, stage.settings, stage.depends_on,
                             lambda ctx, s, inner=inner: (seen.__setitem__(ctx.stage, ctx.force), inner(ctx, s))[1],
                             stage.external_inputs)
    run_pipeline(cfg, stages=stages)
    assert seen == {"data": False, "split": False, "lora": False}
    run_pipeline(cfg, stages=stages, force="split")
    assert seen == {"data": False, "split": True, "lora": True}


def test_stage_messages_go_to_the_events_it_is_handed(tmp_path):
    class Collect:
        def __init__(self):
            self.lines = []

        def __getattr__(self, name):
            return lambda *a, **k: self.lines.append((name, a[0]))

    rec = Recorder()
    cfg, stages = make(tmp_path, rec)
    events = Collect()
    run_pipeline(cfg, stages=stages, events=events)
    run_pipeline(cfg, stages=stages, events=events, only="lora")
    assert events.lines == [("stage_started", "data"), ("stage_finished", "data"), ("stage_started", "split"),
                            ("stage_finished", "split"), ("stage_started", "lora"), ("stage_finished", "lora"),
                            ("stage_skipped", "lora")]
