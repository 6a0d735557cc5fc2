"""Ray layer of `label`: the teacher (training and prediction) as one Ray task per fold.

On KubeRay the driver runs on a head pod without CPUs for work or a GPU, so the teacher never
trains there: each fold's `t2id.label.teacher.label_fold` runs as a task that reserves
label.teacher.cpus CPUs and, when label.teacher.device asks for one and the cluster has one, a
GPU. Folds run in parallel as far as the cluster's resources allow. Inpainting runs on generate's
Ray Data machinery (t2id.generate.ray_layer) with `t2id.label.inpaint.InpaintGenerator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from t2id.devices import ray_gpus
from t2id.errors import UserError
from t2id.events import Events, LogEvents
from t2id.label.settings import LabelSettings
from t2id.store import Store


def teacher_task(settings: LabelSettings, store: Store, fold: int, cache_dir: str, force: bool,
                 rows: list[dict] | None = None) -> tuple[list[dict], dict[str, Any]]:
    """The body of one fold's Ray task; its facts say which resources Ray assigned to it."""
    import ray

    from t2id.label.teacher import label_fold

    s = LabelSettings.model_validate(settings.model_dump())  # re-validated where it arrived
    rows, facts = label_fold(store, s, fold, Path(cache_dir), force, rows)
    return rows, {**facts, "teacher_resources": dict(ray.get_runtime_context().get_assigned_resources())}


def teacher_resources(s: LabelSettings) -> dict[str, float]:
    """What one fold's teacher task reserves (Ray resource names): label.teacher.cpus, and a GPU when
    label.teacher.device asks for one and the connected cluster has one."""
    teacher = s.label.teacher
    return {"CPU": teacher.cpus, "GPU": ray_gpus(teacher.device, "label.teacher.device")}


def teacher_folds(store: Store, s: LabelSettings, folds: list[int], cache_dir: str, force: bool,
                  events: Events | None = None, rows: dict[int, list[dict]] | None = None
                  ) -> dict[int, tuple[list[dict], dict[str, Any]]]:
    """Label each fold's generate manifest (or `rows[fold]`: a top-up round) with its teacher, one Ray task
    per fold."""
    import ray

    events = events or LogEvents()
    need = teacher_resources(s)
    cpus, gpus = need["CPU"], need["GPU"]
    if rows is None:
        events.info(f"label: the teacher of fold(s) {folds} trains and predicts in Ray tasks of "
                    f"{cpus:g} CPU(s){f' and {gpus:g} GPU' if gpus else ''} each")
    task = ray.remote(teacher_task).options(num_cpus=cpus, num_gpus=gpus)
    pending = {task.remote(s, store, fold, cache_dir, force, None if rows is None else rows[fold]): fold
               for fold in folds}
    results = {}
    with events.progress("label: folds labelled by their teacher", len(folds)) as advance:
        try:
            while pending:
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                fold = pending.pop(ready)  # before ray.get: a failed task must not be cancelled below
                results[fold] = ray.get(ready)
                advance(1)
        except ray.exceptions.RayTaskError as err:
            # The stage fails: do not leave the other folds' teachers training. Only tasks still running
            # are cancelled: cancelling one whose completion Ray is processing trips a CHECK in Ray's
            # task manager ("Tried to complete task that was not pending") that kills the driver.
            _, running = ray.wait(list(pending), num_returns=len(pending), timeout=0) if pending else ([], [])
            for ref in running:
                ray.cancel(ref)
            if isinstance(err.cause, UserError):  # a user error on the worker stays a one-line error
                raise err.cause from None
            raise
    return {fold: results[fold] for fold in folds}
