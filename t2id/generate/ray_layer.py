"""Ray layer of `generate`: plan rows through `map_batches(ImageGenerator)` on an actor pool.

The actors build themselves from the stage settings (the same object the runner hashed), so no
config is repacked on the way; placement (actors, CPUs and GPUs each) comes from the generate
section and the connected cluster. `label` inpaints on this same machinery with its own worker.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from t2id.configbase import StageSettings
from t2id.devices import ray_gpus
from t2id.generate.config import GenerateConfig
from t2id.generate.core import OnBatch
from t2id.store import Store


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" | "cpu": what each actor runs on
    actors: int
    cpus: float  # per actor
    gpus: float  # per actor


def placement(g: GenerateConfig) -> Placement:
    """Actors and their resources from generate.device / concurrency / cpus_per_actor and the Ray cluster."""
    import ray

    total = ray.cluster_resources()
    gpus = ray_gpus(g.device, "generate.device", 1.0)
    if gpus:
        return Placement("cuda", g.concurrency or max(int(total.get("GPU", 0)), 1), g.cpus_per_actor, gpus)
    return Placement("cpu", g.concurrency or max(1, int(total.get("CPU", 1) // g.cpus_per_actor)),
                     g.cpus_per_actor, 0.0)


def run_ray(rows: list[dict], on_batch: OnBatch, *, worker_cls: type, settings: StageSettings, store: Store,
            fold: int, g: GenerateConfig, cache_dir: str, endpoint_url: str | None = None) -> None:
    """Render `rows` with Ray Data on an actor pool of `worker_cls(settings, store, fold, ...)`;
    `on_batch` sees each finished batch of result columns (an Executor once the keywords are bound)."""
    import ray

    where = placement(g)
    n_batches = math.ceil(len(rows) / g.batch_size)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the stage reports images done / planned
    ctor = dict(settings=settings, store=store, fold=fold, cache_dir=cache_dir, endpoint_url=endpoint_url,
                device=where.device, torch_threads=max(1, int(where.cpus)) if where.device == "cpu" else None)
    ds = ray.data.from_items([{c: r[c] for c in worker_cls.PLAN_COLUMNS} for r in rows],
                             override_num_blocks=n_batches)
    # Crashed actors are restarted (max_restarts) and their unfinished batches retried (max_task_retries=-1:
    # as long as restarts remain); a retried batch rewrites the same keys, so it cannot duplicate an image.
    # Ray 2.60 deprecates passing these as ray_remote_args (no named parameter replaces them yet); once it
    # is removed, Ray Data's own default applies: unbounded restarts and retries.
    pool = ray.data.ActorPoolStrategy(size=max(1, min(where.actors, n_batches)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        ds = ds.map_batches(worker_cls, fn_constructor_kwargs=ctor, batch_size=g.batch_size, batch_format="numpy",
                            compute=pool, num_cpus=where.cpus, num_gpus=where.gpus or None,
                            max_restarts=g.max_restarts, max_task_retries=-1)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        on_batch(batch)
