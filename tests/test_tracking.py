"""Experiment tracking (run.tracking): off by default; on, a real tiny grid (phantom data, one detector trial
through Ray Tune) and the report land in a real MLflow file store and TensorBoard event files (a LoRA fold trained
by two Ray Train workers leaves one run with its loss curve: tests/test_lora_ray.py, on that module's 2-worker
run). Tracking never changes a stage's hash."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from t2id import layout
from t2id.config import validate_config
from t2id.errors import ConfigError, UserError
from t2id.runner import load_stages, run_pipeline, run_store, settings_hash
from t2id.tracking import Tracking, resolve, start

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EPOCHS = 2


def _config(tmp_path, **tracking):
    return validate_config({
        "run": {"id": "t", "stages": ["data", "split", "grid", "report"], "tracking": tracking},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "data": {"source": "phantom", "phantom": {"subjects": 4, "frames_per_subject": 6, "size": 64, "seed": 0}},
        "split": {"folds": 2},
        "grid": {"folds": [0], "strategies": ["baseline"], "seed": 0, "max_retries": 0,
                 "detector": {"model": "yolov8n.yaml", "imgsz": 64, "epochs": EPOCHS, "batch": 8,
                              "warmup_epochs": 0, "nominal_batch": 8, "validate_every_epoch": True}},
        "cluster": {"num_cpus": 2},
    })


def _client(uri: str, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when opted in
    return MlflowClient(uri)


def _runs(client: MlflowClient, experiment: str, stage: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`t2id.stage` = '{stage}'")


def test_config_defaults_off_and_uris_checked(tmp_path):
    assert resolve(_config(tmp_path)) is None
    t = resolve(_config(tmp_path, mlflow=True))
    assert t == Tracking(mlflow_uri=(tmp_path / "store" / "t" / layout.MLRUNS).as_uri(), experiment="t",
                         tensorboard=False)
    s3 = validate_config({"run": {"tracking": {"mlflow": True, "experiment": "e"}},
                          "store": {"uri": "s3://b/p", "cache_dir": str(tmp_path / "c")}})
    assert resolve(s3).mlflow_uri == (tmp_path / "c" / layout.MLRUNS).as_uri()  # a file store can't live on S3
    assert resolve(s3).experiment == "e"
    for bad in ("mlruns", "ftp://host/x"):
        with pytest.raises(ConfigError, match=r"run\.tracking\.tracking_uri: use http\(s\)://") as err:
            validate_config({"run": {"tracking": {"mlflow": True, "tracking_uri": bad}}})
        assert len(str(err.value).splitlines()) == 1


def test_tracking_is_in_no_stage_settings_hash(tmp_path):
    off, on = _config(tmp_path), _config(tmp_path, mlflow=True, tensorboard=True, experiment="x",
                                         tracking_uri="http://127.0.0.1:5000")
    for name, stage in load_stages().items():
        assert settings_hash(stage.settings(off)) == settings_hash(stage.settings(on)), name


def test_an_unreachable_server_is_a_one_line_user_error_in_seconds():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=rf"run\.tracking\.tracking_uri http://127\.0\.0\.1:{port}: MLflow cannot") \
            as err:
        start(Tracking(mlflow_uri=f"http://127.0.0.1:{port}", experiment="x", tensorboard=False))
    assert time.perf_counter() - t0 < 30
    assert len(str(err.value).splitlines()) == 1


def test_grid_and_report_runs_in_mlflow_and_tensorboard(ray_local, tmp_path, monkeypatch):
    store = run_store(_config(tmp_path))
    # 1. Off by default: the whole pipeline writes no MLflow store and no TensorBoard files.
    run_pipeline(_config(tmp_path))
    assert not (tmp_path / "store" / "t" / layout.MLRUNS).exists()
    assert not (tmp_path / "cache" / layout.MLRUNS).exists()
    assert not [k for k in store.list("") if "/logs/tensorboard/" in k]

    # 2. Turning tracking on changes no stage's identity: everything is skipped ...
    cfg = _config(tmp_path, mlflow=True, tensorboard=True)
    assert {o.status for o in run_pipeline(cfg)} == {"skipped"}
    # ... and a forced grid (and the report after it) is tracked.
    outcomes = run_pipeline(cfg, force="grid")
    assert [(o.stage, o.status) for o in outcomes][-2:] == [("grid", "ran"), ("report", "ran")]

    uri = resolve(cfg).mlflow_uri
    client = _client(uri, monkeypatch)
    [trial_run] = _runs(client, "t", "grid")
    trial = layout.grid.trial_name(0, "baseline", 0)
    assert trial_run.info.run_name == trial and trial_run.info.status == "FINISHED"
    assert {k: trial_run.data.tags[k] for k in ("fold", "strategy", "seed")} == {"fold": "0", "strategy": "baseline",
                                                                                 "seed": "0"}
    assert trial_run.data.params["detector/imgsz"] == "64"
    run_id = trial_run.info.run_id
    for metric in ("train/box_loss", "metrics/mAP50-95B", "lr/pg0"):  # losses, validation, lr: every epoch
        assert [m.step for m in client.get_metric_history(run_id, metric)] == list(range(1, EPOCHS + 1)), metric
    trials = store.read_table(layout.grid.trials).to_pylist()
    overall = next(r for r in trials if r["class"] == "all classes")
    assert trial_run.data.metrics["final/map50_95"] == pytest.approx(overall["map50_95"])  # the published number
    [events] = [k for k in store.list(layout.tensorboard("grid", trial)) if "tfevents" in k]
    tb = scalars(store.read_bytes(events))
    assert [step for tag, step, _ in tb if tag == "train/box_loss"] == list(range(1, EPOCHS + 1))

    [report_run] = _runs(client, "t", "report")
    assert report_run.info.run_name == "report" and report_run.info.status == "FINISHED"
    assert report_run.data.metrics["table_ii/baseline/all classes"] == pytest.approx(overall["map50_95"])
    assert report_run.data.metrics["table_ii_n/baseline/all classes"] == 1
    artifacts = {f.path for f in client.list_artifacts(report_run.info.run_id)}
    assert {"index.html", "report.md", "figures", "tables"} <= artifacts
    html = client.download_artifacts(report_run.info.run_id, "index.html", str(tmp_path / "dl"))
    assert open(html, encoding="utf-8").read() == store.read_text(layout.report.index_html)


def test_tensorboard_alone_uploads_its_event_files_to_an_s3_store(s3_bucket, s3_server):
    from t2id.store import open_store
    from t2id.tracking import unit_run

    store = open_store(f"s3://{s3_bucket}/runs/t", endpoint_url=s3_server)
    with unit_run(Tracking(mlflow_uri=None, experiment="x", tensorboard=True), store, "grid", "u", {}) as log:
        log.log({"metrics/mAP50-95(B)": 0.5, "skipped": float("nan")}, step=1)
    [key] = store.list(layout.tensorboard("grid", "u"))
    assert "tfevents" in key
    assert scalars(store.read_bytes(key)) == [("metrics/mAP50-95B", 1, 0.5)]  # NaN (nothing measured) left out


def scalars(data: bytes) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        out += [(v.tag, event.step, pytest.approx(v.simple_value)) for v in event.summary.value]
    return out
