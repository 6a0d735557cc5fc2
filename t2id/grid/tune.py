"""The thin Ray Tune layer of the grid: one Tune trial per (fold, strategy), resumable from the store.

The trial's work is a plain function `train_fn(trial: dict) -> dict` (the grid stage passes one that
trains a detector through `t2id.detect.train.detect_on_store`; tests pass small pure functions).
Tune adds what the grid needs around it:
  - a grid (`tune.grid_search`) over the trial list, FIFO order, no early stopping (every trial
    trains its full schedule, as the paper's Table II compares finished trainings);
  - per-trial resources (`tune.with_resources`: CPUs for data loading, a GPU fraction so several
    small trainings share one GPU) and a cap on concurrent trials;
  - retries of errored trials (`FailureConfig(max_failures=...)`);
  - results and experiment state under the run's store (`RunConfig(storage_path=...)`, local or S3),
    so a driver killed mid-grid resumes with `Tuner.restore(..., resume_errored=True)`: Tune does
    not rerun trials it recorded as finished.
Two layers keep finished work from being redone even where Tune's own state lags (its experiment
state is synced every few seconds, so a kill can land between a trial's end and the next sync):
every trial publishes its result to `result_key` in the store before it reports, and a trial whose
result is already there reports it without training again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from t2id.errors import UserError
from t2id.store import S3Store, Store

TrainFn = Callable[[dict[str, Any]], dict[str, Any]]
EXPERIMENT = "tune"  # experiment folder: <run>/grid/tune
SPEC_KEY = "tune_spec.json"  # beside the experiment: the trial list it was started with


@dataclass(frozen=True)
class TuneSettings:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0: as many as the resources allow
    max_retries: int = 1
    verbose: int = 1


@dataclass
class TuneOutcome:
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial name -> train_fn output
    errors: dict[str, str] = field(default_factory=dict)  # trial name -> error text
    restored: bool = False  # True when an interrupted experiment was resumed


def _trial_name(trial: dict[str, Any]) -> str:
    return str(trial["name"])


def grid_trainable(config: dict[str, Any], train_fn: TrainFn, store: Store) -> None:
    """Tune function trainable: train one trial (or reuse its published result) and report once.

    The metrics reported here are the only ones in the trial's Tune results; ultralytics' own Ray
    Tune callback (which reports every epoch when it sees a Tune session) is kept out by the
    detector trainer, and `t2id_trial` marks a report as ours.
    """
    from ray import tune

    trial = config["trial"]
    key = trial["result_key"]
    if store.exists(key):
        output = json.loads(store.read_text(key))
    else:
        output = train_fn(trial)
        store.write_text(key, json.dumps(output, sort_keys=True))
    overall = output.get("overall", {})
    tune.report({
        "t2id_trial": _trial_name(trial),
        "fold": trial["fold"],
        "strategy": trial["strategy"],
        "result_key": key,
        "map50_95": float(overall.get("map50_95", float("nan"))),
        "train_seconds": float(output.get("seconds", 0.0)),
    })


def experiment_location(store: Store, prefix: str = "grid") -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Tune's RunConfig under `<store>/<prefix>`.

    On S3 the filesystem carries the store's endpoint (MinIO, moto, ...), since pyarrow does not read
    AWS_ENDPOINT_URL by itself; the path is then bucket/key without the scheme, as Ray expects with a
    custom filesystem.
    """
    uri = store.uri(prefix)
    if isinstance(store, S3Store):
        from pyarrow import fs as pafs

        kwargs: dict[str, Any] = {}
        if store.endpoint_url:
            scheme, _, host = store.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = store.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return uri.removeprefix("s3://"), pafs.S3FileSystem(**kwargs)
    return uri, None


def spec_digest(trials: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(trials, sort_keys=True).encode()).hexdigest()


def run_trials(trials: list[dict[str, Any]], train_fn: TrainFn, store: Store, settings: TuneSettings,
               prefix: str = "grid") -> TuneOutcome:
    """Run every trial on Ray Tune (Ray must be initialized); resume an interrupted experiment.

    Each trial dict needs `name` (unique, folder-safe), `fold`, `strategy` and `result_key` (store key
    its output is published at); everything else is passed through to `train_fn`.
    """
    from ray import tune

    names = [_trial_name(t) for t in trials]
    if len(set(names)) != len(names):
        raise ValueError(f"trial names must be unique, got {names}")
    outcome = TuneOutcome()
    pending = [t for t in trials if not store.exists(t["result_key"])]
    if pending:
        storage_path, filesystem = experiment_location(store, prefix)
        exp_path = f"{storage_path.rstrip('/')}/{EXPERIMENT}"
        # Tune cannot resume an experiment whose search space changed: start afresh when the trial
        # list differs from the one the stored experiment began with (published results stay valid).
        digest = spec_digest(trials)
        spec_key = f"{prefix}/{SPEC_KEY}"
        same_spec = store.exists(spec_key) and json.loads(store.read_text(spec_key)).get("digest") == digest
        trainable = tune.with_resources(
            tune.with_parameters(grid_trainable, train_fn=train_fn, store=store),
            {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
        )
        param_space = {"trial": tune.grid_search(trials)}
        if same_spec and tune.Tuner.can_restore(exp_path, storage_filesystem=filesystem):
            # Finished trials are never rerun by restore. Errored ones are queued again; Tune keeps
            # their failure count, so a trial that used up max_retries gets one more attempt per resume.
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, param_space=param_space,
                                       storage_filesystem=filesystem)
            outcome.restored = True
        else:
            store.delete_prefix(f"{prefix}/{EXPERIMENT}")
            store.write_text(spec_key, json.dumps({"digest": digest, "trials": names}, indent=2))
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    num_samples=1,
                    max_concurrent_trials=settings.max_concurrent or None,
                    reuse_actors=True,  # a process per trial costs seconds of imports; trials share nothing
                    trial_name_creator=lambda t: _trial_name(t.config["trial"]),
                    trial_dirname_creator=lambda t: _trial_name(t.config["trial"]),
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=storage_path,
                    storage_filesystem=filesystem,
                    failure_config=tune.FailureConfig(max_failures=settings.max_retries),
                    verbose=settings.verbose,
                ),
            )
        grid = tuner.fit()
        for result in grid:
            name = _trial_name(result.config["trial"]) if result.config else "?"
            if result.error is not None:
                outcome.errors[name] = f"{type(result.error).__name__}: {result.error}".strip()
    for trial in trials:
        name = _trial_name(trial)
        if store.exists(trial["result_key"]):
            outcome.results[name] = json.loads(store.read_text(trial["result_key"]))
            outcome.errors.pop(name, None)
        elif name not in outcome.errors:
            outcome.errors[name] = "the trial ended without publishing a result"
    return outcome


def raise_on_errors(outcome: TuneOutcome, max_retries: int) -> None:
    if outcome.errors:
        first = next(iter(outcome.errors.items()))
        detail = first[1].strip().splitlines()[-1] if first[1].strip() else "unknown error"
        raise UserError(
            f"grid: {len(outcome.errors)} trial(s) failed after {max_retries} retries "
            f"({', '.join(sorted(outcome.errors))}); first: {first[0]}: {detail[:300]}. "
            "Fix the cause and rerun `t2id run CONFIG`: finished trials are kept, failed ones retried."
        )


def experiment_status(store: Store, prefix: str = "grid") -> dict[str, str]:
    """Trial name -> Tune status (PENDING/RUNNING/TERMINATED/ERROR) from the newest stored experiment state."""
    states = sorted(k for k in store.list(f"{prefix}/{EXPERIMENT}")
                    if k.rsplit("/", 1)[-1].startswith("experiment_state-") and k.endswith(".json"))
    if not states:
        return {}
    status = {}
    for trial_json, _runner in json.loads(store.read_text(states[-1]))["trial_data"]:
        trial = json.loads(trial_json)
        status[_trial_name(trial["config"]["trial"])] = trial["status"]
    return status
