"""Ray Train layer: 2 CPU workers with gloo (real DDP), checkpoints in the run store (local and the
S3 test server), a worker process killed from outside mid-run, resume equal to not stopping. (The
stage's fold memo and --force: tests/test_verify_outputs.py, on a real pipeline run.)"""

from __future__ import annotations

import json
import threading

import psutil
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from test_lora_train import make_examples

from t2id import layout
from t2id.data.manifest import FOLDS_SCHEMA, IMAGE_SCHEMA
from t2id.lora.config import LoraConfig
from t2id.lora.ray_layer import train_fold
from t2id.store import open_store
from t2id.tracking import Tracking, start

FOLD = 0
SEED = 7
EPOCHS = 5  # 8 images, global batch 4 over 2 workers -> 2 steps per epoch, 10 steps, checkpoint every 2
STEPS = 2 * EPOCHS
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train writes it when it has registered a checkpoint


def _cfg(**overrides) -> LoraConfig:
    base = dict(rank=4, alpha=4, resolution=64, epochs=EPOCHS, batch_size=4, lr=1e-3, mixed_precision="no",
                num_workers=2, checkpoint_every_steps=2, max_failures=1, validation_images=1, validation_steps=2,
                validation_every_epochs=4)
    return LoraConfig(**{**base, **overrides})


def _ranks(store) -> list[dict]:
    return [json.loads(store.read_text(layout.lora.rank(FOLD, r))) for r in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory):
    """One uninterrupted 2-worker run on a local store (the reference for the resume test)."""
    root = tmp_path_factory.mktemp("ray-local")
    store = open_store(str(root / "store"))
    examples = make_examples(store)
    # MLflow + TensorBoard on (checked by test_lora_fold_logs_its_loss_curve_from_rank_zero_only): tracking
    # changes nothing in training, so this run stays the resume test's reference.
    tracking = Tracking(mlflow_uri=(root / "mlruns").as_uri(), experiment="lora-test", tensorboard=True)
    start(tracking)
    result = train_fold(store, FOLD, examples, _cfg(), SEED, root / "cache", run_name="ref", tracking=tracking)
    return store, examples, result, root


def test_ddp_ranks_disjoint_and_identical(uninterrupted):
    store, examples, result, _ = uninterrupted
    assert result.error is None
    ranks = _ranks(store)
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["resumed_from_step"] for r in ranks] == [0, 0]
    assert ranks[0]["lora_digest"] == ranks[1]["lora_digest"]  # DDP kept the replicas in sync
    # The frozen encodings were made once, half by each rank, and shared through the store.
    assert [r["examples_encoded"] for r in ranks] == [4, 4]
    shards = [k for k in store.list(f"{layout.lora.fold(FOLD)}/latents") if k.endswith(".pt")]
    assert [k.rsplit("/", 1)[1] for k in shards] == ["rank=0-of-2.pt", "rank=1-of-2.pt"]
    steps0, steps1 = dict((s, ids) for s, ids in ranks[0]["steps"]), dict((s, ids) for s, ids in ranks[1]["steps"])
    assert sorted(steps0) == sorted(steps1) == list(range(STEPS))
    for epoch in range(EPOCHS):  # within an epoch the ranks saw disjoint images, together all 8
        seen0 = [i for s in (2 * epoch, 2 * epoch + 1) for i in steps0[s]]
        seen1 = [i for s in (2 * epoch, 2 * epoch + 1) for i in steps1[s]]
        assert not set(seen0) & set(seen1)
        assert sorted(seen0 + seen1) == sorted(e.image_id for e in examples)
    log = store.read_table(layout.lora.train_log(FOLD)).to_pylist()
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert store.exists(layout.lora.adapter(FOLD))
    assert store.list(layout.lora.validation_epoch(FOLD, EPOCHS - 1))  # validation images after the last epoch
    assert any(k.endswith("lora.safetensors") for k in store.list(layout.lora.ray_run("ref")))  # checkpoints


def test_lora_fold_logs_its_loss_curve_from_rank_zero_only(uninterrupted, monkeypatch):
    from mlflow.tracking import MlflowClient

    store, _, result, root = uninterrupted
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when opted in
    client = MlflowClient((root / "mlruns").as_uri())
    exp = client.get_experiment_by_name("lora-test")
    [run] = client.search_runs([exp.experiment_id], filter_string="tags.`t2id.stage` = 'lora'")  # rank 1: nothing
    assert run.info.run_name == f"lora fold={FOLD}" and run.data.tags["fold"] == str(FOLD)
    log = store.read_table(layout.lora.train_log(FOLD)).to_pylist()
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in log]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lr")] == pytest.approx([r["lr"] for r in log])
    assert [k for k in store.list(layout.tensorboard("lora", f"fold={FOLD}")) if "tfevents" in k]


def _ray_train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes of this test's Ray (descendants of this process, so never those
    of another Ray on the same machine); Ray titles them 'ray::RayTrainWorker...'."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # exited meanwhile
            continue
    return found


def kill_a_worker_after_first_checkpoint(store, run_name: str, killed: list[int], stop: threading.Event) -> None:
    """Real fault injection: once Ray Train has registered a checkpoint of `run_name` (its snapshot is in
    the store), SIGKILL one Ray Train worker process, as a preempted node would lose it. Each later
    report waits for the controller's poll (about 2 s), so the run is still going when the kill lands."""
    snapshot = f"{layout.lora.ray_run(run_name)}/{SNAPSHOT}"
    while not stop.is_set():  # until the training call returns: never a later test's workers
        if store.exists(snapshot):
            workers = _ray_train_workers()
            if workers:
                workers[-1].kill()
                killed.append(workers[-1].pid)
                return
        stop.wait(0.05)


def test_killed_worker_resumes_on_s3_and_matches(uninterrupted, s3_bucket, s3_server, tmp_path):
    ref_store, examples, _, ref_root = uninterrupted
    store = open_store(f"s3://{s3_bucket}/runs/r1", endpoint_url=s3_server)
    for e in examples:  # same images in the S3 run store
        store.write_bytes(e.key, ref_store.read_bytes(e.key))
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_a_worker_after_first_checkpoint, args=(store, "killed", killed, stop),
                              daemon=True)
    killer.start()
    try:
        result = train_fold(store, FOLD, examples, _cfg(validation_images=0), SEED, ref_root / "cache",
                            run_name="killed")
    finally:
        stop.set()
        killer.join()
    assert result.error is None
    assert len(killed) == 1  # a worker process was killed mid-run (the resume below shows it mattered)
    ranks = _ranks(store)
    # The restarted group resumed from a registered checkpoint, not from scratch.
    resumed = ranks[0]["resumed_from_step"]
    assert 0 < resumed < STEPS and resumed % 2 == 0 and ranks[1]["resumed_from_step"] == resumed
    assert [s for s, _ in ranks[1]["steps"]] == list(range(resumed, STEPS))
    assert ranks[0]["lora_digest"] == ranks[1]["lora_digest"]
    assert any(k.endswith("trainer.pt") for k in store.list(layout.lora.ray_run("killed")))
    # Resumed = not stopped: same adapter weights (same data order, RNG from (seed, rank, step)).
    ref = load_file(ref_store.uri(layout.lora.adapter(FOLD)))
    got_path = tmp_path / layout.lora.adapter_file
    store.read_file(layout.lora.adapter(FOLD), got_path)
    got = load_file(str(got_path))
    assert ref.keys() == got.keys() and len(ref) > 0
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-5)
    log = store.read_table(layout.lora.train_log(FOLD)).to_pylist()
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))  # the log survived the restart


def test_text_encoder_lora_under_ddp(ray_local, tmp_path):
    """lora.train_text_encoder with 2 workers: the encoders' LoRA gradients are averaged over ranks, so
    both ranks end with the same UNet and text-encoder weights (the digest covers all three)."""
    store = open_store(str(tmp_path / "store"))
    examples = make_examples(store)
    cfg = _cfg(train_text_encoder=True, epochs=1, validation_images=0)
    result = train_fold(store, FOLD, examples, cfg, SEED, tmp_path / "cache", run_name="te")
    assert result.error is None
    ranks = _ranks(store)
    assert ranks[0]["lora_digest"] == ranks[1]["lora_digest"]
    assert any(k.endswith("lora_text_encoder_2.safetensors") for k in store.list(layout.lora.ray_run("te")))
    adapter = load_file(store.uri(layout.lora.adapter(FOLD)))
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in adapter), prefix
    assert any(v.abs().max() > 0 for k, v in adapter.items() if k.startswith("text_encoder_2.") and ".up." in k)


def _run_with_one_fold(tmp_path) -> object:
    """A run store holding data + split outputs (for tests/test_generators.py and tests/test_ddpm.py): 8 images of the target classes in fold 1 (fold 0's
    TRAIN part), 2 others in fold 0."""
    store = open_store(str(tmp_path / "store"))
    names = ["thyroid cartilage", "cricoid cartilage", "tracheal ring", "strap muscle", "thyroid lobe", "vocal fold"]
    store.write_text(layout.data.classes, json.dumps({"names": names}))
    rows, folds = [], []
    for i, example in enumerate(make_examples(store, n=10)):
        fold = 0 if i >= 8 else 1
        cls = 2 if example.class_name == "tracheal ring" else 5
        rows.append({"image_id": example.image_id, "uri": store.uri(example.key), "width": 88, "height": 72,
                     "group": f"s{fold}", "source": "real", "sha256": example.sha256,
                     "boxes": [{"class_id": cls, "x": .5, "y": .5, "w": .2, "h": .2}]})
        folds.append({"image_id": example.image_id, "fold": fold, "group": f"s{fold}"})
    store.write_table(layout.data.manifest, pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA))
    store.write_table(layout.split.folds, pa.Table.from_pylist(folds, schema=FOLDS_SCHEMA))
    return store
