"""Ray layer of `generate`: one warm pool of Ray actors renders every fold and top-up round of a stage.

Each actor builds one worker (`worker_cls(settings, store, None, ...)`, the stage settings the runner
hashed, re-validated on the actor) and so loads the SDXL pipeline once; the fold is a column of the plan
rows, and the worker swaps (unfuse, unload, load, fuse) the LoRA adapter when a batch of another fold
arrives. Before, every fold and every top-up round started a new Ray Data actor pool that loaded the
pipeline again (0.37x a serial loop end to end on CPU, issue 17).

Work that runs beside the pool (label's teacher between its top-up rounds) names what it needs (`leave`): the
pool then starts no more actors than leave that free, and `make_room` closes the pool when even one actor
would not (its next call starts it again).

Exactly-once does not depend on the pool: a crashed actor is restarted (generate.max_restarts) and the
batches it held are retried on it (max_task_retries=-1: as long as restarts remain); a retried batch
rewrites the same keys with the same bytes, and a row counts as done only once its record is written
(t2id.generate.core). Placement (actors, CPUs and GPUs each) comes from the generate section and the
connected cluster. `label` inpaints on this same machinery with its own worker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from t2id.configbase import StageSettings
from t2id.devices import ray_gpus
from t2id.generate.config import GenerateConfig
from t2id.generate.core import OnBatch, worker_batch
from t2id.store import Store

# Batches queued per actor: the next batch is already on the actor while the driver takes in the last
# one, so an actor never waits for the driver; more would only make the last batches finish unevenly.
BATCHES_IN_FLIGHT_PER_ACTOR = 2


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" | "cpu": what each actor runs on
    actors: int
    cpus: float  # per actor
    gpus: float  # per actor


def placement(g: GenerateConfig, leave: Mapping[str, float] | None = None) -> Placement:
    """Actors and their resources from generate.device / concurrency / cpus_per_actor and the Ray cluster;
    without generate.concurrency, as many actors as fit beside `leave` (resource -> amount), at least one."""
    import ray

    total = dict(ray.cluster_resources())
    for name, amount in (leave or {}).items():
        total[name] = total.get(name, 0) - amount
    gpus = ray_gpus(g.device, "generate.device", 1.0)
    if gpus:
        return Placement("cuda", g.concurrency or max(int(total.get("GPU", 0)), 1), g.cpus_per_actor, gpus)
    return Placement("cpu", g.concurrency or max(1, int(total.get("CPU", 1) // g.cpus_per_actor)),
                     g.cpus_per_actor, 0.0)


class PoolActor:
    """The body of one pool actor: a worker built once, fed batches of plan rows."""

    def __init__(self, worker_cls: type, ctor: dict[str, Any]) -> None:
        self.worker = worker_cls(**ctor)

    def call(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.worker(batch)

    def stats(self) -> dict[str, Any]:
        return {**self.worker.stats, "fold": self.worker.fold}


def fold_batches(rows: list[dict], columns: tuple[str, ...], batch_size: int) -> list[dict]:
    """Worker batches of at most `batch_size` rows, each of one fold (a batch is the unit of work and retry)."""
    by_fold: dict[int, list[dict]] = {}
    for row in rows:
        by_fold.setdefault(int(row["fold"]), []).append(row)
    return [worker_batch(part[i:i + batch_size], columns)
            for part in by_fold.values() for i in range(0, len(part), batch_size)]


class WarmPool:
    """An Executor (t2id.generate.core) backed by long-lived actors of `worker_cls`, started at the first
    call and kept until `close()` (or the end of the `with` block): call it for every fold and round.

    It grows (never shrinks) to min(placement actors, batches of the largest call so far). `leave`: resources
    (Ray names: "CPU", "GPU") that other work needs beside the pool (module doc)."""

    def __init__(self, worker_cls: type, settings: StageSettings, store: Store, g: GenerateConfig, cache_dir: str,
                 endpoint_url: str | None = None, leave: Mapping[str, float] | None = None) -> None:
        self.worker_cls, self.settings, self.store, self.g = worker_cls, settings, store, g
        self.cache_dir, self.endpoint_url = cache_dir, endpoint_url
        self.leave = dict(leave or {})
        self.actors: list[Any] = []
        self.started = 0  # actors started over the pool's life (a closed pool starts new ones)
        self.where: Placement | None = None

    def _grow(self, n_batches: int) -> None:
        import ray

        if self.where is None:
            self.where = placement(self.g, self.leave)
        where = self.where
        want = max(1, min(where.actors, n_batches))
        if len(self.actors) >= want:
            return
        ctor = dict(settings=self.settings, store=self.store, fold=None, cache_dir=self.cache_dir,
                    endpoint_url=self.endpoint_url, device=where.device,
                    torch_threads=max(1, int(where.cpus)) if where.device == "cpu" else None)
        actor_cls = ray.remote(PoolActor).options(num_cpus=where.cpus, num_gpus=where.gpus or None,
                                                  max_restarts=self.g.max_restarts, max_task_retries=-1)
        self.started += want - len(self.actors)
        self.actors += [actor_cls.remote(self.worker_cls, ctor) for _ in range(want - len(self.actors))]

    def make_room(self) -> bool:
        """Before work that needs `leave`: close the actors unless the cluster holds `leave` beside them (the
        next call starts them again, loading the pipeline anew). True when the actors stay warm."""
        import ray

        if not self.actors or self.where is None:
            return True
        held = {"CPU": len(self.actors) * self.where.cpus, "GPU": len(self.actors) * self.where.gpus}
        total = ray.cluster_resources()
        if all(total.get(name, 0) - held.get(name, 0) >= amount for name, amount in self.leave.items() if amount):
            return True
        self.close()
        return False

    def __call__(self, rows: list[dict], on_batch: OnBatch) -> None:
        """Render `rows`; `on_batch` sees each finished batch of result columns, in completion order."""
        import ray

        pending = deque(fold_batches(rows, self.worker_cls.PLAN_COLUMNS, self.g.batch_size))
        if not pending:
            return
        self._grow(len(pending))
        in_flight: dict[Any, int] = {}  # result ref -> index of its actor
        load = [0] * len(self.actors)

        def submit() -> None:
            while pending:
                index = min(range(len(self.actors)), key=load.__getitem__)
                if load[index] >= BATCHES_IN_FLIGHT_PER_ACTOR:
                    return
                in_flight[self.actors[index].call.remote(pending.popleft())] = index
                load[index] += 1

        submit()
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            load[in_flight.pop(ref)] -= 1
            result = ray.get(ref)  # an actor out of restarts raises here: the stage fails, a rerun resumes
            submit()  # keep the actors busy while the driver takes in the result
            on_batch(result)

    def stats(self) -> list[dict[str, Any]]:
        """Per actor: pid, pipeline_loads, adapter_loads (since its last restart) and the fold it holds."""
        import ray

        return ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> WarmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_ray(rows: list[dict], on_batch: OnBatch, *, worker_cls: type, settings: StageSettings, store: Store,
            g: GenerateConfig, cache_dir: str, endpoint_url: str | None = None) -> None:
    """One-shot executor: `rows` through a pool that lives for this call only (tests; DreamBooth's prior images,
    drawn just before the fold's training, which needs the pool's GPUs back)."""
    with WarmPool(worker_cls, settings, store, g, cache_dir, endpoint_url) as pool:
        pool(rows, on_batch)
