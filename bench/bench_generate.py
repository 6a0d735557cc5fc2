"""Benchmark: images/s of the Ray generation path (the stage's warm actor pool) vs a plain serial diffusers loop.

Reference (measured in the same run): a serial loop over the same plan with the same tiny SDXL,
one torch thread, the same pipeline calls as the worker (one call per batch of --batch-size rows,
one `torch.Generator` per image: generate.batched_pipeline's default), PNG written to a local store.
It runs twice: as a script in a fresh interpreter (what a user of a serial loop waits for: Python,
the torch/diffusers imports, the pipeline load, the loop), and in this process, where the imports
are already done (a lower bound of a serial loop's wall time, printed for comparison).
Compared (issue 17 goals in brackets):
  - Ray path, 1 actor x 1 CPU (same resources as the reference; >= 0.95x steady, >= 0.9x end to end)
  - Ray path, 2 actors x 1 CPU each (>= 1.8x the 1-actor figure; needs 2 idle cores)
The plan is split into --folds folds (2 by default, base model without adapters) run one after the other on
one pool, as the stage does, so the figure includes the fold switch.
Two kinds of figure:
  - end to end, one fresh run per configuration: wall time including loading the pipeline (the serial
    script starts Python, imports and loads it once; each actor starts a Python process, imports and loads
    it once for all folds) and, for Ray, listing/verifying the store and writing the records and manifests:
    what a user waits for. Ratios are to the serial script; the in-process loop's ratio is printed beside it;
  - steady state, in --rounds interleaved rounds on warm pipelines: each round draws --images/--rounds
    images with the in-process serial loop, the warm 1-actor pool and the warm 2-actor pool (in this order,
    then reversed in the next round, so a linear drift cancels out), and measures images/s while every
    worker is busy (`steady_rate`: no start-up cost, which a 300-images-per-class run amortizes, and no
    drain at the end of a round). The ratios are paired within a round and the median over rounds is the
    figure: this machine's speed drifts by 10-20% over a minute, and configurations run one after
    the other would compare different machines. Every round's ratios are printed.

    .venv/bin/python bench/bench_generate.py                 # 24 images per configuration
    .venv/bin/python bench/bench_generate.py --images 1000   # issue 17's 1,000-image comparison
    .venv/bin/python bench/bench_generate.py --images 1000 --only-ray 2   # one Ray run, its peak memory

Prints one line per end-to-end configuration, one per steady round and the medians; with --only-ray, wall
time and peak memory (driver + actors, resident set) of one Ray run.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="images per configuration")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per Ray Data batch")
    parser.add_argument("--only-ray", type=int, default=None, metavar="WORKERS",
                        help="skip the comparison; one Ray run with this many actors, report wall time + peak memory")
    parser.add_argument("--folds", type=int, default=2, help="folds the images are split into (one pool)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the steady-state comparison")
    parser.add_argument("--cache", default=None, help="model cache dir (default: a temp dir)")
    parser.add_argument("--serial-child", default=None, metavar="OUT",
                        help=argparse.SUPPRESS)  # internal: run the serial loop into OUT, print its timings as JSON
    return parser.parse_args(argv)


class PeakMemory:
    """Samples the resident memory of this process + its Ray generation actors every 0.2 s."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = psutil.Process().memory_info().rss
        for proc in psutil.process_iter(["cmdline", "memory_info"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "PoolActor" in cmd and proc.info["memory_info"] is not None:
                total += proc.info["memory_info"].rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_bytes = max(self.peak_bytes, self._sample())
            except Exception:  # a process vanished mid-scan
                pass
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_settings(args, workers: int, images_per_fold: int | None = None):
    from t2id.generate.config import GenerateConfig
    from t2id.generate.settings import GenerateSettings

    g = GenerateConfig(images_per_class=images_per_fold or args.images // args.folds, width=args.size, height=args.size,
                       steps=args.steps,
                       batch_size=args.batch_size, concurrency=workers, cpus_per_actor=1,
                       quality={"min_std": 0, "min_entropy": 0})  # no top-up: same image count everywhere
    classes = plan_classes()
    return GenerateSettings(generate=g, target_classes=[{"name": c.name, "prompts": list(c.prompts)} for c in classes],
                            base_model="tiny", allow_network=False, run_seed=0, use_adapter=False, folds=None,
                            clip_weights=None)


def plan_classes():
    from t2id.generate.plan import PlanClass

    return [PlanClass("vocal fold", 5, ("High-resolution ultrasound scan of the human vocal fold",))]


def plan_for(args) -> list[dict]:
    """Every fold's rows, as the stage plans them (images split evenly over the folds)."""
    from t2id.generate.plan import gen_params, initial_plan

    s = make_settings(args, 1)
    return [row for fold in range(args.folds)
            for row in initial_plan(0, fold, plan_classes(), gen_params(s, ""), args.images // args.folds)]


def steady_rate(stamps: list[tuple[float, int]], parallel: int = 1) -> float:
    """Images/s while all `parallel` workers are busy: from the `parallel`-th finished batch (each worker's
    first, the ramp-up) to the `parallel`-th last one (before it, the drain: workers that ran out of batches
    sit idle while the others finish); (images finished in that window) / (its length)."""
    window = stamps[parallel - 1:len(stamps) - parallel + 1]
    if len(window) < 2:
        return float("nan")
    return sum(n for _, n in window[1:]) / (window[-1][0] - window[0][0])


def serial_loop(args, pipe, rows: list[dict], store) -> list[tuple[float, int]]:
    """The plain diffusers loop: one call per batch, PNG to a local store; (time, images) per finished batch."""
    import torch

    from t2id.generate.worker import png_bytes

    stamps = []
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start:start + args.batch_size]
        generators = [torch.Generator("cpu").manual_seed(row["seed"]) for row in batch]
        with torch.inference_mode():
            images = pipe(prompt=[row["prompt"] for row in batch], num_inference_steps=args.steps,
                          guidance_scale=7.5, width=args.size, height=args.size, generator=generators,
                          output_type="np").images
        for row, image in zip(batch, images):
            store.write_bytes(row["key"], png_bytes((image.clip(0, 1) * 255).round().astype("uint8")))
        stamps.append((time.perf_counter(), len(batch)))
    return stamps


def serial_reference(args, cache: Path, out: Path) -> tuple[float, float]:
    """The serial loop over the whole plan, the pipeline load included; (wall seconds, steady images/s)."""
    import torch

    from t2id.lora.models import load_sdxl_pipeline
    from t2id.store import open_store

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pipe = load_sdxl_pipeline("tiny", cache)
    stamps = serial_loop(args, pipe, plan_for(args), open_store(str(out)))
    return time.perf_counter() - t0, steady_rate(stamps)


def serial_script(args, cache: Path, out: Path) -> tuple[float, float]:
    """The serial loop as a script in a fresh interpreter: wall time from its start to its exit."""
    import json
    import subprocess
    import sys

    command = [sys.executable, __file__, "--serial-child", str(out), "--cache", str(cache),
               "--images", str(args.images), "--size", str(args.size), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--folds", str(args.folds)]
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])["steady"]


def ray_path(args, cache: Path, out: Path, workers: int) -> tuple[float, float]:
    from t2id.generate.core import generate_fold
    from t2id.generate.ray_layer import WarmPool
    from t2id.generate.worker import ImageGenerator
    from t2id.store import open_store

    stamps: list[tuple[float, int]] = []
    store = open_store(str(out))
    s = make_settings(args, workers)

    t0 = time.perf_counter()
    generated = 0
    with WarmPool(ImageGenerator, s, store, s.generate, str(cache)) as pool:
        def timed(rows, on_batch):
            def stamped(batch):
                stamps.append((time.perf_counter(), len(batch["key"])))
                on_batch(batch)

            pool(rows, stamped)

        for fold in range(args.folds):  # one pool for every fold, as the stage runs them
            generated += generate_fold(store, s, fold, plan_classes(), timed).generated
        seconds = time.perf_counter() - t0
    assert generated == args.folds * (args.images // args.folds), generated
    return seconds, steady_rate(stamps, workers)


def steady_rounds(args, cache: Path, out: Path) -> tuple[float, float]:
    """Steady images/s of the serial loop, 1 warm actor and 2 warm actors, interleaved in rounds (module
    doc); prints each round and returns the medians of the paired ratios (1 actor / serial, 2 / 1)."""
    import torch

    from t2id.generate.core import generate_fold
    from t2id.generate.plan import gen_params, initial_plan
    from t2id.generate.ray_layer import WarmPool
    from t2id.generate.worker import ImageGenerator
    from t2id.lora.models import load_sdxl_pipeline
    from t2id.store import open_store

    # 2 actors' steady window leaves out 2 batches at each end (steady_rate): at least 2 more within it
    per_round = max(args.images // args.rounds, 6 * args.batch_size)
    torch.set_num_threads(1)
    pipe = load_sdxl_pipeline("tiny", cache)
    settings = {workers: make_settings(args, workers, per_round) for workers in (1, 2)}
    stores = {workers: open_store(str(out / f"ray{workers}")) for workers in (1, 2)}
    pools = {workers: WarmPool(ImageGenerator, s, stores[workers], s.generate, str(cache))
             for workers, s in settings.items()}

    def pool_rate(workers: int, fold: int) -> float:
        stamps: list[tuple[float, int]] = []

        def timed(rows, on_batch):
            def stamped(batch):
                stamps.append((time.perf_counter(), len(batch["key"])))
                on_batch(batch)

            pools[workers](rows, stamped)

        assert generate_fold(stores[workers], settings[workers], fold, plan_classes(), timed).generated == per_round
        return steady_rate(stamps, workers)

    try:
        for workers in (1, 2):
            pool_rate(workers, 0)  # fold 0 warms the pool up: actors started, pipelines loaded
        serial_loop(args, pipe, plan_for(args)[:args.batch_size], open_store(str(out / "serial-warmup")))
        ratios: list[tuple[float, float]] = []
        for round_ in range(args.rounds):
            fold = round_ + 1  # a fold of its own per round: nothing is found done in the store
            rows = initial_plan(0, fold, plan_classes(), gen_params(settings[1], ""), per_round)
            draws = {
                "serial": lambda: steady_rate(serial_loop(args, pipe, rows, open_store(str(out / "serial-steady")))),
                "one": lambda: pool_rate(1, fold),
                "two": lambda: pool_rate(2, fold),
            }
            order = list(draws) if round_ % 2 == 0 else list(reversed(draws))  # a linear drift cancels out
            rate = {name: draws[name]() for name in order}
            serial, one, two = rate["serial"], rate["one"], rate["two"]
            ratios.append((one / serial, two / one))
            print(f"  steady round {round_ + 1}/{args.rounds} ({per_round} images each): serial {serial:.2f}, "
                  f"ray x1 {one:.2f}, ray x2 {two:.2f} images/s; ray x1 / serial {one / serial:.2f}x, "
                  f"ray x2 / ray x1 {two / one:.2f}x")
    finally:
        for pool in pools.values():
            pool.close()
    return statistics.median(r[0] for r in ratios), statistics.median(r[1] for r in ratios)


def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.serial_child:
        import json

        _, steady = serial_reference(args, Path(args.cache), Path(args.serial_child))
        print(json.dumps({"steady": steady}))
        return
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    cache = Path(args.cache) if args.cache else tmp / "cache"
    try:
        from t2id.lora.models import resolve_model_source

        resolve_model_source("tiny", cache)  # build the tiny model outside every timing
        # 3 logical CPUs: the steady rounds hold a 1-actor and a 2-actor pool at once; only one of them
        # draws at a time, so no more than 2 cores are ever busy
        ray.init(num_cpus=max(3, args.only_ray or 3), include_dashboard=False, log_to_driver=False)
        print(f"{args.images} images, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        if args.only_ray:
            with PeakMemory() as mem:
                seconds, steady = ray_path(args, cache, tmp / "ray", args.only_ray)
            driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"ray x{args.only_ray}: {seconds:.1f} s wall, {args.images / seconds:.2f} images/s end to end, "
                  f"{steady:.2f} images/s steady; peak RSS driver+actors {mem.peak_bytes / 2**20:.0f} MiB "
                  f"(driver max RSS {driver_peak:.0f} MiB); load average now {os.getloadavg()[0]:.1f}")
            return
        args.images = args.folds * (args.images // args.folds)
        serial, serial_steady = serial_script(args, cache, tmp / "serial")
        print(f"serial diffusers loop, as a script (reference): {serial:.1f} s, {args.images / serial:.2f} images/s "
              f"end to end, {serial_steady:.2f} images/s steady")
        in_process, in_process_steady = serial_reference(args, cache, tmp / "serial-in-process")
        print(f"serial diffusers loop, in this process (imports done): {in_process:.1f} s, "
              f"{args.images / in_process:.2f} images/s end to end, {in_process_steady:.2f} images/s steady")
        one: float | None = None
        for workers in (1, 2):
            seconds, steady = ray_path(args, cache, tmp / f"ray{workers}", workers)
            versus_one = f"; vs 1 actor {one / seconds:.2f}x" if one else ""
            print(f"ray x{workers}: {seconds:.1f} s, {args.images / seconds:.2f} images/s end to end "
                  f"(ratio {serial / seconds:.2f}x; {in_process / seconds:.2f}x the in-process loop{versus_one}), "
                  f"{steady:.2f} images/s steady in this run")
            one = one or seconds
        print(f"steady state, {args.rounds} interleaved rounds on warm pipelines:")
        one_vs_serial, two_vs_one = steady_rounds(args, cache, tmp / "steady")
        print(f"steady state, median of {args.rounds} paired rounds: ray x1 / serial loop {one_vs_serial:.2f}x "
              f"(goal >= 0.95x), ray x2 / ray x1 {two_vs_one:.2f}x (goal >= 1.8x)")
        print(f"load average now {os.getloadavg()[0]:.1f}")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(parse_args())
