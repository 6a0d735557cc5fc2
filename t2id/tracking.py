"""Experiment tracking: MLflow runs (and TensorBoard event files) for LoRA, the detector grid and the report.

Config: `run.tracking` (TrackingConfig below), off by default. Everything goes into one MLflow experiment
per t2id run (default name: run.id):
  lora    a run per fold, "lora fold=<k>" (tags t2id.stage, fold): loss and lr per optimizer step, logged by
          Ray Train's rank 0 worker (ray.air.integrations.mlflow.setup_mlflow);
  grid    a run per trial, named like the trial (tags t2id.stage, fold, strategy, seed): ultralytics' training
          losses, learning rates and validation metrics per epoch, logged from inside the Tune trainable
          (setup_mlflow), then the trial's final metrics (the numbers the grid publishes);
  report  a run "report": Table II's cells (mean over folds x seeds) as metrics `table_ii/<strategy>/<class>`,
          the report's files (index.html, report.md, figures, tables) as artifacts.
TensorBoard (`run.tracking.tensorboard`): the same scalars, with tensorboardX, under
`<run>/<stage>/logs/tensorboard/<unit>/` (written in place for a local store; for S3 written to the local cache
and uploaded when the unit ends).

Tracking never changes what a stage produces, so it is in no stage's settings (nor its hash): the runner hands
it to the stages through `StageContext.tracking`. Tracking failures are never silent: a malformed URI is a
config error, an unusable one a UserError when a stage starts (`start`), and an error while logging fails the
unit like any other error.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from pydantic import Field, field_validator

from t2id import layout
from t2id.configbase import Section
from t2id.errors import UserError

if TYPE_CHECKING:
    from t2id.config import T2IDConfig
    from t2id.store import Store


class TrackingConfig(Section):
    mlflow: bool = Field(False, description="Log LoRA loss curves, each detector trial's metrics per epoch, "
                                            "Table II and the report to MLflow.")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI: http(s)://host:port of a tracking server (needed on a cluster: "
                          "Ray workers on other nodes log there), or an absolute path / file:// URI of a file "
                          "store. Default: <store.uri>/<run.id>/mlruns for a local store, "
                          "<store.cache_dir>/mlruns for an S3 store.")
    experiment: str | None = Field(None, description="MLflow experiment name. Default: run.id.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files under "
                                                 "<run>/<stage>/logs/tensorboard/.")

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_or_server(cls, value: str | None) -> str | None:
        if value is None:
            return value
        scheme = urlparse(value).scheme
        if scheme in {"http", "https"}:
            return value
        path = value.removeprefix("file://") if scheme == "file" else value
        if scheme not in {"", "file"} or not Path(path).expanduser().is_absolute():
            raise ValueError("use http(s)://host:port (an MLflow tracking server) or an absolute path / file:// "
                             "URI (Ray workers run in other folders, so a relative path would scatter the runs)")
        return value


@dataclass(frozen=True)
class Tracking:
    """Resolved tracking settings: what crosses into Ray workers (plain values, picklable)."""

    mlflow_uri: str | None  # None: MLflow off
    experiment: str
    tensorboard: bool


def resolve(cfg: T2IDConfig) -> Tracking | None:
    """The run's tracking settings with defaults filled in, or None when tracking is off."""
    t = cfg.run.tracking
    if not (t.mlflow or t.tensorboard):
        return None
    uri = None
    if t.mlflow:
        uri = t.tracking_uri
        if uri is None:
            # Beside the run in a local store; an S3 store cannot hold a file store, so the local cache does.
            local_store = "://" not in cfg.store.uri
            base = Path(cfg.store.uri) / cfg.run.id if local_store else Path(cfg.store.cache_dir)
            folder = base.expanduser().resolve() / layout.MLRUNS
            uri = folder.as_uri()
        elif "://" not in uri:
            uri = Path(uri).expanduser().as_uri()
    return Tracking(mlflow_uri=uri, experiment=t.experiment or cfg.run.id, tensorboard=t.tensorboard)


def _mlflow(uri: str) -> Any:
    """The mlflow module pointed at `uri`."""
    if uri.startswith("file:"):
        # MLflow 3 refuses file stores unless opted in; t2id's default store is one (no database server needed,
        # and mlflow-skinny has no SQL backend). Set before MLflow builds its store, in every process that logs.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow


def start(t: Tracking | None) -> None:
    """At the start of a tracked stage, on the driver: check that MLflow can use the URI and create the
    experiment (once, here, rather than racing in every worker). An unusable URI is a one-line UserError."""
    if t is None or t.mlflow_uri is None:
        return
    from mlflow.tracking import MlflowClient

    if t.mlflow_uri.startswith("file:") and _ray_nodes() > 1:
        raise UserError(f"run.tracking.tracking_uri {t.mlflow_uri} is a local folder, but Ray runs on "
                        f"{_ray_nodes()} nodes whose workers would each log to their own disk: set "
                        "run.tracking.tracking_uri to an http(s):// MLflow tracking server")
    _mlflow(t.mlflow_uri)
    # A server that is down should fail now, once, in seconds, not after MLflow's minutes of HTTP retries.
    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
        try:
            client = MlflowClient(t.mlflow_uri)
            experiment = client.get_experiment_by_name(t.experiment)
            if experiment is None:
                client.create_experiment(t.experiment)
            elif experiment.lifecycle_stage == "deleted":
                raise UserError(f"run.tracking.experiment {t.experiment!r} is deleted in MLflow at {t.mlflow_uri}: "
                                "restore it (mlflow experiments restore) or name another experiment")
        except UserError:
            raise
        except Exception as exc:  # MLflow raises many kinds (connection, permission, bad store); all are the URI's
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(f"run.tracking.tracking_uri {t.mlflow_uri}: MLflow cannot log there ({detail}); start "
                            "the tracking server or fix the URI, or set run.tracking.mlflow: false") from exc


def _ray_nodes() -> int:
    """Alive nodes of the Ray this process is connected to (0 when none)."""
    import ray

    return sum(node["Alive"] for node in ray.nodes()) if ray.is_initialized() else 0


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_BAD_CHARS = re.compile(r"[^\w./\- :]")  # MLflow's allowed metric-name characters; ultralytics uses "(B)"


def metric_name(name: str) -> str:
    return _BAD_CHARS.sub("", name)


class UnitLog:
    """Where one unit of work (a LoRA fold, a grid trial) logs scalars: its MLflow run and/or TensorBoard."""

    def __init__(self, mlflow: Any = None, writer: Any = None) -> None:
        self.mlflow = mlflow  # the mlflow module with this unit's run active, or None
        self.writer = writer  # a tensorboardX SummaryWriter, or None

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {metric_name(k): float(v) for k, v in metrics.items() if v is not None and float(v) == float(v)}
        if self.mlflow is not None and clean:
            self.mlflow.log_metrics(clean, step=step)
        if self.writer is not None:
            for key, value in clean.items():
                self.writer.add_scalar(key, value, step)


@contextlib.contextmanager
def unit_run(t: Tracking | None, store: Store, stage: str, name: str, tags: dict[str, Any],
             params: dict[str, Any] | None = None, run_name: str | None = None) -> Iterator[UnitLog]:
    """An MLflow run `run_name` (default `name`) and a TensorBoard folder `<stage>/logs/tensorboard/<name>` for
    one unit of work, inside a Ray Train worker or Tune trial; a no-op UnitLog when `t` is None. The run ends
    FINISHED, or FAILED when the body raises."""
    if t is None:
        yield UnitLog()
        return
    mlflow = None
    if t.mlflow_uri is not None:
        from ray.air.integrations.mlflow import setup_mlflow

        mlflow = _mlflow(t.mlflow_uri)
        if mlflow.active_run() is not None:  # a reused Tune actor: setup_mlflow would return the old run
            mlflow.end_run()
        # Ray's own MLflow setup: the experiment, a run named after the unit, params and tags. Only rank 0
        # of a Ray Train group calls this (the caller passes t=None elsewhere), so no noop module comes back.
        mlflow = setup_mlflow(params or {}, tracking_uri=t.mlflow_uri, experiment_name=t.experiment,
                              run_name=run_name or name, create_experiment_if_not_exists=True,
                              tags={"t2id.stage": stage, **{k: str(v) for k, v in tags.items()}})
    key = layout.tensorboard(stage, name)
    with _tensorboard_dir(t.tensorboard, store, key) as logdir:
        writer = None
        if logdir is not None:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(logdir=str(logdir), flush_secs=10)
        status = "FAILED"
        try:
            yield UnitLog(mlflow, writer)
            status = "FINISHED"
        finally:
            if writer is not None:
                writer.close()
            if mlflow is not None:
                mlflow.end_run(status=status)


@contextlib.contextmanager
def _tensorboard_dir(enabled: bool, store: Store, key: str) -> Iterator[Path | None]:
    """The folder a unit's event files go to: the store's own folder when it is local (TensorBoard can watch
    it live), else a local temporary folder whose files are uploaded to `key` at the end."""
    from t2id.store import LocalStore

    if not enabled:
        yield None
    elif isinstance(store, LocalStore):
        yield store.path(key)
    else:
        with tempfile.TemporaryDirectory(prefix="t2id-tb-") as tmp:
            try:
                yield Path(tmp)
            finally:
                for path in sorted(Path(tmp).rglob("*")):
                    if path.is_file():
                        store.write_file(f"{key}/{path.relative_to(tmp).as_posix()}", path)


# The grid's detector metrics come from inside ultralytics' trainer, several calls below the Tune trainable,
# through the trial function that tests replace (t2id.grid.ray_layer.TrialFn). Rather than thread a logger
# through those signatures, the trainable makes its trial's UnitLog current here, as MLflow itself keeps an
# "active run", and the detector trainer's epoch callback logs to whatever is current.
_current: ContextVar[UnitLog | None] = ContextVar("t2id_tracking_unit", default=None)


@contextlib.contextmanager
def current(log: UnitLog) -> Iterator[UnitLog]:
    token = _current.set(log)
    try:
        yield log
    finally:
        _current.reset(token)


def detector_epoch(trainer: Any) -> None:
    """ultralytics `on_fit_epoch_end` callback: the epoch's training losses, learning rates and (when this epoch
    validated) validation metrics, at step = epoch (1-based, as ultralytics' results.csv)."""
    log = _current.get()
    if log is None:
        return
    metrics = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **trainer.lr}
    # BaseTrainer validates when args.val, at the last epoch, or when stopping; otherwise trainer.metrics
    # still holds the previous (or initial, all-zero) values, which would read as real measurements.
    if trainer.args.val or trainer.epoch + 1 >= trainer.epochs or trainer.stop or trainer.stopper.possible_stop:
        metrics.update(trainer.metrics)
    log.log(metrics, step=trainer.epoch + 1)


def trial_run(t: Tracking | None, store: Store, trial: dict[str, Any], settings: Any
              ) -> contextlib.AbstractContextManager[UnitLog]:
    """A grid trial's run: named like the trial, tagged fold / strategy / seed; its params are the trial's
    strategy spec and detector settings (`settings`: the grid's GridSettings)."""
    params = {"fold": trial["fold"], "strategy": trial["strategy"], "seed": trial["seed"],
              "n_synthetic": trial.get("n_synthetic", 0),
              "spec": settings.grid.strategy_spec(trial["strategy"]).model_dump(mode="json"),
              "detector": settings.grid.detector.model_dump(mode="json")}
    return unit_run(t, store, "grid", trial["name"],
                    {"fold": trial["fold"], "strategy": trial["strategy"], "seed": trial["seed"]}, params)


def lora_run(t: Tracking | None, store: Store, fold: int, seed: int, resumed_from_step: int
             ) -> contextlib.AbstractContextManager[UnitLog]:
    """A LoRA fold's run, "lora fold=<k>". A worker group that Ray Train restarted resumes from its checkpoint
    in a new run (tag resumed_from_step), whose steps continue the fold's numbering."""
    return unit_run(t, store, "lora", f"fold={fold}", {"fold": fold, "resumed_from_step": resumed_from_step},
                    {"fold": fold, "seed": seed}, run_name=f"lora fold={fold}")


def log_trial_result(log: UnitLog, output: dict[str, Any], epochs: int) -> None:
    """The trial's published numbers (final model, COCO mAP from its stored predictions): `final/<metric>` overall,
    `final/<class>/<metric>` per class, at step = the last epoch."""
    overall = output.get("overall", {})
    # final/<class>/<metric>, not final/<metric>/<class>: a file store keeps a metric as a file, so one
    # name cannot also be another's folder.
    per_class = {f"final/{c}/{m}": v.get(m) for c, v in output.get("per_class", {}).items()
                 for m in (("map50_95", "map50") if "map50_95" in v else ("recall", "f1", "auc"))}  # detect / classify
    log.log({**{f"final/{m}": v for m, v in overall.items()}, **per_class,
             "final/train_seconds": output.get("seconds")}, step=epochs)


def log_report(t: Tracking | None, store: Store, stats: Any, metric: str, keys: list[str]) -> None:
    """The report's MLflow run "report": Table II's cells (`stats`, t2id.report.tables.summary_stats) as metrics
    `table_ii/<strategy>/<class>` (mean of the report's metric over folds x seeds, a fraction) and
    `table_ii_n/<strategy>/<class>` (trials per cell), and the report's files (`keys`) as artifacts."""
    if t is None or t.mlflow_uri is None:
        return
    mlflow = _mlflow(t.mlflow_uri)
    experiment = mlflow.get_experiment_by_name(t.experiment)
    metrics = {}
    for row in stats.to_dict("records"):
        cell = f"{row['strategy']}/{row['class']}"
        if row["mean"] == row["mean"]:  # NaN: no finished trial in that cell
            metrics[metric_name(f"table_ii/{cell}")] = float(row["mean"])
        metrics[metric_name(f"table_ii_n/{cell}")] = float(row["n"])
    with mlflow.start_run(run_name="report", experiment_id=experiment.experiment_id,
                          tags={"t2id.stage": "report", "metric": metric}), \
            tempfile.TemporaryDirectory(prefix="t2id-report-") as tmp:
        mlflow.log_metrics(metrics)
        prefix = f"{layout.report.root}/"
        for key in keys:  # copied out of the store (local or S3), keeping the report's own folder layout
            store.read_file(key, Path(tmp) / key.removeprefix(prefix))
        mlflow.log_artifacts(tmp)
