"""Generation with the tiny SDXL + a LoRA adapter: the callable class alone (batched, fused adapters,
fold swaps), then on the warm Ray actor pool; exactly-once under a crashing actor and under a killed
driver; one pool for every fold; quality gate and top-up."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from t2id import layout
from t2id.configbase import StageSettings
from t2id.generate.config import GenerateConfig
from t2id.generate.core import LocalExecutor, generate_fold, worker_batch
from t2id.generate.plan import GenParams, PlanClass, initial_plan
from t2id.generate.ray_layer import WarmPool, run_ray
from t2id.generate.settings import GenerateSettings
from t2id.generate.worker import ImageGenerator
from t2id.lora.config import TargetClass
from t2id.store import open_store, sha256_bytes

ADAPTER_KEY = layout.lora.adapter(0)
CLASSES = [PlanClass("tracheal ring", 2, ("ultrasound of the tracheal ring",)),
           PlanClass("vocal fold", 5, ("ultrasound of the vocal fold",))]


def make_adapter(cache_dir: Path, out_dir: Path, seed: int = 0) -> Path:
    """A LoRA on the tiny UNet's attention projections with perturbed weights, saved in diffusers
    format with `save_lora_weights`: the file the lora stage publishes."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from t2id.lora.models import load_sdxl_pipeline

    pipe = load_sdxl_pipeline("tiny", cache_dir)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:  # B = 0 at init would make the adapter a no-op
                param.normal_(0.0, 0.5)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionXLPipeline.save_lora_weights(str(out_dir), unet_lora_layers=layers)
    return out_dir / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("gen-cache")
    adapter = make_adapter(cache, tmp_path_factory.mktemp("adapter"))
    other = make_adapter(cache, tmp_path_factory.mktemp("adapter1"), seed=1)
    return {"cache": cache, "adapter": adapter, "adapter_fold1": other}


def gen_settings(classes=CLASSES, use_adapter: bool = True, **kw) -> GenerateSettings:
    base = dict(images_per_class=3, width=64, height=64, steps=2, batch_size=2, concurrency=2,
                quality={"min_std": 0, "min_entropy": 0})
    g = GenerateConfig(**{**base, **kw})
    return GenerateSettings(generate=g, target_classes=[TargetClass(name=c.name, prompts=list(c.prompts))
                                                        for c in classes],
                            base_model="tiny", allow_network=False, run_seed=0, use_adapter=use_adapter, folds=None,
                            clip_weights="tiny" if g.quality.min_clip_score is not None else None)


def with_adapter(store, tiny):
    """Fold 0's and fold 1's adapters (different weights) in the store."""
    if not store.exists(ADAPTER_KEY):
        store.write_file(ADAPTER_KEY, tiny["adapter"])
        store.write_file(layout.lora.adapter(1), tiny["adapter_fold1"])
    return store


def local_executor(store, s: GenerateSettings, tiny) -> LocalExecutor:
    """One in-process worker (no Ray), loaded once and reused by every call it serves."""
    worker = ImageGenerator(s, with_adapter(store, tiny), 0, str(tiny["cache"]), torch_threads=1)
    return LocalExecutor(worker, s.generate.batch_size)


def ray_executor(store, s: GenerateSettings, tiny, worker_cls: type = ImageGenerator):
    return partial(run_ray, worker_cls=worker_cls, settings=s, store=with_adapter(store, tiny),
                   g=s.generate, cache_dir=str(tiny["cache"]))


def generate(store, s: GenerateSettings, executor, classes=CLASSES):
    return generate_fold(store, s, 0, classes, executor)


def assert_store_equals_plan(store, outcome) -> None:
    """No gaps, no duplicates, no strays; every PNG matches its manifest checksum."""
    manifest = store.read_table(layout.generate.manifest(0)).to_pylist()
    plan_keys = [r["key"] for r in outcome.plan]
    assert len(plan_keys) == len(set(plan_keys)) == len(manifest)
    listed = [k for k in store.list(layout.generate.images(0)) if k.endswith(".png")]
    assert sorted(listed) == sorted(plan_keys)
    for row in manifest:
        data = store.read_bytes(store.key_of(row["uri"]))
        assert sha256_bytes(data) == row["sha256"]
        assert row["source"] == "synthetic" and row["fold"] == 0 and row["lora_sha256"]


def test_callable_class_without_ray_same_seed_same_image(tmp_path, tiny):
    """__call__ directly (batched by default): PNGs + records written; the same batch gives the same bytes
    (a retried batch rewrites the same key); unbatched, an image depends only on its seed, not its batch."""
    store = with_adapter(open_store(str(tmp_path / "store")), tiny)
    s = gen_settings(CLASSES[:1], quality={"min_std": 30, "min_entropy": 4.7})
    params = GenParams("", 2, 7.5, "euler", 64, 64, "tiny", store.sha256(ADAPTER_KEY))
    rows = initial_plan(0, 0, CLASSES[:1], params, 3)
    gen = ImageGenerator(s, store, 0, str(tiny["cache"]), torch_threads=1)

    out = gen(worker_batch(rows, ImageGenerator.PLAN_COLUMNS))
    assert list(out["key"]) == [r["key"] for r in rows]
    for row, sha in zip(rows, out["sha256"]):
        assert store.sha256(row["key"]) == sha
        record = json.loads(store.read_text(row["record_key"]))
        assert record["sha256"] == sha and record["params_digest"] == row["params_digest"]
        assert record["lora_sha256"] == params.lora_sha256 and record["base_model"] == "tiny"
    three = [store.read_bytes(r["key"]) for r in rows]
    assert len(set(three)) == 3  # different seeds, different images
    assert s.generate.batched_pipeline  # the default: one pipeline call per batch

    # A retried batch (same rows, same composition) rewrites the same keys with the same bytes.
    store.write_bytes(rows[0]["key"], b"orphan of a killed attempt")
    retried = gen(worker_batch(rows, ImageGenerator.PLAN_COLUMNS))
    assert list(retried["sha256"]) == list(out["sha256"]) and [store.read_bytes(r["key"]) for r in rows] == three

    # Batched pipeline calls: same latents per seed; float rounding may move a pixel by one grey level.
    batched = gen.render([r["prompt"] for r in rows], [""] * 3, [r["seed"] for r in rows])
    single = gen.render([rows[1]["prompt"]], [""], [rows[1]["seed"]])
    assert np.abs(batched[1].astype(int) - single[0].astype(int)).max() <= 1

    gen.batched_pipeline = False  # one call per image: the row alone gives the bytes it got in its batch
    unbatched = gen(worker_batch(rows, ImageGenerator.PLAN_COLUMNS))
    alone = gen(worker_batch(rows[1:2], ImageGenerator.PLAN_COLUMNS))  # the middle row on its own
    assert alone["sha256"][0] == unbatched["sha256"][1]

    # The adapter matters: the base model alone (lora not in run.stages) draws a different image.
    base = ImageGenerator(gen_settings(CLASSES[:1], use_adapter=False), store, 0, str(tiny["cache"]), torch_threads=1)
    assert base.provenance["lora_sha256"] == ""
    assert not np.array_equal(base.render([rows[1]["prompt"]], [""], [rows[1]["seed"]])[0], single[0])


def test_fused_adapter_matches_unfused_and_fold_swaps_restore_the_base_exactly(tmp_path, tiny):
    """The worker fuses the fold's LoRA into the weights: same image as the unfused adapter within float
    rounding. Swapping to another fold and back gives back the very same bytes (exact base weights)."""
    store = with_adapter(open_store(str(tmp_path / "store")), tiny)
    s = gen_settings(CLASSES[:1])
    gen = ImageGenerator(s, store, 0, str(tiny["cache"]), torch_threads=1)
    prompts, negatives, seeds = ["ultrasound of the tracheal ring"] * 2, [""] * 2, [11, 12]
    fused = gen.render(prompts, negatives, seeds)
    gen.pipe.unfuse_lora()  # the same adapter, applied by the LoRA layers at every forward instead
    unfused = gen.render(prompts, negatives, seeds)
    gen.pipe.fuse_lora()
    for a, b in zip(fused, unfused):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1

    gen.use_fold(1)
    assert gen.provenance["lora_sha256"] == store.sha256(layout.lora.adapter(1))
    fold1 = gen.render(prompts, negatives, seeds)
    assert not np.array_equal(fold1[0], fused[0])  # another adapter, another image
    gen.use_fold(0)
    assert all(np.array_equal(a, b) for a, b in zip(gen.render(prompts, negatives, seeds), fused))
    fresh = ImageGenerator(s, store, 1, str(tiny["cache"]), torch_threads=1)  # fold 1 without a history
    assert all(np.array_equal(a, b) for a, b in zip(fresh.render(prompts, negatives, seeds), fold1))
    assert gen.stats["pipeline_loads"] == 1 and gen.stats["adapter_loads"] == 3


def test_one_warm_pool_serves_every_fold_and_reloads_nothing(ray_local, tiny, tmp_path):
    """Two folds, each with its top-up rounds, on one pool: the same actor processes, one pipeline load
    each, the adapter swapped by the fold column; each fold's images exactly once, with its own adapter."""
    store = with_adapter(open_store(str(tmp_path / "store")), tiny)
    s = gen_settings(images_per_class=2, concurrency=2)
    with WarmPool(ImageGenerator, s, store, s.generate, str(tiny["cache"])) as pool:
        first = generate_fold(store, s, 0, CLASSES, pool)
        before = pool.stats()
        second = generate_fold(store, s, 1, CLASSES, pool)
        after = pool.stats()
    assert first.generated == second.generated == 4
    assert len(before) == 2 and sorted(a["pid"] for a in after) == sorted(a["pid"] for a in before)
    assert all(a["pipeline_loads"] == 1 for a in after)
    assert sum(a["adapter_loads"] for a in after) >= 3  # fold 0 on each actor, then fold 1 at least once
    for fold, outcome in ((0, first), (1, second)):
        manifest = store.read_table(layout.generate.manifest(fold)).to_pylist()
        assert len(manifest) == len({r["key"] for r in outcome.plan}) == 4
        assert {r["lora_sha256"] for r in manifest} == {store.sha256(layout.lora.adapter(fold))}
    assert not {r["sha256"] for r in first.records.values()} & {r["sha256"] for r in second.records.values()}

def test_a_pool_leaves_room_for_the_work_beside_it(ray_local):
    """label's teacher runs beside its top-up generators: the pool starts only as many actors as leave the
    teacher's CPUs free and keeps them warm across calls; where not even one actor does, `make_room` closes it
    and the next call starts a new one. (A light worker: the pool's placement is under test, not SDXL.)"""

    class PidWorker:
        PLAN_COLUMNS = ("key", "fold")

        def __init__(self, **ctor):
            self.stats, self.fold = {"pid": os.getpid(), "pipeline_loads": 1, "adapter_loads": 0}, None

        def __call__(self, batch):
            return {"key": batch["key"], "pid": np.full(len(batch["key"]), os.getpid())}

    rows = [{"key": f"k{i}", "fold": 0} for i in range(4)]
    s = gen_settings(batch_size=1, concurrency=None)  # 4 batches; actors from the cluster's 2 CPUs

    def pids(pool) -> set[int]:
        seen: list[dict] = []
        pool(rows, seen.append)
        assert sorted(k for b in seen for k in b["key"]) == [r["key"] for r in rows]
        return {int(p) for b in seen for p in b["pid"]}

    with WarmPool(PidWorker, s, None, s.generate, "") as pool:
        assert len(pids(pool)) == 2  # nothing to leave: one actor per CPU
    with WarmPool(PidWorker, s, None, s.generate, "", leave={"CPU": 1}) as pool:
        first = pids(pool)
        assert len(first) == 1 and pool.make_room()  # 1 actor + the teacher's 1 CPU fit in 2
        assert pids(pool) == first and pool.started == 1  # warm: the same process served both calls
    with WarmPool(PidWorker, s, None, s.generate, "", leave={"CPU": 2}) as pool:
        first = pids(pool)
        assert len(first) == 1  # at least one actor, even when it leaves too little
        assert not pool.make_room() and pool.actors == []  # closed: the teacher needs both CPUs
        assert pids(pool) != first and pool.started == 2


def test_corrupt_png_is_regenerated_in_place(tiny, tmp_path):
    """Orchestration without Ray (LocalExecutor): a PNG that no longer matches its record is redone."""
    store = open_store(str(tmp_path / "store"))
    s = gen_settings(images_per_class=2)
    local = local_executor(store, s, tiny)
    first = generate(store, s, local)
    key = first.plan[0]["key"]
    good = store.read_bytes(key)
    store.write_bytes(key, b"not a png")
    again = generate(store, s, local)
    assert (again.generated, again.reused) == (1, 3)
    # Same seed, same image; redone alone instead of in its batch of 2, a pixel may move by one grey level.
    redone = np.asarray(Image.open(io.BytesIO(store.read_bytes(key))), dtype=int)
    assert np.abs(redone - np.asarray(Image.open(io.BytesIO(good)), dtype=int)).max() <= 1
    assert_store_equals_plan(store, again)


def test_gate_rejects_keep_records_and_top_up_to_n(tiny, tmp_path):
    """Threshold between the images' std values: some rejected, top-up rounds reach N kept."""
    store = open_store(str(tmp_path / "store"))
    probe_settings = gen_settings(images_per_class=4)
    local = local_executor(store, probe_settings, tiny)  # the driver re-judges what the worker's gate said
    probe = generate(store, probe_settings, local)
    stds = sorted(r["std"] for r in probe.records.values())
    threshold = (stds[2] + stds[3]) / 2  # rejects most of the first round
    s = gen_settings(images_per_class=4, max_attempts_factor=6, quality={"min_std": threshold, "min_entropy": 0})
    outcome = generate(store, s, local)
    assert outcome.reused == 8  # round 0 reused; only the gate changed
    manifest = store.read_table(layout.generate.manifest(0)).to_pylist()
    rejected = [r for r in manifest if not r["kept"]]
    assert rejected and all(r["reject_reason"] == "std" for r in rejected)
    assert all(store.exists(store.key_of(r["uri"])) for r in rejected)  # kept on disk, recorded
    for name, c in outcome.classes.items():
        assert c.attempted > 4
        assert c.kept == 4 or c.attempted == 24, (name, c)
        assert c.shortfall == 4 - c.kept
    assert_store_equals_plan(store, outcome)
    again = generate(store, s, local)
    assert again.generated == 0 and again.classes == outcome.classes


def test_impossible_gate_reports_shortfall_at_the_bound(tiny, tmp_path):
    store = open_store(str(tmp_path / "store"))
    s = gen_settings(CLASSES[:1], images_per_class=2, max_attempts_factor=2,
                     quality={"min_std": 0, "min_entropy": 8})  # 64x64 images cannot reach 8 bits
    outcome = generate(store, s, local_executor(store, s, tiny), CLASSES[:1])
    c = outcome.classes["tracheal ring"]
    assert (c.attempted, c.kept, c.shortfall) == (4, 0, 2)
    manifest = store.read_table(layout.generate.manifest(0)).to_pylist()
    assert len(manifest) == 4 and {r["reject_reason"] for r in manifest} == {"entropy"}
    assert_store_equals_plan(store, outcome)


def test_clip_gate_scores_each_image_and_rejects_below_threshold(tiny, tmp_path):
    """The optional CLIP gate (evaluate's ClipScorer, tiny weights): scores recorded, 'clip' rejections."""
    store = open_store(str(tmp_path / "store"))
    s = gen_settings(CLASSES[:1], images_per_class=1, max_attempts_factor=2,
                     quality={"min_std": 0, "min_entropy": 0, "min_clip_score": 1000.0})  # max is 100
    assert s.clip_weights == "tiny"
    outcome = generate(store, s, local_executor(store, s, tiny), CLASSES[:1])
    manifest = store.read_table(layout.generate.manifest(0)).to_pylist()
    assert len(manifest) == 2 and outcome.classes["tracheal ring"].shortfall == 1
    assert all(r["reject_reason"] == "clip" and 0 <= r["clip_score"] <= 100 for r in manifest)


def test_ray_data_generates_plan_once_then_nothing(ray_local, tiny, s3_bucket, s3_server):
    store = open_store(f"s3://{s3_bucket}/run", endpoint_url=s3_server)
    s = gen_settings()
    first = generate(store, s, ray_executor(store, s, tiny))
    assert first.generated == 6 and first.reused == 0
    assert_store_equals_plan(store, first)
    manifest = store.read_table(layout.generate.manifest(0))
    assert manifest.column("kept").to_pylist() == [True] * 6
    assert sorted(set(manifest.column("class_id").to_pylist())) == [2, 5]

    second = generate(store, s, ray_executor(store, s, tiny))
    assert second.generated == 0 and second.reused == 6
    assert store.read_table(layout.generate.manifest(0)).equals(manifest)


class CrashOnce(ImageGenerator):
    """Writes the first image of its first batch, then kills its own process (no cleanup, like an OOM
    kill). A marker file makes the restarted actor behave normally."""

    marker = ""

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            super().__call__({k: v[:1] for k, v in batch.items()})
            os._exit(1)
        return super().__call__(batch)


def test_killed_actor_is_restarted_and_nothing_duplicated(ray_local, tiny, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    CrashOnce.marker = str(tmp_path / "crashed")
    store = open_store(str(tmp_path / "store"))
    s = gen_settings(concurrency=1)
    outcome = generate(store, s, ray_executor(store, s, tiny, worker_cls=CrashOnce))
    assert Path(CrashOnce.marker).exists()  # the crash happened
    assert outcome.generated == 6
    assert_store_equals_plan(store, outcome)


DRIVER = """
import sys, ray
from functools import partial
from t2id.generate.config import GenerateConfig
from t2id.generate.core import generate_fold
from t2id.generate.plan import PlanClass
from t2id.generate.ray_layer import run_ray
from t2id.generate.settings import GenerateSettings
from t2id.generate.worker import ImageGenerator
from t2id.store import open_store
ray.init(address=sys.argv[1], log_to_driver=False)
g = GenerateConfig(images_per_class=16, width=64, height=64, steps=2, batch_size=1, concurrency=1,
                   quality={"min_std": 0, "min_entropy": 0})
s = GenerateSettings(generate=g, target_classes=[{"name": "vocal fold", "prompts": ["a vocal fold"]}],
                     base_model="tiny", allow_network=False, run_seed=0, use_adapter=True, folds=None,
                     clip_weights=None)
store = open_store(sys.argv[2])
executor = partial(run_ray, worker_cls=ImageGenerator, settings=s, store=store, g=g, cache_dir=sys.argv[3])
generate_fold(store, s, 0, [PlanClass("vocal fold", 5, ("a vocal fold",))], executor)
"""


def test_killed_driver_then_rerun_completes_the_plan_exactly(ray_local, tiny, tmp_path):
    store = with_adapter(open_store(str(tmp_path / "store")), tiny)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, str(script), address, store.root, str(tiny["cache"])],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = layout.generate.records(0)
    try:
        deadline = time.monotonic() + 90
        while len(store.list(records)) < 2:  # a tiny image takes ~40 ms: poll often, 16 of them leave room
            assert proc.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "no image appeared within 90 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(store.list(records))
    assert 2 <= done_before < 16 and not store.exists(layout.generate.manifest(0))

    vocal_fold = [PlanClass("vocal fold", 5, ("a vocal fold",))]
    s = gen_settings(vocal_fold, images_per_class=16, batch_size=1, concurrency=1)
    outcome = generate(store, s, ray_executor(store, s, tiny), vocal_fold)
    assert outcome.reused >= done_before and outcome.reused + outcome.generated == 16
    assert_store_equals_plan(store, outcome)


class NoSettings(StageSettings):
    pass


def test_stage_end_to_end_then_second_run_generates_nothing(ray_local, tiny, tmp_path):
    """data -> split -> (adapter) -> generate through the runner: manifest, plan, contact sheets;
    a second run skips the stage, a stage redone after its folds finished reuses them (fold memo), a
    forced rerun finds every image in place; a cross-section value re-runs generate only when
    generate's settings hold it."""
    import importlib

    from t2id.config import validate_config
    from t2id.runner import Stage, StageResult, run_pipeline

    def fake_lora(ctx, s):  # what the lora stage publishes, without training (tested in test_lora_*)
        key = layout.lora.adapter(0)
        return StageResult(outputs={key: ctx.store.write_file(key, tiny["adapter"])})

    stages = {n: importlib.import_module(f"t2id.{n}.stage").STAGE for n in ("data", "split", "generate")}
    stages["lora"] = Stage(name="lora", settings=lambda cfg: NoSettings(), depends_on=("data", "split"),
                           run=fake_lora)
    raw = {
        "run": {"id": "gen", "stages": ["data", "split", "lora", "generate"]},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tiny["cache"])},
        "data": {"source": "phantom", "phantom": {"subjects": 4, "frames_per_subject": 3, "size": 64}},
        "split": {"folds": 2},
        "generate": {"images_per_class": 2, "width": 64, "height": 64, "steps": 2, "batch_size": 2,
                     "folds": [0], "contact_sheet_images": 2, "contact_sheet_thumb": 32},
    }
    cfg = validate_config(raw)
    first = {o.stage: o for o in run_pipeline(cfg, stages=stages)}["generate"]
    assert first.status == "ran" and first.summary["generated"] >= 4
    store = open_store(str(tmp_path / "store")).child("gen")
    manifest = store.read_table(layout.generate.manifest(0)).to_pylist()
    per_class = first.summary["folds"]["0"]["classes"]
    for name, c in per_class.items():
        assert c["kept"] == 2 or c["attempted"] == 4, (name, c)
    assert len(manifest) == sum(c["attempted"] for c in per_class.values())
    names = json.loads(store.read_text(layout.data.classes))["names"]
    assert {r["class_id"] for r in manifest} == {names.index("tracheal ring"), names.index("vocal fold")}
    assert all(r["base_model"] == "tiny" and r["steps"] == 2 and r["prompt"] for r in manifest)
    for class_name in ("tracheal ring", "vocal fold"):
        sheet = Image.open(io.BytesIO(store.read_bytes(layout.generate.contact_sheet(0, class_name))))
        assert sheet.width > sheet.height  # real | synthetic side by side
    assert not store.list(layout.generate.fold(1))  # generate.folds: [0]

    again = {o.stage: o for o in run_pipeline(cfg, stages=stages)}["generate"]
    assert again.status == "skipped"
    # Every image is a marker output: a truncated PNG is caught before the skip and made again from its seed
    # (rendered alone instead of in its batch of 2: batched matmuls may move a pixel by one grey level).
    image_key = store.key_of(manifest[0]["uri"])
    assert image_key in json.loads(store.read_text(layout.marker("generate")))["outputs"]
    good = store.read_bytes(image_key)
    store.write_bytes(image_key, good[: len(good) // 2])
    repaired = {o.stage: o for o in run_pipeline(cfg, stages=stages)}["generate"]
    assert repaired.status == "ran"
    redone = np.asarray(Image.open(io.BytesIO(store.read_bytes(image_key))), dtype=int)
    assert np.abs(redone - np.asarray(Image.open(io.BytesIO(good)), dtype=int)).max() <= 1
    assert json.loads(store.read_text(layout.marker("generate")))["outputs"][image_key] == store.sha256(image_key)
    manifest = store.read_table(layout.generate.manifest(0)).to_pylist()  # the repaired image's new hash
    # A stage killed after fold 0 was done (no marker): the fold memo skips the finished fold.
    store.delete(layout.marker("generate"))
    redone = {o.stage: o for o in run_pipeline(cfg, stages=stages)}["generate"]
    assert redone.status == "ran" and redone.summary["folds"]["0"]["fold_memo"] == "reused"
    assert redone.summary["generated"] == 0
    forced = {o.stage: o for o in run_pipeline(cfg, stages=stages, force="generate")}["generate"]
    assert forced.status == "ran" and forced.summary["generated"] == 0 and "fold_memo" not in forced.summary["folds"]["0"]
    assert forced.summary["reused"] == len(manifest)  # --force re-verified every image instead
    assert store.read_table(layout.generate.manifest(0)).to_pylist() == manifest

    # evaluate.clip_weights matters only with the CLIP gate on: no re-run; a new prompt (lora section) re-runs
    # generate alone.
    other_clip = validate_config({**raw, "evaluate": {"clip_weights": str(tmp_path / "elsewhere")}})
    assert {o.stage: o.status for o in run_pipeline(other_clip, stages=stages)}["generate"] == "skipped"
    prompts = [{"name": "tracheal ring", "prompts": ["ring"]}, {"name": "vocal fold", "prompts": ["fold"]}]
    new_prompts = validate_config({**raw, "lora": {"target_classes": prompts}})
    statuses = {o.stage: o.status for o in run_pipeline(new_prompts, stages=stages)}
    assert statuses == {"data": "skipped", "split": "skipped", "lora": "skipped", "generate": "ran"}
    assert {r["prompt"] for r in store.read_table(layout.generate.manifest(0)).to_pylist()} == {"ring", "fold"}
