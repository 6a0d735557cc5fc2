"""`t2id plan`: counts from the config and the dataset, GPU-hours from the documented throughput table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from t2id.config import builtin_config, load_config
from t2id.errors import UserError
from t2id.plan import PAPER_IMAGES, PAPER_RARE_IMAGES, make_plan
from t2id.plan_throughput import rows
from t2id.runner import run_pipeline

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "configs" / "t2id-cas.yaml"


def t2id(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2id.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)


def test_paper_plan_counts_and_hours():
    plan = make_plan(load_config(PAPER), str(PAPER), price_per_gpu_hour=2.0)
    stages = {s.stage: s for s in plan.stages}
    assert plan.dataset.images == PAPER_IMAGES and plan.dataset.rare_images == PAPER_RARE_IMAGES
    assert plan.gpus == 4  # cluster.gpu_workers defaults: up to 4 workers x 1 GPU

    # LoRA: 630 TRAIN images per fold, global batch 16 -> 39 steps per epoch, 100 epochs, 4 folds.
    lora = stages["lora"]
    assert lora.counts["steps"] == [3900] * 4 and lora.counts["images_processed"] == [3900 * 16] * 4
    fp16_512 = next(t for t in rows("h200", "lora") if t.variant == "fp16" and t.resolution == 512)
    assert fp16_512.images_per_second == 25.7  # issue 17's measurement
    train_hours = 4 * 3900 * 16 / 25.7 / 3600
    assert train_hours < lora.gpu_hours < train_hours * 1.5  # plus rank 0's validation images
    # Issue 17: the paper's LoRA job (840 images x 100 epochs) is about 50 min on one H200.
    assert 45 < 840 * 100 / 25.7 / 60 < 60

    gen = stages["generate"]
    assert gen.counts == {"images": 2400, "images_upper_bound": 4800}
    assert gen.gpu_hours == pytest.approx(2400 / 2.94 / 3600)  # batched_pipeline: true in the paper config
    grid = stages["grid"]
    assert grid.counts["trials"] == 4 * 7 * 1 and grid.counts["concurrent_trials"] == 8  # 0.5 GPU per trial
    assert grid.counts["images_seen_per_trial"] == [100 * 5598] * 4
    assert plan.cost == pytest.approx(plan.gpu_hours * 2.0)
    assert plan.cost_held == pytest.approx(plan.wall_hours * 4 * 2.0)
    assert plan.gpu_hours == pytest.approx(sum(s.gpu_hours for s in plan.stages))
    assert {t.work for t in plan.throughputs} >= {"lora", "generate", "detector_train"}
    assert all(t.source.startswith(("measured", "estimate")) for t in plan.throughputs)


def test_dreambooth_plan_counts_the_prior_images_and_the_doubled_forward():
    """lora.method dreambooth_lora: the base model draws prior_images_per_class per fold and class, and every
    step pushes as many prior images as instance images through the UNet."""
    import yaml

    from t2id.config import validate_config

    raw = yaml.safe_load(PAPER.read_text())
    plain = {s.stage: s for s in make_plan(validate_config(raw), str(PAPER)).stages}["lora"]
    raw["lora"] = {**raw.get("lora", {}), "method": "dreambooth_lora", "dreambooth": {"prior_images_per_class": 50}}
    db = {s.stage: s for s in make_plan(validate_config(raw), str(PAPER)).stages}["lora"]
    assert db.counts["prior_images"] == 4 * len(raw["lora"]["target_classes"]) * 50 > 0  # 4 folds
    assert plain.counts["prior_images"] == 0
    assert db.counts["steps"] == plain.counts["steps"]
    assert db.counts["images_processed"] == [2 * n for n in plain.counts["images_processed"]]
    assert db.gpu_hours > 1.5 * plain.gpu_hours and db.wall_hours > 1.5 * plain.wall_hours
    assert "class-prior images" in db.work and "prior images" in db.basis


def test_more_gpus_shorten_the_wall_time_not_the_gpu_hours():
    cfg = load_config(PAPER)
    four, eight = make_plan(cfg, "x", gpus=4), make_plan(cfg, "x", gpus=8)
    g4, g8 = ({s.stage: s for s in p.stages}["grid"] for p in (four, eight))
    assert g4.gpu_hours == pytest.approx(g8.gpu_hours) and g8.wall_hours < g4.wall_hours


def test_dataset_options_and_bad_gpu_type():
    cfg = load_config(PAPER)
    plan = make_plan(cfg, "x", images=2000, rare_images=400)
    assert plan.dataset.rare_train == [300] * 4 and plan.dataset.train == [1500] * 4
    with pytest.raises(UserError, match="--gpu-type a100: no throughput figures"):
        make_plan(cfg, "x", gpu_type="a100")
    with pytest.raises(UserError, match="--rare-images"):
        make_plan(cfg, "x", images=100, rare_images=200)


def test_demo_plan_counts_the_phantom():
    cfg = load_config(builtin_config("demo"))
    plan = make_plan(cfg, "demo")
    ph = cfg.data.phantom
    assert plan.dataset.images == ph.subjects * ph.frames_per_subject
    assert 0 < plan.dataset.rare_images < plan.dataset.images and plan.tiny
    assert {s.stage: s.on_gpu for s in plan.stages}["lora"] is False  # the demo trains on CPU


def test_plan_uses_the_runs_split_when_it_exists(tmp_path):
    cfg = load_config(PAPER.parent / "demo.yaml", overrides={
        "store.uri": str(tmp_path / "store"), "store.cache_dir": str(tmp_path / "cache"),
        "run.stages": ["data", "split"], "data.phantom.subjects": 4, "data.phantom.frames_per_subject": 5})
    run_pipeline(cfg)
    plan = make_plan(cfg, "x")
    assert plan.dataset.source.startswith("the run's store")
    assert plan.dataset.images == 20 and sum(plan.dataset.val) == 20
    assert [t + v for t, v in zip(plan.dataset.train, plan.dataset.val)] == [20, 20]


def test_cli_prints_the_plan_and_json():
    res = t2id("plan", str(PAPER), "--price-per-gpu-hour", "2.5")
    assert res.returncode == 0, res.stderr
    for text in ("GPU-hours", "total", "lora", "grid", "cost at $2.5/GPU-hour", "issue 17", "estimate"):
        assert text in res.stdout
    data = json.loads(t2id("plan", str(PAPER), "--json").stdout)
    assert data["gpu_type"] == "h200" and data["cost"] is None and data["gpu_hours"] > 0
    bad = t2id("plan", str(PAPER), "--gpu-type", "a100")
    assert bad.returncode == 1 and bad.stderr.count("error:") == 1 and "Traceback" not in bad.stderr
