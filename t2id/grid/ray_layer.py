"""The thin Ray Tune layer of the grid: one Tune trial per (fold, strategy, seed), resumable from the store.

The trial's work is a plain function `trial_fn(trial, settings, store, cache_dir) -> dict` (the grid
stage's default trains a detector, t2id.grid.core.detect_trial; tests inject small pure ones).
Tune adds what the grid needs around it:
  - a grid (`tune.grid_search`) over the trials to train, FIFO order, no early stopping (every trial
    trains its full schedule, as the paper's Table II compares finished trainings);
  - per-trial resources from the grid settings (`tune.with_resources`: CPUs for data loading, a GPU
    fraction so several small trainings share one GPU) and a cap on concurrent trials;
  - retries of errored trials (`FailureConfig(max_failures=grid.max_retries)`) within a run, but not of a
    UserError: the trainable reports it as the trial's result, and the stage raises it, unretried;
  - its experiment (state, per-trial reports) under the run's store (local or S3), for the trials
    this run trains.
Resuming is t2id.resume's, per trial: a trial publishes its result (`layout.grid.result`) and then
its memo, before it reports to Tune. A rerun after a kill or an error reuses every trial whose memo
holds for its identity, and Tune trains only the others: nothing finished is trained twice, however
far Tune's own experiment state (synced every few seconds) lagged behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from t2id import layout
from t2id.errors import UserError
from t2id.events import Advance
from t2id.grid.settings import GridSettings
from t2id.resume import Memo, memoized
from t2id.store import Store, ray_storage
from t2id.tracking import Tracking, current, log_trial_result, trial_run

TrialFn = Callable[[dict[str, Any], GridSettings, Store, str], dict[str, Any]]


@dataclass
class TuneOutcome:
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial name -> trial_fn output
    errors: dict[str, str] = field(default_factory=dict)  # trial name -> error text
    user_errors: dict[str, str] = field(default_factory=dict)  # trial name -> its UserError's message (not retried)
    reused: int = 0  # trials whose published result was still valid (not trained again)


def trial_memo(store: Store, trial: dict[str, Any], force: bool = False) -> Memo:
    """The memo of a trial: its identity, and the sha256 of its published result."""
    return Memo(store, layout.memo(layout.grid.trial(trial["fold"], trial["strategy"], trial["seed"])),
                trial["identity"], ignore=force)


def grid_trainable(config: dict[str, Any], trial_fn: TrialFn, settings: GridSettings, store: Store,
                   cache_dir: str, force: bool, tracking: Tracking | None = None) -> None:
    """Tune function trainable: train one trial (or reuse its published result) and report once.

    The metrics reported here are the only ones in the trial's Tune results; ultralytics' own Ray
    Tune callback (which reports every epoch when it sees a Tune session) is kept out by the
    detector trainer, and `t2id_trial` marks a report as ours.
    """
    from ray import tune

    trial = config["trial"]
    settings = GridSettings.model_validate(settings.model_dump())  # re-validated on the worker
    key = layout.grid.result(trial["fold"], trial["strategy"], trial["seed"])

    def train() -> list[str]:
        with trial_run(tracking, store, trial, settings) as log, current(log):  # MLflow run per trial (t2id.tracking)
            output = trial_fn(trial, settings, store, cache_dir)
            model = settings.grid.classifier if settings.task == "classify" else settings.grid.detector
            log_trial_result(log, output, model.epochs)
        store.write_text(key, json.dumps(output, sort_keys=True))
        return [key]

    try:
        memoized(trial_memo(store, trial, force), train)
    except UserError as exc:
        # Tune retries every trial error grid.max_retries times (it has no per-exception policy); a bad input
        # fails the same way each time. So a UserError ends the trial normally, reported, and run_trials raises it.
        tune.report({"t2id_trial": trial["name"], "t2id_user_error": str(exc)})
        return
    output = json.loads(store.read_text(key))
    map50_95 = output.get("overall", {}).get("map50_95")  # null when NaN (JSON has none)
    tune.report({
        "t2id_trial": trial["name"],
        "fold": trial["fold"],
        "strategy": trial["strategy"],
        "seed": trial["seed"],
        "result_key": key,
        "map50_95": float("nan") if map50_95 is None else float(map50_95),
        "train_seconds": float(output.get("seconds", 0.0)),
    })


def trial_progress(advance: Advance) -> Any:
    """A Tune callback (it runs on the driver) that feeds the grid's progress bar: trials finished, and
    as its status the trials running, failed, and the best mAP50-95 so far.

    Tune pickles its callbacks into the experiment state (for `Tuner.restore`), and the bar's `advance`
    holds a rich Progress with a lock: it is kept off the pickle (a restored callback draws nothing)."""
    from ray import tune

    class TrialProgress(tune.Callback):
        def __init__(self, advance: Advance) -> None:  # an argument, not a closure cell: see __getstate__
            self.advance: Advance | None = advance
            self.running: set[str] = set()
            self.failed = 0
            self.best: float | None = None

        def __getstate__(self) -> dict[str, Any]:
            return {**self.__dict__, "advance": None}

        def _draw(self, n: int) -> None:
            if self.advance is not None:
                self.advance(n, self.status())

        def status(self) -> str:
            parts = [f"{len(self.running)} running"] + ([f"{self.failed} failed"] if self.failed else [])
            if self.best is not None:
                parts.append(f"best mAP50-95 {self.best:.3f}")
            return ", ".join(parts)

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.running.add(trial.trial_id)
            self._draw(0)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            value = result.get("map50_95")
            if isinstance(value, float) and value == value and (self.best is None or value > self.best):
                self.best = value

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.running.discard(trial.trial_id)
            self._draw(1)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.running.discard(trial.trial_id)
            self.failed += 1
            self._draw(0)

    return TrialProgress(advance)


def run_trials(trials: list[dict[str, Any]], trial_fn: TrialFn, store: Store, settings: GridSettings,
               cache_dir: str, force: bool = False, verbose: int = 0,
               progress: Advance | None = None, tracking: Tracking | None = None) -> TuneOutcome:
    """Run every trial without a valid memo on Ray Tune (Ray must be initialized); collect all results.

    Each trial dict needs `name` (unique, folder-safe), `fold`, `strategy`, `seed` and `identity`; everything
    else is passed through to `trial_fn`. `force` trains every trial again. `verbose` is Tune's own console
    reporter (0: none; the `progress` bar counts trials instead).
    """
    from ray import tune

    names = [t["name"] for t in trials]
    if len(set(names)) != len(names):
        raise ValueError(f"trial names must be unique, got {names}")
    outcome = TuneOutcome()
    pending = [t for t in trials if not trial_memo(store, t, force).done()]
    outcome.reused = len(trials) - len(pending)
    if progress is not None:
        progress(outcome.reused)
    if pending:
        grid = settings.grid
        storage_path, filesystem = ray_storage(store, layout.grid.root)
        # Tune's experiment holds this run's trainings only; earlier runs' results live in the memos.
        store.delete_prefix(layout.grid.tune)  # on S3 this also removes the folder markers Tune wrote
        trainable = tune.with_resources(
            tune.with_parameters(grid_trainable, trial_fn=trial_fn, settings=settings, store=store,
                                 cache_dir=cache_dir, force=force, tracking=tracking),
            {"cpu": grid.cpus_per_trial, "gpu": grid.gpus_per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(pending)},
            tune_config=tune.TuneConfig(
                num_samples=1,
                max_concurrent_trials=grid.max_concurrent or None,
                reuse_actors=True,  # a process per trial costs seconds of imports; trials share nothing
                trial_name_creator=lambda t: t.config["trial"]["name"],
                trial_dirname_creator=lambda t: t.config["trial"]["name"],
            ),
            run_config=tune.RunConfig(
                name=layout.grid.tune_name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=grid.max_retries),
                verbose=verbose,
                callbacks=[trial_progress(progress)] if progress is not None else None,
            ),
        )
        for result in tuner.fit():
            name = result.config["trial"]["name"] if result.config else "?"
            if result.error is not None:
                outcome.errors[name] = f"{type(result.error).__name__}: {result.error}".strip()
            elif (result.metrics or {}).get("t2id_user_error"):
                outcome.user_errors[name] = str(result.metrics["t2id_user_error"])
    for trial in trials:
        name = trial["name"]
        if trial_memo(store, trial).done():
            key = layout.grid.result(trial["fold"], trial["strategy"], trial["seed"])
            outcome.results[name] = json.loads(store.read_text(key))
            outcome.errors.pop(name, None)
            outcome.user_errors.pop(name, None)
        elif name not in outcome.errors and name not in outcome.user_errors:
            outcome.errors[name] = "the trial ended without publishing a result"
    return outcome


def raise_on_errors(outcome: TuneOutcome, max_retries: int) -> None:
    if outcome.user_errors:  # the user's to fix: its own message first
        name, message = next(iter(outcome.user_errors.items()))
        others = f" and {len(outcome.user_errors) - 1} more" if len(outcome.user_errors) > 1 else ""
        raise UserError(f"{message} (grid trial {name}{others}; not retried: fix it and rerun, finished trials "
                        "are kept)")
    if outcome.errors:
        first = next(iter(outcome.errors.items()))
        detail = first[1].strip().splitlines()[-1] if first[1].strip() else "unknown error"
        raise UserError(
            f"grid: {len(outcome.errors)} trial(s) failed after {max_retries} retries "
            f"({', '.join(sorted(outcome.errors))}); first: {first[0]}: {detail[:300]}. "
            "Fix the cause and rerun `t2id run CONFIG`: finished trials are kept, failed ones retried."
        )


def experiment_status(store: Store) -> dict[str, str]:
    """Trial name -> Tune status (PENDING/RUNNING/TERMINATED/ERROR) from the newest stored experiment state."""
    states = sorted(k for k in store.list(layout.grid.tune)
                    if k.rsplit("/", 1)[-1].startswith("experiment_state-") and k.endswith(".json"))
    if not states:
        return {}
    status = {}
    for trial_json, _runner in json.loads(store.read_text(states[-1]))["trial_data"]:
        trial = json.loads(trial_json)
        status[trial["config"]["trial"]["name"]] = trial["status"]
    return status
