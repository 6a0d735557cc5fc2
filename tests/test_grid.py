"""The grid stage: Ray Tune over fold x strategy x seed, resumable from the store (local and S3).

Orchestration tests use small pure train functions (fast); the end-to-end test trains the real
tiny YOLO through the detect helper on the phantom, kills the grid driver with SIGKILL after a
trial finished, resumes with `t2id run`, and checks that no finished trial trained again. The last two
tests compare generators: a strategy trains on another run's synthetic set (`synthetic_from`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from t2id import layout
from t2id.config import validate_config
from t2id.data.manifest import SYNTHETIC_SCHEMA, load_fold_rows
from t2id.errors import ConfigError, UserError
from t2id.grid.ray_layer import experiment_status, run_trials, trial_memo
from t2id.grid.settings import settings
from t2id.runner import run_pipeline, run_store
from t2id.store import open_store

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _count(counter_dir: str, name: str) -> int:
    path = Path(counter_dir, name)
    return len(path.read_text().splitlines()) if path.exists() else 0


def counting_train(trial: dict, settings, store, cache_dir) -> dict:
    """Pure stand-in for a detector training: counts its runs, fails its first `fail_times` runs."""
    Path(trial["counter_dir"]).mkdir(parents=True, exist_ok=True)
    with open(Path(trial["counter_dir"], trial["name"]), "a") as fh:
        fh.write("run\n")
    if _count(trial["counter_dir"], trial["name"]) <= trial.get("fail_times", 0):
        raise RuntimeError(f"planned failure of {trial['name']}")
    time.sleep(trial.get("sleep", 0.0))
    return {"overall": {"map50_95": 0.1 * trial["fold"] + 0.01}, "per_class": {}, "pr_curves": {},
            "seconds": 0.0}


def _trials(counter_dir: Path, fail: dict[str, int] | None = None, sleep: float = 0.0) -> list[dict]:
    fail = fail or {}
    out = []
    for fold in (0, 1):
        for strategy in ("baseline", "cas"):
            name = f"fold={fold}-{strategy}"
            out.append({"name": name, "fold": fold, "strategy": strategy, "seed": 0, "counter_dir": str(counter_dir),
                        "fail_times": fail.get(name, 0), "sleep": sleep, "identity": {"trial": name, "version": 1}})
    return out


def _grid_settings(**grid):
    return settings(validate_config({"grid": grid}))


def _run(trials, store, tmp_path, force=False, **grid):
    return run_trials(trials, counting_train, store, _grid_settings(**grid), str(tmp_path / "cache"), force=force,
                      verbose=0)


@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    # Ray workers cannot import this test module by name; ship its functions by value.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


DRIVER = textwrap.dedent("""
    # `t2id run CONFIG` with the grid's real detector training wrapped in a per-trial run counter.
    import sys
    from pathlib import Path
    from t2id.config import load_config
    from t2id.grid.core import detect_trial
    from t2id.grid.stage import build_stage
    from t2id.runner import load_stages, run_pipeline

    class CountingDetect:
        def __init__(self, inner, counter_dir):
            self.inner, self.counter_dir = inner, counter_dir

        def __call__(self, trial, *args):
            with open(Path(self.counter_dir, trial["name"]), "a") as fh:
                fh.write("run\\n")
            return self.inner(trial, *args)

    stages = {**load_stages(), "grid": build_stage(CountingDetect(detect_trial, sys.argv[2]))}
    outcomes = run_pipeline(load_config(sys.argv[1]), stages=stages)
    print("RESULT", [(o.stage, o.status, o.summary.get("resumed")) for o in outcomes])
""")

CONFIG = textwrap.dedent("""
    run: {id: grid-e2e, seed: 0, stages: [data, split, grid]}
    store: {uri: STORE, cache_dir: CACHE}
    data:
      source: phantom
      phantom: {subjects: 4, frames_per_subject: 6, size: 64, seed: 0}
    split: {folds: 2}
    grid:
      detector: {model: yolov8n.yaml, imgsz: 64, epochs: 1, batch: 8}
      strategies: [baseline, cas, t2id_cas]
      max_concurrent: 1
    cluster: {num_cpus: 2}
""")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its local Ray), by pid."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family[1:], timeout=30)


def _finished_trials(store) -> set[str]:
    """Trials whose result a resumed grid reuses: the trial itself publishes its result and then its memo
    when it ends (Tune's own experiment state is synced to the store only every few seconds, so with
    fast trials it can lag behind all of them)."""
    return {layout.grid.trial_name(fold, strategy, 0) for fold in (0, 1) for strategy in ("baseline", "cas")
            if store.exists(layout.memo(layout.grid.trial(fold, strategy, 0)))}


def _wait_finished(store, proc, at_least: int, timeout: float = 240.0) -> set[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = _finished_trials(store)
        if len(done) >= at_least:
            return done
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[0][-4000:])
        time.sleep(0.2)
    raise AssertionError("no trial finished in time")


def test_killed_grid_resumes_without_rerunning_finished_trials(tmp_path):
    """Real tiny YOLO, 2 folds x 2 presets (+ t2id_cas, skipped: no label stage): kill -9, resume, complete."""
    import pandas as pd

    counters = tmp_path / "counters"
    counters.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("STORE", str(tmp_path / "store")).replace("CACHE", str(tmp_path / "cache")))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    store = open_store(str(tmp_path / "store" / "grid-e2e"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [PY, str(script), str(config), str(counters)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        finished = _wait_finished(store, proc, at_least=1)
    finally:
        _kill_tree(proc)
    assert 1 <= len(finished) < 4  # killed mid-way
    assert not store.exists(layout.marker("grid")) and not store.exists(layout.grid.trials)

    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    line = [ln for ln in resumed.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "('grid', 'ran', True)" in line[0]  # the runner redid the stage, which kept the finished trials
    for name in finished:
        assert _count(counters, name) == 1, f"{name} finished before the kill but trained again"
    trained = {"fold=0-baseline-seed=0", "fold=0-cas-seed=0", "fold=1-baseline-seed=0", "fold=1-cas-seed=0"}
    assert {p.name for p in counters.iterdir()} == trained

    trials = store.read_table(layout.grid.trials).to_pandas()
    classes = json.loads(store.read_text(layout.data.classes))["names"]
    assert len(trials) == 2 * 3 * (1 + len(classes))  # (fold, strategy, seed, class) incl. "all classes"
    assert (trials["seed"] == 0).all()
    ok = trials[trials["status"] == "ok"]
    assert set(zip(ok["fold"], ok["strategy"])) == {(0, "baseline"), (0, "cas"), (1, "baseline"), (1, "cas")}
    overall = ok[ok["class"] == "all classes"]
    assert overall[["map50_95", "map50", "precision", "recall"]].notna().all().all()
    assert overall["map50_95"].between(0, 1).all()
    assert (ok["train_seconds"] > 0).all()
    assert list(ok["class"][:1 + len(classes)]) == ["all classes", *classes]
    # Equal compute (default budget: the fold's real training images x epochs), counted during training;
    # the final model is reported; its per-image predictions cover every validation image of the fold.
    assert (ok["selection"] == "final").all() and (ok["budget_unit"] == "images_seen").all()
    folds = store.read_table(layout.split.folds).to_pandas()
    for fold, per_fold in overall.groupby("fold"):
        n_real = int((folds["fold"] != fold).sum())
        assert set(per_fold["budget"]) == {n_real} and set(per_fold["images_seen"]) == {n_real}
        assert per_fold["optimizer_steps"].nunique() == 1 and per_fold["optimizer_steps"].iloc[0] > 0
        for _, row in per_fold.iterrows():
            assert row["predictions"] == layout.grid.predictions(fold, row["strategy"], 0)
            pred = store.read_table(row["predictions"])
            assert sorted(pred["image_id"].to_pylist()) == sorted(folds.loc[folds["fold"] == fold, "image_id"])
    skipped_rows = trials[trials["status"] == "skipped"]
    assert skipped_rows["predictions"].isna().all() and skipped_rows["optimizer_steps"].isna().all()
    skipped = trials[trials["status"] == "skipped"]
    assert set(skipped["strategy"]) == {"t2id_cas"} and skipped["reason"].str.contains("label stage").all()
    curves = store.read_table(layout.grid.pr_curves).to_pandas()
    assert set(zip(curves["fold"], curves["strategy"], curves["seed"])) == set(zip(ok["fold"], ok["strategy"], ok["seed"]))
    assert curves["recall"].between(0, 1).all()

    # Tune saw only our one report per trial: ultralytics' Ray Tune callback (per-epoch
    # `metrics/mAP50-95(B)` reports) is kept out of our session by the detector trainer. (The resumed
    # run's experiment holds the trials it trained: those not finished before the kill.)
    assert set(experiment_status(store)) == trained - finished
    for name in trained - finished:
        lines = store.read_text(layout.grid.tune_trial_result(name)).strip().splitlines()
        assert len(lines) == 1, f"{name}: {len(lines)} reports"
        reported = json.loads(lines[0])
        assert reported["t2id_trial"] == name and reported["training_iteration"] == 1
        assert not any(k.startswith("metrics/") for k in reported)


def test_errored_trials_are_retried_up_to_max_retries(ray_local, tmp_path):
    store = open_store(str(tmp_path / "run"))
    counters = tmp_path / "counters"
    trials = [t for t in _trials(counters, fail={"fold=0-cas": 1, "fold=1-cas": 5}) if t["strategy"] == "cas"]
    outcome = _run(trials, store, tmp_path, max_retries=1)
    # fold=0-cas fails once then succeeds on its retry; fold=1-cas fails its attempt and its one retry.
    assert _count(counters, "fold=0-cas") == 2
    assert _count(counters, "fold=1-cas") == 2
    assert set(outcome.results) == {"fold=0-cas"}
    assert list(outcome.errors) == ["fold=1-cas"] and "planned failure" in outcome.errors["fold=1-cas"]
    assert experiment_status(store)["fold=1-cas"] == "ERROR"


def test_resume_on_s3_retries_errored_and_keeps_finished(ray_local, tmp_path, s3_bucket, s3_server):
    store = open_store(f"s3://{s3_bucket}/runs/r1", endpoint_url=s3_server)
    counters = tmp_path / "counters"
    trials = _trials(counters, fail={"fold=1-baseline": 1})
    first = _run(trials, store, tmp_path, max_retries=0)
    assert list(first.errors) == ["fold=1-baseline"] and first.reused == 0
    # Tune's experiment (state, trial folders) and the trials' results live in the bucket under grid/.
    keys = store.list(layout.grid.tune)
    assert any(k.endswith("tuner.pkl") for k in keys) and any("experiment_state-" in k for k in keys)
    assert experiment_status(store)["fold=1-baseline"] == "ERROR"
    assert all(trial_memo(store, t).done() for t in trials if t["name"] != "fold=1-baseline")
    second = _run(trials, store, tmp_path, max_retries=0)
    assert second.reused == 3 and not second.errors and len(second.results) == 4
    assert _count(counters, "fold=1-baseline") == 2  # the errored trial ran again ...
    assert all(_count(counters, n) == 1 for n in ("fold=0-baseline", "fold=0-cas", "fold=1-cas"))  # ... only it
    assert set(experiment_status(store).values()) == {"TERMINATED"}
    assert second.results["fold=1-cas"]["overall"]["map50_95"] == pytest.approx(0.11)


def test_a_changed_identity_or_force_trains_again(ray_local, tmp_path):
    store = open_store(str(tmp_path / "run"))
    counters = tmp_path / "counters"
    trials = _trials(counters)[:2]
    assert _run(trials, store, tmp_path).reused == 0
    changed = [trials[0], {**trials[1], "identity": {**trials[1]["identity"], "version": 2}}]
    again = _run(changed, store, tmp_path)
    assert again.reused == 1 and _count(counters, trials[0]["name"]) == 1 and _count(counters, trials[1]["name"]) == 2
    forced = _run(changed, store, tmp_path, force=True)
    assert forced.reused == 0 and _count(counters, trials[0]["name"]) == 2 and len(forced.results) == 2
    # A result that changed under its memo is not trusted: that trial trains again.
    store.write_text(layout.grid.result(0, "cas", 0), "{}")
    assert _run(changed, store, tmp_path).reused == 1 and _count(counters, "fold=0-cas") == 4


def test_grid_config_checks_strategy_names():
    from t2id.config import validate_config
    from t2id.errors import ConfigError

    with pytest.raises(ConfigError, match=r"grid.*unknown strategy \['cas_sdxl'\].*custom_strategies"):
        validate_config({"grid": {"strategies": ["baseline", "cas_sdxl"]}})
    with pytest.raises(ConfigError, match="repeat a preset"):
        validate_config({"grid": {"custom_strategies": [{"name": "cas", "sampling": "cas"}]}})
    cfg = validate_config({"grid": {"strategies": ["baseline", "cas_cw"], "folds": [1],
                                    "custom_strategies": [{"name": "cas_cw", "sampling": "cas",
                                                           "class_weights": True}]}})
    assert cfg.grid.strategy_spec("cas_cw").class_weights and cfg.grid.strategy_spec("baseline").sampling == "none"


def test_plan_feeds_kept_labelled_synthetic_rows_and_records_skips(tmp_path):
    import pyarrow as pa

    from t2id.grid.core import plan_trials, usable_synthetic

    store = open_store(str(tmp_path / "run"))
    store.write_text(layout.data.classes, json.dumps({"names": ["a", "b"]}))
    store.write_table(layout.split.folds, pa.Table.from_pylist(
        [{"image_id": f"i{i}", "fold": i % 2, "group": f"s{i}"} for i in range(4)]))
    box = {"class_id": 1, "x": 0.5, "y": 0.5, "w": 0.1, "h": 0.1}
    store.write_table(layout.label.labels(0), pa.Table.from_pylist([
        {"image_id": "s0", "kept": True, "boxes": [box]},
        {"image_id": "s1", "kept": False, "boxes": [box]},  # rejected by the gate
        {"image_id": "s2", "kept": True, "boxes": []},  # no box found
    ]))
    config = validate_config({"run": {"stages": ["data", "split", "label", "grid"]},
                              "grid": {"strategies": ["baseline", "t2id_cas"]}})
    s = settings(config)
    inputs = {"data": "d1", "split": "s1"}
    trials, skipped, folds, classes = plan_trials(store, s, inputs)
    assert folds == [0, 1] and classes == ["a", "b"]
    assert {t["name"] for t in trials} == {"fold=0-baseline-seed=0", "fold=0-t2id_cas-seed=0", "fold=1-baseline-seed=0"}
    sdxl = next(t for t in trials if t["name"] == "fold=0-t2id_cas-seed=0")
    assert sdxl["n_synthetic"] == 1 and sdxl["synthetic_key"] == layout.label.labels(0)
    assert usable_synthetic(store.read_table(sdxl["synthetic_key"]))["image_id"].to_pylist() == ["s0"]
    # fold 1 has no synthetic set: its t2id_cas trial is recorded as skipped (one row per class + all), with why.
    assert {(r["fold"], r["strategy"], r["status"]) for r in skipped} == {(1, "t2id_cas", "skipped")}
    assert len(skipped) == 3 and f"{layout.label.labels(1)} does not exist" in skipped[0]["reason"]
    # A result is keyed by everything it was trained from: other synthetic rows or upstream data, other identity.
    memo = {t["name"]: trial_memo(store, t).digest for t in trials}
    store.write_table(layout.label.labels(0), pa.Table.from_pylist([{"image_id": "s9", "boxes": [box]}]))
    again = {t["name"]: trial_memo(store, t).digest for t in plan_trials(store, s, inputs)[0]}
    assert again["fold=0-t2id_cas-seed=0"] != memo["fold=0-t2id_cas-seed=0"]
    assert again["fold=0-baseline-seed=0"] == memo["fold=0-baseline-seed=0"]
    other_data = {t["name"]: trial_memo(store, t).digest for t in plan_trials(store, s, {**inputs, "data": "d2"})[0]}
    assert other_data["fold=0-baseline-seed=0"] != memo["fold=0-baseline-seed=0"]
    # Without the label stage the synthetic strategies are skipped with that reason.
    no_label = settings(validate_config({"run": {"stages": ["data", "split", "grid"]},
                                         "grid": {"strategies": ["baseline", "t2id_cas"]}}))
    _, skipped, _, _ = plan_trials(store, no_label, inputs)
    assert {r["strategy"] for r in skipped} == {"t2id_cas"} and "label stage is not enabled" in skipped[0]["reason"]


def test_grid_settings_name_exactly_the_cross_section_inputs():
    """grid's marker changes with the grid section, run.seed (unless grid.seed is set) and whether the label
    stage runs, and with nothing else of other sections."""
    from t2id.runner import settings_hash

    def digest(**sections):
        return settings_hash(settings(validate_config({"run": {"id": "x"}, **sections})))

    base = digest()
    assert digest(run={"id": "x", "seed": 3}) != base
    assert digest(run={"id": "x", "stages": ["data", "split", "grid"]}) != base
    assert digest(grid={"detector": {"epochs": 2}}) != base
    assert digest(label={"method": "inpaint"}) == base and digest(report={"seed": 2}) == base
    assert digest(grid={"seed": 1}, run={"id": "x", "seed": 3}) == digest(grid={"seed": 1})


def test_seeds_are_a_grid_axis(tmp_path):
    """grid.seeds: one trial per fold x strategy x seed, each with its own name, keys and identity."""
    import pyarrow as pa

    from t2id.errors import ConfigError
    from t2id.grid.core import plan_trials

    store = open_store(str(tmp_path / "run"))
    store.write_text(layout.data.classes, json.dumps({"names": ["a", "b"]}))
    store.write_table(layout.split.folds, pa.Table.from_pylist(
        [{"image_id": f"i{i}", "fold": i % 2, "group": f"s{i}"} for i in range(4)]))
    s = settings(validate_config({"run": {"stages": ["data", "split", "grid"]},
                                  "grid": {"strategies": ["baseline", "t2id_cas"], "seeds": [3, 7]}}))
    assert s.seeds == [3, 7] and s.run_seed is None
    trials, skipped, _, _ = plan_trials(store, s, {})
    assert sorted((t["fold"], t["strategy"], t["seed"]) for t in trials) == [
        (0, "baseline", 3), (0, "baseline", 7), (1, "baseline", 3), (1, "baseline", 7)]
    assert len({t["name"] for t in trials}) == 4 and "fold=0-baseline-seed=7" in {t["name"] for t in trials}
    assert len({trial_memo(store, t).digest for t in trials}) == 4
    assert len({layout.memo(layout.grid.trial(t["fold"], t["strategy"], t["seed"])) for t in trials}) == 4
    assert {(r["fold"], r["seed"]) for r in skipped} == {(0, 3), (0, 7), (1, 3), (1, 7)}  # skipped per seed too
    # default: one seed, grid.seed or else run.seed
    assert settings(validate_config({"run": {"seed": 5}})).seeds == [5]
    assert settings(validate_config({"grid": {"seed": 2}})).seeds == [2]
    with pytest.raises(ConfigError, match="grid.seeds"):
        validate_config({"grid": {"seeds": [1, 1]}})
    with pytest.raises(ConfigError, match="both set"):
        validate_config({"grid": {"seeds": [1], "seed": 1}})


def test_trials_table_has_the_contract_columns():
    from t2id.grid.core import TRIALS_SCHEMA, skipped_rows, tables

    trial = {"name": "t", "fold": 0, "strategy": "baseline", "seed": 4, "n_synthetic": 0}
    output = {"overall": {"map50_95": 0.5}, "per_class": {}, "pr_curves": {"a": [[0.0, 1.0]]}, "seconds": 1.0,
              "budget_unit": "images_seen", "budget": 40, "optimizer_steps": 5, "images_seen": 40,
              "selection": "final", "predictions": layout.grid.predictions(0, "baseline", 4)}
    table, curves = tables([trial], {"t": output}, skipped_rows(1, "baseline", 4, ["a"], "why"), ["baseline"], ["a"])
    assert table.schema == TRIALS_SCHEMA
    assert table.column_names == ["fold", "strategy", "seed", "class", "map50_95", "map50", "precision", "recall",
                                  "train_seconds", "n_synthetic", "budget_unit", "budget", "optimizer_steps",
                                  "images_seen", "selection", "predictions", "status", "reason"]
    row = table.to_pylist()[0]
    assert row["seed"] == 4 and row["selection"] == "final" and row["optimizer_steps"] == 5
    assert row["predictions"] == "grid/fold=0/strategy=baseline/seed=4/predictions.parquet"
    assert curves.column("seed").to_pylist() == [4]


def test_trial_progress_callback_pickles_with_a_live_progress_bar():
    """Tune pickles its callbacks into the experiment state; the bar's `advance` holds a rich Progress
    (with a lock) when `t2id run` draws on a terminal or a job prints bars, and must not break that."""
    import ray.cloudpickle
    from rich.console import Console
    from rich.progress import Progress

    from t2id.grid.ray_layer import trial_progress

    with Progress(console=Console(file=io.StringIO())) as bar:
        task = bar.add_task("grid", total=4)
        callback = trial_progress(lambda n=1, status=None: bar.update(task, advance=n, description=status))
        callback.on_trial_complete(0, [], type("T", (), {"trial_id": "t1"})())
        assert bar.tasks[0].completed == 1 and bar.tasks[0].description == "0 running"
        restored = ray.cloudpickle.loads(ray.cloudpickle.dumps(callback))
    restored.on_trial_complete(0, [], type("T", (), {"trial_id": "t2"})())  # draws nothing, no error
    assert restored.advance is None and restored.running == set()


# Comparing generators (issue 20): a strategy trains on ANOTHER run's synthetic set (`synthetic_from`). One real
# run (data + split on the phantom); the other run is fabricated the way a second `t2id run` with the same data
# and split sections but another lora.method would leave it: the same data/ and split/ outputs, and a label
# manifest of its own images (method ddpm) with its marker.

TINY_DETECTOR = {"model": "yolov8n.yaml", "imgsz": 64, "epochs": 1, "batch": 8, "warmup_epochs": 0,
                 "nominal_batch": 8, "validate_every_epoch": False}


def _compare_config(tmp_path: Path, other_root: str, strategies=("baseline", "t2id_cas_other"), folds=(0,)) -> dict:
    return {
        "run": {"id": "gen-lora", "seed": 0, "stages": ["data", "split", "grid"]},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "data": {"source": "phantom", "phantom": {"subjects": 4, "frames_per_subject": 4, "size": 64, "seed": 0}},
        "split": {"folds": 2},
        "grid": {"detector": TINY_DETECTOR, "strategies": list(strategies), "folds": list(folds) if folds else None,
                 "max_concurrent": 1,
                 "custom_strategies": [{"name": "t2id_cas_other", "sampling": "cas", "synthetic": True,
                                        "synthetic_from": other_root}]},
        "cluster": {"num_cpus": 2},
    }


def write_other_labels(other, fold: int, n: int, method: str = "ddpm") -> list[str]:
    """The other run's label/fold=<fold>/labels.parquet: `n` kept, labelled images of its own (mirrored real
    train images holding a box, each a distinct file) plus one rejected row, and its label marker."""
    from PIL import Image, ImageOps

    rows = [r for r in load_fold_rows(other, fold, "train").to_pylist() if r["boxes"]][:n]
    out = []
    for i, r in enumerate(rows + rows[:1]):
        image = ImageOps.mirror(Image.open(io.BytesIO(other.read_bytes(other.key_of(r["uri"])))).convert("L"))
        image.putpixel((0, 0), (i * 37 + n) % 256)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = layout.generate.image(fold, "tracheal ring", f"{method}-{n}-{i:04d}")
        sha = other.write_bytes(key, buffer.getvalue())
        boxes = [{**b, "x": 1.0 - b["x"]} for b in r["boxes"]]
        out.append({"image_id": sha[:16], "uri": other.ref(key), "width": 64, "height": 64, "group": "synthetic",
                    "source": "synthetic", "boxes": boxes, "sha256": sha, "fold": fold,
                    "class_id": boxes[0]["class_id"], "prompt": "p", "negative_prompt": "", "seed": i, "steps": 2,
                    "guidance": 1.0, "scheduler": "ddpm", "base_model": "tiny", "lora_sha256": "x", "entropy": 5.0,
                    "std": 40.0, "clip_score": None, "kept": i < len(rows),
                    "reject_reason": None if i < len(rows) else "std", "label_source": "teacher", "method": method})
    digest = other.write_table(layout.label.labels(fold), pa.Table.from_pylist(out, schema=SYNTHETIC_SCHEMA))
    other.write_text(layout.marker("label"), json.dumps({"outputs": {layout.label.labels(fold): digest}}))
    return [r["image_id"] for r in out[:len(rows)]]


@pytest.fixture(scope="module")
def compare_runs(tmp_path_factory):
    """(this run's store, the other run's store, tmp): data + split done; the other run copies them."""
    from t2id.data.stage import STAGE as DATA
    from t2id.split.stage import STAGE as SPLIT

    tmp = tmp_path_factory.mktemp("compare")
    other_root = tmp / "store" / "gen-ddpm"
    cfg = validate_config(_compare_config(tmp, str(other_root)))
    run_pipeline(cfg, stages={"data": DATA, "split": SPLIT})
    this = run_store(cfg)
    for stage in ("data", "split"):
        shutil.copytree(Path(this.root) / stage, other_root / stage)
    return this, open_store(str(other_root)), tmp


def test_synthetic_from_is_checked_before_any_trial(compare_runs, tmp_path):
    """Config: synthetic_from needs synthetic: true. Plan: the other run's split must be this run's; its
    synthetic set feeds only the strategies that name it, keyed by its sha256; a fold without one is skipped."""
    from t2id.grid.core import plan_trials
    from t2id.grid.sources import external_inputs

    this, other, tmp = compare_runs
    with pytest.raises(ConfigError, match=r"custom_strategies.*'x'.*synthetic is false.*synthetic: true"):
        validate_config({"grid": {"custom_strategies": [{"name": "x", "synthetic_from": "runs/b"}]}})
    with pytest.raises(ConfigError, match=r"s3://bucket"):
        validate_config({"grid": {"custom_strategies": [{"name": "x", "synthetic": True,
                                                          "synthetic_from": "gs://b/r"}]}})

    ids = write_other_labels(other, 0, 3)
    s = settings(validate_config(_compare_config(tmp, other.root, ("baseline", "t2id_cas", "t2id_cas_other"), folds=None)))
    inputs = {"data": "d", "split": "s"}
    trials, skipped, folds, _ = plan_trials(this, s, inputs)
    assert folds == [0, 1]
    by_name = {t["name"]: t for t in trials}
    assert set(by_name) == {"fold=0-baseline-seed=0", "fold=1-baseline-seed=0", "fold=0-t2id_cas_other-seed=0"}
    other_trial = by_name["fold=0-t2id_cas_other-seed=0"]
    assert other_trial["synthetic_from"] == other.root and other_trial["n_synthetic"] == len(ids)
    assert other_trial["identity"]["synthetic"] == other.sha256(layout.label.labels(0))
    assert "synthetic_from" not in by_name["fold=0-baseline-seed=0"]["identity"]["strategy"]  # old memos hold
    # This run has no label stage (t2id_cas skipped, as before); the other run has no fold 1 set (skipped, why).
    reasons = {(r["fold"], r["strategy"]): r["reason"] for r in skipped}
    assert "label stage is not enabled" in reasons[(0, "t2id_cas")]
    assert f"{layout.label.labels(1)} does not exist in synthetic_from run {other.root}" in reasons[(1, "t2id_cas_other")]

    # A regenerated other run changes that trial's memo, and nothing else; and the grid stage's inputs.
    memo = {t["name"]: trial_memo(this, t).digest for t in trials}
    before = external_inputs(this, s)
    write_other_labels(other, 0, 2)
    again = {t["name"]: trial_memo(this, t).digest for t in plan_trials(this, s, inputs)[0]}
    assert [n for n in memo if memo[n] != again[n]] == ["fold=0-t2id_cas_other-seed=0"]
    after = external_inputs(this, s)
    assert [k for k in after if after[k] != before[k]] == [f"synthetic_from:{other.root}:label"]

    # Another split, other images or other classes: one error naming both runs, the file and the fix.
    third = open_store(str(tmp_path / "gen-other-split"))
    for stage in ("data", "split"):
        shutil.copytree(Path(this.root) / stage, Path(third.root) / stage)
    folds_table = third.read_table(layout.split.folds)
    flipped = pa.array([1 - f for f in folds_table["fold"].to_pylist()], pa.int32())
    third.write_table(layout.split.folds, folds_table.set_column(1, "fold", flipped))
    s3 = settings(validate_config(_compare_config(tmp, third.root)))
    with pytest.raises(UserError, match=r"'t2id_cas_other'.*gen-other-split.*another split/folds.parquet than this "
                                        r"run gen-lora.*same data and split sections"):
        plan_trials(this, s3, inputs)
    third.write_table(layout.split.folds, folds_table)
    manifest = third.read_table(layout.data.manifest)
    third.write_table(layout.data.manifest, manifest.slice(1))
    with pytest.raises(UserError, match=r"another data/manifest.parquet.*0 row\(s\) only there, 1 only here"):
        plan_trials(this, s3, inputs)
    third.write_table(layout.data.manifest, manifest)
    third.write_text(layout.data.classes, json.dumps({"names": ["a", "b"]}))
    with pytest.raises(UserError, match=r"another data/classes.json"):
        plan_trials(this, s3, inputs)
    with pytest.raises(UserError, match=r"has no data/classes.json; run its data and split stages first"):
        plan_trials(this, settings(validate_config(_compare_config(tmp, str(tmp_path / "nowhere")))), inputs)


def test_grid_trains_on_the_other_runs_images_and_a_regenerated_set_retrains_only_its_trial(compare_runs, ray_local,
                                                                                           torch_one_thread):
    """Real tiny YOLO, one fold, one seed: baseline + a T2ID-CAS on the other run's set. The synthetic trial's
    dataset holds the other run's images (bytes from its store); a new set there retrains that trial only."""
    from t2id.data.stage import STAGE as DATA
    from t2id.grid.stage import STAGE as GRID
    from t2id.split.stage import STAGE as SPLIT

    this, other, tmp = compare_runs
    ids = write_other_labels(other, 0, 3)
    cfg = validate_config(_compare_config(tmp, other.root))
    stages = {"data": DATA, "split": SPLIT, "grid": GRID}
    grid = next(o for o in run_pipeline(cfg, stages=stages) if o.stage == "grid")
    assert grid.status == "ran" and grid.summary["trials"] == 2 and grid.summary["reused"] == 0
    metrics = json.loads(this.read_text(layout.grid.trial_metrics(0, "t2id_cas_other", 0)))
    assert metrics["n_synthetic_train"] == 3
    datasets = sorted((tmp / "cache" / "datasets").glob("fold0-*"))
    with_ids = [d for d in datasets if all((d / "images" / "train" / f"{i}.png").is_file() for i in ids)]
    assert len(datasets) == 2 and len(with_ids) == 1  # the baseline's dataset has no synthetic image
    labels = other.read_table(layout.label.labels(0)).to_pylist()
    for row in labels[:3]:
        assert (with_ids[0] / "images" / "train" / f"{row['image_id']}.png").read_bytes() == \
            other.read_bytes(other.key_of(row["uri"]))
    assert not (with_ids[0] / "images" / "train" / f"{labels[3]['image_id']}.png").exists()  # rejected row
    assert not this.exists(labels[0]["uri"])  # the images live in the other run only

    # The other run regenerated (its label marker changed): the grid stage reruns and retrains that trial only.
    write_other_labels(other, 0, 2)
    grid = next(o for o in run_pipeline(cfg, stages=stages) if o.stage == "grid")
    assert grid.status == "ran" and grid.summary["trials"] == 2 and grid.summary["reused"] == 1
    trials = this.read_table(layout.grid.trials).to_pandas()
    overall = trials[trials["class"] == "all classes"].set_index("strategy")
    assert overall.loc["t2id_cas_other", "n_synthetic"] == 2 and overall.loc["baseline", "n_synthetic"] == 0
    assert (overall["status"] == "ok").all()
