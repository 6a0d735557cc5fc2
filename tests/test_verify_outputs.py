"""Markers and memos re-check their outputs before a skip (issue 18, item 2).

A done stage is skipped only when every output in its marker still exists with its recorded size,
and (small files always, all with `verify`) its recorded sha256; a damaged output is named in a
warning, deleted, and the stage redone. Real stores (local folder and the S3 test server), the real
data and split stages on the phantom, and the real lora stage (tiny SDXL on a local Ray) for the
issue's "--force lora keeps a truncated adapter" claim.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from t2id import layout
from t2id.config import validate_config
from t2id.configbase import StageSettings
from t2id.data.phantom import write_phantom
from t2id.data.stage import STAGE as DATA_STAGE
from t2id.events import LogEvents
from t2id.resume import SMALL_FILE, Memo, check_outputs, memoized
from t2id.runner import Stage, StageResult, read_marker, run_pipeline, run_store
from t2id.split.stage import STAGE as SPLIT_STAGE
from t2id.errors import UserError
from t2id.store import LocalStore

BIG = SMALL_FILE + 4096  # above the always-hash threshold: sized on every check, hashed with --verify


class Settings(StageSettings):
    value: int


class Recorded(LogEvents):
    """Events that keep the warnings and the stages started."""

    def __init__(self):
        self.warnings: list[str] = []
        self.calls: list[str] = []

    def warning(self, message):
        self.warnings.append(message)

    def stage_started(self, stage):
        self.calls.append(stage)


def payload(n: int, seed: int = 0) -> bytes:
    return hashlib.sha256(f"{seed}".encode()).digest() * (n // 32) + b"x" * (n % 32)


def fake_stages():
    """'data' writes one small and one big file; 'split' reads data and writes one small file."""

    def data(ctx, s) -> StageResult:
        return StageResult(outputs={"data/small.json": ctx.store.write_bytes("data/small.json", b'{"a": 1}'),
                                    "data/big.bin": ctx.store.write_bytes("data/big.bin", payload(BIG))})

    def split(ctx, s) -> StageResult:
        return StageResult(outputs={"split/folds.json": ctx.store.write_bytes("split/folds.json", b"[0, 1]")})

    return {"data": Stage("data", lambda cfg: Settings(value=1), (), data),
            "split": Stage("split", lambda cfg: Settings(value=2), ("data",), split)}


@pytest.fixture(params=["local", "s3"])
def cfg(request, tmp_path):
    uri = str(tmp_path / "store") if request.param == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/x"
    return validate_config({"run": {"id": "r", "stages": ["data", "split"]},
                            "store": {"uri": uri, "cache_dir": str(tmp_path / "cache")}})


def overwrite(store, key: str, data: bytes, keep_metadata_sha: bool = False) -> None:
    """Damage an object from outside t2id: in place on disk, or a PUT by another S3 client (which
    records no sha256 metadata, or with `keep_metadata_sha`, the old one: a copy that kept it)."""
    if isinstance(store, LocalStore):
        store.path(key).write_bytes(data)
        return
    meta = {"sha256": store.sha256(key)} if keep_metadata_sha else {}
    store._client.put_object(Bucket=store.bucket, Key=store._key(key), Body=data, Metadata=meta)


def test_marker_records_sizes_beside_unchanged_outputs(cfg):
    run_pipeline(cfg, stages=fake_stages())
    store = run_store(cfg)
    marker = read_marker(store, "data")
    assert marker["outputs"] == {"data/big.bin": hashlib.sha256(payload(BIG)).hexdigest(),
                                 "data/small.json": hashlib.sha256(b'{"a": 1}').hexdigest()}
    assert marker["sizes"] == {"data/big.bin": BIG, "data/small.json": 8}


@pytest.mark.parametrize("damage, expected", [
    (lambda s: overwrite(s, "data/big.bin", payload(BIG)[:1000]), f"changed (size 1000 != recorded {BIG})"),
    (lambda s: s.delete("data/big.bin"), "is missing"),
    (lambda s: overwrite(s, "data/small.json", b'{"a": 2}'), "changed (sha256 "),  # same size: the hash says
])
def test_damaged_output_is_named_deleted_and_redone(cfg, damage, expected):
    stages = fake_stages()
    run_pipeline(cfg, stages=stages)
    store = run_store(cfg)
    damage(store)
    events = Recorded()
    outcomes = run_pipeline(cfg, stages=stages, events=events)
    assert [o.status for o in outcomes] == ["ran", "skipped"]  # same bytes again: split's input is unchanged
    assert len(events.warnings) == 1 and events.warnings[0].startswith("data: output data/")
    assert expected in events.warnings[0] and events.warnings[0].endswith("; redoing")
    assert store.read_bytes("data/big.bin") == payload(BIG) and store.read_bytes("data/small.json") == b'{"a": 1}'
    assert [o.status for o in run_pipeline(cfg, stages=stages)] == ["skipped", "skipped"]


def test_same_size_change_of_a_big_file_needs_verify(cfg):
    stages = fake_stages()
    run_pipeline(cfg, stages=stages)
    store = run_store(cfg)
    overwrite(store, "data/big.bin", payload(BIG, seed=1), keep_metadata_sha=True)
    assert [o.status for o in run_pipeline(cfg, stages=stages)] == ["skipped", "skipped"]  # sized only
    events = Recorded()
    assert [o.status for o in run_pipeline(cfg, stages=stages, events=events, verify=True)] == ["ran", "skipped"]
    assert "data: output data/big.bin changed (sha256 " in events.warnings[0]
    assert store.read_bytes("data/big.bin") == payload(BIG)


def test_markers_without_sizes_are_hashed(cfg):
    """A marker written before sizes were recorded: every output is hashed, none trusted unchecked."""
    stages = fake_stages()
    run_pipeline(cfg, stages=stages)
    store = run_store(cfg)
    marker = read_marker(store, "data")
    del marker["sizes"]
    store.write_text(layout.marker("data"), json.dumps(marker))
    assert [o.status for o in run_pipeline(cfg, stages=stages)] == ["skipped", "skipped"]
    overwrite(store, "data/big.bin", payload(BIG, seed=2))
    assert [o.status for o in run_pipeline(cfg, stages=stages)] == ["ran", "skipped"]


def test_only_refuses_to_read_a_damaged_upstream(cfg):
    stages = fake_stages()
    run_pipeline(cfg, stages=stages)
    store = run_store(cfg)
    store.delete("data/small.json")
    with pytest.raises(Exception, match=r"stage 'split' reads stage 'data', whose output data/small.json is "
                                        r"missing: redo it first with `t2id run CONFIG --only data`"):
        run_pipeline(cfg, only="split", force="split", stages=stages)


def test_memo_records_sizes_and_redoes_a_damaged_unit(store):
    runs = []

    def produce():
        runs.append(1)
        store.write_bytes("unit/a.bin", payload(BIG))
        store.write_bytes("unit/b.json", b"{}")
        return ["unit/a.bin", "unit/b.json"]

    memo = Memo(store, layout.memo("unit"), {"v": 1})
    first, reused = memoized(memo, produce)
    assert not reused and first["sizes"] == {"unit/a.bin": BIG, "unit/b.json": 2}
    assert memoized(memo, produce)[1] is True
    overwrite(store, "unit/a.bin", payload(BIG)[:-1])  # truncated by one byte
    assert not memo.done()
    assert check_outputs(store, first["outputs"], first["sizes"])[0].problem == f"changed (size {BIG - 1} != recorded {BIG})"
    assert memoized(memo, produce)[1] is False and len(runs) == 2
    assert store.read_bytes("unit/a.bin") == payload(BIG)


# The real data and split stages on the phantom (a local store and the S3 test server).

@pytest.fixture(params=["local", "s3"])
def phantom_cfg(request, tmp_path):
    src = write_phantom(tmp_path / "ph", subjects=4, frames_per_subject=2, size=48)
    uri = str(tmp_path / "store") if request.param == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/x"
    return validate_config({"run": {"id": "r", "stages": ["data", "split"]},
                            "store": {"uri": uri, "cache_dir": str(tmp_path / "cache")},
                            "data": {"source": str(src)}, "split": {"folds": 2}})


REAL = {"data": DATA_STAGE, "split": SPLIT_STAGE}


def _image_keys(store):
    return [store.key_of(u) for u in store.read_table(layout.data.manifest)["uri"].to_pylist()]


@pytest.mark.parametrize("fault", ["delete image", "truncate image", "truncate manifest", "truncate folds"])
def test_real_stages_catch_and_repair_damage(phantom_cfg, fault):
    run_pipeline(phantom_cfg, stages=REAL)
    store = run_store(phantom_cfg)
    image = _image_keys(store)[0]
    image_sha = store.sha256(image)
    assert image in read_marker(store, "data")["outputs"]  # the data stage lists the images it imported
    key = {"delete image": image, "truncate image": image, "truncate manifest": layout.data.manifest,
           "truncate folds": layout.split.folds}[fault]
    if fault == "delete image":
        store.delete(key)
    else:
        overwrite(store, key, store.read_bytes(key)[:-7])
    events = Recorded()
    outcomes = run_pipeline(phantom_cfg, stages=REAL, events=events)
    redone = "split" if fault == "truncate folds" else "data"
    assert events.calls == [redone] and [o.stage for o in outcomes if o.status == "ran"] == [redone]
    assert events.warnings == [events.warnings[0]] and events.warnings[0].startswith(f"{redone}: output {key} ")
    assert store.sha256(image) == image_sha and hashlib.sha256(store.read_bytes(image)).hexdigest() == image_sha
    marker = read_marker(store, redone)
    assert all(store.sha256(k) == v for k, v in marker["outputs"].items())
    assert [o.status for o in run_pipeline(phantom_cfg, stages=REAL)] == ["skipped", "skipped"]


# The real lora stage: a truncated adapter, then `--force lora` (and a plain rerun).

@pytest.fixture(scope="module")
def lora_run(lora_cli_run, ray_local, torch_one_thread):
    """The store of a real `t2id run` of data, split and lora (tests/conftest.py); reruns here are in-process."""
    from t2id.config import load_config
    from t2id.lora.stage import STAGE as LORA_STAGE

    assert lora_cli_run.res.returncode == 0, lora_cli_run.res.stderr
    cfg = load_config(lora_cli_run.config)
    stages = {**REAL, "lora": LORA_STAGE}
    first = read_marker(run_store(cfg), "lora")
    return cfg, stages, first


def test_lora_stage_reuses_a_trained_fold_through_its_memo(lora_run):
    """The fold memo: the same settings and examples reuse the fold without training; the training settings
    and run.seed are the fold's identity, the list of folds to train is not. (Runs before the truncation
    tests below, which retrain the same store.)"""
    from t2id.data.manifest import load_classes
    from t2id.lora.stage import STAGE as LORA_STAGE
    from t2id.lora.stage import fold_examples, fold_memo, fold_seed
    from t2id.lora.train import make_schedule
    from t2id.runner import StageContext

    cfg, _, first = lora_run
    store = run_store(cfg)
    s = LORA_STAGE.settings(cfg)

    def ctx() -> StageContext:
        return StageContext(store=store, stage="lora", cache_dir=cfg.store.cache_dir)

    def examples(settings):
        return fold_examples(store, 0, load_classes(store), [(c.name, c.prompts) for c in settings.lora.target_classes])

    fold0 = first["summary"]["folds"]["0"]
    n = len(examples(s))
    assert n > 0 and (fold0["reused"], fold0["images"]) == (False, n)
    assert fold0["steps"] == make_schedule(n, s.lora, 1).total_steps
    memo = json.loads(store.read_text(layout.memo(layout.lora.fold(0))))
    assert set(memo["outputs"]) == {layout.lora.adapter(0), layout.lora.train_ids(0), layout.lora.train_log(0)}
    outputs = set(read_marker(store, "lora")["outputs"])
    assert layout.lora.adapter(0) in outputs and layout.memo(layout.lora.fold(0)) not in outputs

    again = LORA_STAGE.run(ctx(), s)  # the stage itself, not the runner (whose marker would skip it)
    assert again.summary["folds"]["0"]["reused"] is True and set(again.outputs) == outputs

    def done(settings) -> bool:
        seed = fold_seed(settings.run_seed, 0, settings.lora.seed)
        return fold_memo(ctx(), settings, 0, seed, examples(settings)).done()

    assert done(s)
    assert not done(s.model_copy(update={"lora": s.lora.model_copy(update={"lr": 2e-3})}))
    assert not done(s.model_copy(update={"run_seed": s.run_seed + 1}))  # run.seed derives the fold's training seed
    assert done(s.model_copy(update={"lora": s.lora.model_copy(update={"folds": [0, 1]})}))  # not the fold's identity


def _truncate_adapter(store) -> tuple[str, int]:
    key = layout.lora.adapter(0)
    path = store.path(key)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    return key, size


@pytest.mark.slow
def test_force_lora_rewrites_a_truncated_adapter(lora_run):
    """Issue 18: "--force lora reuses a fold with a truncated adapter and records the corrupt file's
    hash". On this code the fold memo checks its outputs and --force ignores it: the fold is retrained."""
    cfg, stages, _ = lora_run
    store = run_store(cfg)
    trained = hashlib.sha256(store.read_bytes(layout.lora.adapter(0))).hexdigest()
    key, size = _truncate_adapter(store)
    events = Recorded()
    outcomes = {o.stage: o for o in run_pipeline(cfg, stages=stages, force="lora", events=events)}
    assert outcomes["lora"].status == "ran" and outcomes["lora"].summary["folds"]["0"]["reused"] is False
    # trained from scratch, not restored from Ray's last checkpoint, and deterministic: the same adapter again
    assert json.loads(store.read_text(layout.lora.rank(0, 0)))["resumed_from_step"] == 0
    assert store.size(key) == size and hashlib.sha256(store.read_bytes(key)).hexdigest() == trained
    marker = read_marker(store, "lora")
    assert marker["outputs"][key] == hashlib.sha256(store.read_bytes(key)).hexdigest()
    assert marker["sizes"][key] == size
    memo = json.loads(store.read_text(layout.memo(layout.lora.fold(0))))
    assert memo["outputs"][key] == marker["outputs"][key]


@pytest.mark.slow
def test_plain_rerun_catches_a_truncated_adapter(lora_run):
    cfg, stages, _ = lora_run
    store = run_store(cfg)
    key, size = _truncate_adapter(store)
    events = Recorded()
    outcomes = {o.stage: o for o in run_pipeline(cfg, stages=stages, events=events)}
    assert [w for w in events.warnings if w.startswith("lora:")] == [
        f"lora: output {key} changed (size {size // 2} != recorded {size}); redoing"]
    assert outcomes["lora"].status == "ran" and outcomes["lora"].summary["folds"]["0"]["reused"] is False
    assert read_marker(store, "lora")["outputs"][key] == hashlib.sha256(store.read_bytes(key)).hexdigest()
    assert [o.status for o in run_pipeline(cfg, stages=stages)] == ["skipped"] * 3



# A run folder moves between a disk and S3 (issue 18, item 6): manifests reference images by their key
# relative to the run root, so the copy resolves in its new store and resumes without redoing anything.

def test_a_run_folder_copied_from_disk_to_s3_resumes_there(tmp_path, s3_bucket):
    from t2id.data.materialize import materialize_fold

    src = write_phantom(tmp_path / "ph", subjects=4, frames_per_subject=2, size=48)
    raw = {"run": {"id": "r", "stages": ["data", "split"]},
           "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
           "data": {"source": str(src)}, "split": {"folds": 2}}
    local_cfg = validate_config(raw)
    run_pipeline(local_cfg, stages=REAL)
    local = run_store(local_cfg)
    uris = local.read_table(layout.data.manifest)["uri"].to_pylist()
    assert uris and all(u.startswith(f"{layout.data.images}/") for u in uris)  # no absolute path in the manifest

    s3_cfg = validate_config({**raw, "store": {"uri": f"s3://{s3_bucket}/moved", "cache_dir": str(tmp_path / "c2")}})
    moved = run_store(s3_cfg)
    for key in local.list():  # what `aws s3 cp --recursive <run folder> s3://...` does
        moved.write_bytes(key, local.read_bytes(key))
    events = Recorded()
    assert [o.status for o in run_pipeline(s3_cfg, stages=REAL, events=events)] == ["skipped", "skipped"]
    assert events.calls == [] and events.warnings == []
    dataset = materialize_fold(moved, 0, tmp_path / "c2")  # every image resolves in the new store
    built = {p.stem: p.read_bytes() for p in (dataset.root / "images").rglob("*.png")}
    rows = moved.read_table(layout.data.manifest).select(["image_id", "uri"]).to_pylist()
    assert len(built) == len(rows) == len(uris)
    assert all(built[r["image_id"]] == moved.read_bytes(moved.key_of(r["uri"])) for r in rows)


def test_manifest_uris_resolve_relative_and_legacy_absolute(store):
    assert store.key_of(store.ref("data/images/a.png")) == "data/images/a.png"
    assert store.key_of(store.uri("data/images/a.png")) == "data/images/a.png"  # manifests from older runs
    for bad in ("../other-run/data/images/a.png", "data/../../x.png", "s3://elsewhere/r/data/images/a.png"):
        with pytest.raises(UserError):
            store.key_of(bad)
