"""`t2id plan CONFIG`: what a config will do, and what it will cost on GPUs, before anything runs.

Counts come from the config (folds, strategies, seeds, epochs, images per class) and the dataset's size:
the run's own store when its data and split stages are done there (a local store: exact per-fold
counts), else the phantom's labels (written to a temporary folder: it takes a second), else the numbers
passed (`--images`, `--rare-images`), else the paper's dataset (7,464 images, 840 of them holding a target
class), which the plan says. Times come from the per-GPU throughputs in t2id/plan_throughput.py, whose
rows name their source (issue 17's H200 measurements, or a labelled estimate); docs/plan.md explains
them. What is not modelled: model loading and Ray start-up (minutes per stage), data transfer from S3,
and idle GPUs while a stage uses fewer than the cluster has (the "held" cost bounds that).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from t2id import layout
from t2id.config import T2IDConfig
from t2id.errors import UserError
from t2id.plan_throughput import Throughput, gpu_types, rows

PAPER_IMAGES = 7464  # T2ID-CAS Sec. III-A: "The dataset included 7464 images of six classes"
PAPER_RARE_IMAGES = 840  # Sec. III-B: LoRA "with a training data of 840 real US images" (tracheal ring, vocal fold)


@dataclass
class Dataset:
    images: int
    rare_images: int  # images holding at least one of lora.target_classes
    source: str
    train: list[int]  # real TRAIN images per fold (every other fold)
    val: list[int]  # images of the fold itself
    rare_train: list[int]  # TRAIN images holding a target class: the fold's LoRA training set


@dataclass
class StagePlan:
    stage: str
    work: str  # what the stage will do, in words
    gpus: float  # GPUs it keeps busy at once
    gpu_hours: float
    wall_hours: float
    on_gpu: bool  # False: the config runs it on CPU (the figures are what it would take on GPUs)
    basis: str  # which throughput(s) the estimate used
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    config: str
    run_id: str
    folds: int
    target_classes: list[str]
    gpu_type: str
    gpus: int
    gpus_source: str
    dataset: Dataset
    stages: list[StagePlan]
    throughputs: list[Throughput]
    price_per_gpu_hour: float | None
    tiny: bool = False  # lora.base_model is 'tiny': full-size figures for a run that uses tiny models

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)

    @property
    def wall_hours(self) -> float:
        return sum(s.wall_hours for s in self.stages)  # stages run one after another

    @property
    def cost(self) -> float | None:
        """Busy GPU-hours at the price: what an autoscaling cluster that releases idle GPUs pays."""
        return None if self.price_per_gpu_hour is None else self.gpu_hours * self.price_per_gpu_hour

    @property
    def cost_held(self) -> float | None:
        """All GPUs held for the whole wall time: the bound for a fixed-size cluster."""
        return None if self.price_per_gpu_hour is None else self.wall_hours * self.gpus * self.price_per_gpu_hour

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(gpu_hours=self.gpu_hours, wall_hours=self.wall_hours, cost=self.cost, cost_held=self.cost_held)
        return data


# 1. The dataset's size ---------------------------------------------------------------------------------

def _uniform(images: int, rare: int, k: int, source: str) -> Dataset:
    """Folds of equal size (subject-grouped folds are close to it)."""
    return Dataset(images, rare, source, train=[round(images * (k - 1) / k)] * k, val=[round(images / k)] * k,
                   rare_train=[round(rare * (k - 1) / k)] * k)


def _from_store(cfg: T2IDConfig, k: int) -> Dataset | None:
    """Exact per-fold counts from a local run store whose data and split stages are done."""
    from t2id.runner import run_store

    if "://" in cfg.store.uri:
        return None  # no network for a plan; pass --images/--rare-images for an S3 run
    store = run_store(cfg)
    if not (store.exists(layout.marker("data")) and store.exists(layout.marker("split"))):
        return None
    from t2id.data.manifest import load_classes, load_folds, load_manifest

    names = load_classes(store)
    targets = {names.index(t.name) for t in cfg.lora.target_classes if t.name in names}
    manifest = load_manifest(store).select(["image_id", "boxes"]).to_pylist()
    fold_of = dict(zip(*(load_folds(store)[c].to_pylist() for c in ("image_id", "fold"))))
    folds = sorted(set(fold_of.values()))
    if len(folds) != k:
        return None  # the store's split is another config's
    rare = {r["image_id"] for r in manifest if any(b["class_id"] in targets for b in r["boxes"] or [])}
    val = [sum(1 for r in manifest if fold_of.get(r["image_id"]) == f) for f in folds]
    rare_val = [sum(1 for i in rare if fold_of.get(i) == f) for f in folds]
    return Dataset(len(manifest), len(rare), f"the run's store ({store.root}: data and split done)",
                   train=[len(manifest) - v for v in val], val=val, rare_train=[len(rare) - r for r in rare_val])


def _phantom(cfg: T2IDConfig, k: int) -> Dataset:
    """The phantom's label files, written to a temporary folder (deterministic, about a second)."""
    from t2id.data.config import PAPER_CLASSES
    from t2id.data.phantom import write_phantom

    ph = cfg.data.phantom
    if cfg.run.task == "classify":  # the image-level variant: one folder per scan plane
        from t2id.classify.phantom import write_classify_phantom

        with tempfile.TemporaryDirectory(prefix="t2id-plan-") as tmp:
            root = write_classify_phantom(tmp, subjects=ph.subjects, frames_per_subject=ph.frames_per_subject,
                                          size=32, seed=ph.seed)
            images = len(list(root.glob("*/*.png")))
            rare = sum(len(list((root / t.name).glob("*.png"))) for t in cfg.lora.target_classes)
        return _uniform(images, rare, k, f"the image-level phantom (data.phantom: {ph.subjects} subjects x "
                                         f"{ph.frames_per_subject} frames)")
    targets = {str(PAPER_CLASSES.index(t.name)) for t in cfg.lora.target_classes if t.name in PAPER_CLASSES}
    with tempfile.TemporaryDirectory(prefix="t2id-plan-") as tmp:
        root = write_phantom(tmp, subjects=ph.subjects, frames_per_subject=ph.frames_per_subject, size=32,
                             seed=ph.seed)  # labels do not depend on the image size; 32 px is quick
        labels = sorted((root / "labels").glob("*.txt"))
        rare = sum(1 for p in labels if {ln.split()[0] for ln in p.read_text().splitlines() if ln.strip()} & targets)
    return _uniform(len(labels), rare, k, f"the phantom (data.phantom: {ph.subjects} subjects x "
                                          f"{ph.frames_per_subject} frames)")


def dataset_counts(cfg: T2IDConfig, images: int | None = None, rare_images: int | None = None) -> Dataset:
    k = cfg.split.folds
    if images is not None or rare_images is not None:
        n = images if images is not None else PAPER_IMAGES
        m = rare_images if rare_images is not None else round(n * PAPER_RARE_IMAGES / PAPER_IMAGES)
        if m > n:
            raise UserError(f"--rare-images {m} > --images {n}: rare-class images are part of the dataset")
        how = "given" if images is not None and rare_images is not None else (
            "given; the other scaled by the paper's share of rare-class images, 840/7464")
        return _uniform(n, m, k, f"--images {n} / --rare-images {m} ({how})")
    found = _from_store(cfg, k)
    if found is not None:
        return found
    if cfg.data.source == "phantom":
        return _phantom(cfg, k)
    return _uniform(PAPER_IMAGES, PAPER_RARE_IMAGES, k, "the paper's dataset (T2ID-CAS Sec. III); pass "
                                                          "--images/--rare-images for yours")


# 2. Per-GPU rates -----------------------------------------------------------------------------------

def _nearest(candidates: list[Throughput], side: int) -> Throughput:
    return min(candidates, key=lambda t: abs(math.log(t.resolution / side)))


def lora_rate(cfg: T2IDConfig, gpu: str) -> tuple[float, Throughput]:
    lo = cfg.lora
    variant = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[lo.mixed_precision]
    if lo.gradient_checkpointing and variant == "fp16":
        variant = "fp16+checkpointing"
    found = [t for t in rows(gpu, "lora") if t.variant == variant] or [t for t in rows(gpu, "lora")
                                                                        if t.variant == "fp16"]
    row = _nearest(found, lo.resolution)
    return row.images_per_second * (row.resolution / lo.resolution) ** 2, row


def generation_rate(gpu: str, batched: bool, steps: int, width: int, height: int) -> tuple[float, Throughput]:
    row = next(t for t in rows(gpu, "generate") if t.variant == ("batched" if batched else "unbatched"))
    return row.images_per_second * (row.steps or steps) / steps * row.resolution ** 2 / (width * height), row


def detector_rates(gpu: str, imgsz: int) -> tuple[float, float, Throughput, Throughput]:
    train, predict = rows(gpu, "detector_train")[0], rows(gpu, "detector_predict")[0]
    scale = (train.resolution / imgsz) ** 2
    return train.images_per_second * scale, predict.images_per_second * scale, train, predict


# 3. The plan ------------------------------------------------------------------------------------------

def cluster_gpus(cfg: T2IDConfig) -> tuple[int, str]:
    group = cfg.cluster.gpu_workers
    return group.max_replicas * group.gpus, (f"cluster.gpu_workers: up to {group.max_replicas} workers x "
                                            f"{group.gpus} GPU")


def _hours(seconds: float) -> float:
    return seconds / 3600.0


def make_plan(cfg: T2IDConfig, config_name: str, gpu_type: str = "h200", gpus: int | None = None,
              price_per_gpu_hour: float | None = None, images: int | None = None,
              rare_images: int | None = None) -> Plan:
    """What `cfg` will do and an estimate of its GPU-hours and wall time per stage on `gpus` x `gpu_type`."""
    from t2id.lora.train import make_schedule

    if gpu_type not in gpu_types():
        raise UserError(f"--gpu-type {gpu_type}: no throughput figures for it (known: {', '.join(gpu_types())}); "
                        "measure it with bench/bench_gpu.py and add its rows to t2id/plan_throughput.py")
    if gpus is None:
        n_gpus, gpus_source = cluster_gpus(cfg)
    else:
        n_gpus, gpus_source = gpus, "--gpus"
    if n_gpus < 1:
        raise UserError(f"the plan needs GPUs: {gpus_source} gives {n_gpus}; pass --gpus N")
    k = cfg.split.folds
    data = dataset_counts(cfg, images, rare_images)
    stages = set(cfg.run.stages)
    classes = [t.name for t in cfg.lora.target_classes]
    used: dict[tuple[str, str, int], Throughput] = {}
    plans: list[StagePlan] = []

    def note(row: Throughput) -> str:
        used[row.work, row.variant, row.resolution] = row
        return f"{row.work} {row.variant} @{row.resolution}px: {row.images_per_second:g} img/s"

    def cpu_only(name: str, why: str) -> None:
        plans.append(StagePlan(name, why, 0, 0.0, 0.0, False, "CPU"))

    for name in ("data", "split"):
        if name in stages:
            cpu_only(name, "import and check the dataset" if name == "data" else f"{k} subject-grouped folds")

    ddpm = cfg.lora.ddpm if "lora" in stages else None  # lora.method ddpm: counted, not timed
    if ddpm is not None:
        plans.extend(ddpm_plans(cfg, data, classes, stages))
    elif "lora" in stages:
        lo = cfg.lora
        folds = lo.folds if lo.folds is not None else list(range(k))
        rate, row = lora_rate(cfg, gpu_type)
        steps, seen = [], []
        for f in folds:
            try:
                sched = make_schedule(data.rare_train[f], lo, lo.num_workers)
            except ValueError as exc:
                raise UserError(f"lora: fold {f} would train on {data.rare_train[f]} images: {exc}") from exc
            steps.append(sched.total_steps)
            seen.append(sched.total_steps * sched.global_batch)
        # dreambooth_lora: every instance image goes through the UNet beside one class-prior image (one
        # forward of twice the batch), and the base model first draws the prior images on the generate pool.
        prior_images, prior_wall, prior_gpus, prior_note = 0, 0.0, 1.0, ""
        if lo.method == "dreambooth_lora":
            db = lo.dreambooth
            seen = [2 * n for n in seen]
            prior_images = len(folds) * len(classes) * db.prior_images_per_class
            p_rate, p_row = generation_rate(gpu_type, cfg.generate.batched_pipeline, db.prior_steps, lo.resolution,
                                            lo.resolution)
            prior_gpus = float(min(cfg.generate.concurrency or n_gpus, n_gpus))
            prior_wall = prior_images / p_rate / prior_gpus
            prior_note = f"; prior images {note(p_row)}"
        train_s = sum(seen) / rate  # GPU-seconds (data parallel: the work splits over the workers)
        # Validation images: rank 0 draws them (the other workers wait), unbatched, after every
        # validation_every_epochs epochs and after the last.
        checks = lo.epochs // lo.validation_every_epochs + (1 if lo.epochs % lo.validation_every_epochs else 0)
        val_images = len(folds) * lo.validation_images * len(classes) * checks
        val_rate, val_row = generation_rate(gpu_type, False, lo.validation_steps, lo.resolution, lo.resolution)
        val_wall = val_images / val_rate
        workers = lo.num_workers
        plans.append(StagePlan(
            "lora", f"{len(folds)} folds x ~{round(sum(data.rare_train[f] for f in folds) / len(folds))} images x "
            f"{lo.epochs} epochs = {sum(steps):,} steps of batch {lo.batch_size}; {val_images} validation images"
            + (f"; {prior_images:,} class-prior images, each step with as many prior as instance images"
               if prior_images else ""),
            workers, _hours(train_s + val_wall * workers + prior_wall * prior_gpus),
            _hours(train_s / workers + val_wall + prior_wall), lo.use_gpu,
            f"{note(row)}; validation {note(val_row)}{prior_note}",
            {"folds": folds, "steps": steps, "images_processed": seen, "validation_images": val_images,
             "prior_images": prior_images}))

    g = cfg.generate
    gen_gpus = float(min(g.concurrency or n_gpus, n_gpus))
    gen_folds = g.folds if g.folds is not None else list(range(k))
    if "generate" in stages and ddpm is None:
        n = len(gen_folds) * len(classes) * g.images_per_class
        upper = len(gen_folds) * len(classes) * math.ceil(g.max_attempts_factor * g.images_per_class)
        rate, row = generation_rate(gpu_type, g.batched_pipeline, g.steps, g.width, g.height)
        seconds = n / rate
        plans.append(StagePlan(
            "generate", f"{len(gen_folds)} folds x {len(classes)} classes x {g.images_per_class} images = {n:,} "
            f"({upper:,} at most with quality-gate top-ups), {g.width}x{g.height}, {g.steps} steps",
            gen_gpus, _hours(seconds), _hours(seconds / gen_gpus), g.device != "cpu", note(row),
            {"images": n, "images_upper_bound": upper}))

    train_rate, predict_rate, train_row, predict_row = detector_rates(gpu_type, cfg.grid.detector.imgsz)
    if "label" in stages:
        lab = cfg.label
        folds = lab.folds if lab.folds is not None else gen_folds
        if lab.method == "teacher":
            det = lab.teacher.detector or cfg.grid.detector
            t_rate, p_rate, t_row, p_row = detector_rates(gpu_type, det.imgsz)
            trained = lab.teacher.source != "grid"  # auto may reuse grid weights: counted as trained (the bound)
            seen = sum(det.epochs * data.train[f] for f in folds) if trained else 0
            predicted = len(folds) * len(classes) * g.images_per_class
            per_fold = (seen / len(folds) / t_rate if trained else 0) + predicted / len(folds) / p_rate
            parallel = min(len(folds), n_gpus)  # one Ray task with one GPU per fold
            plans.append(StagePlan(
                "label", (f"teacher: {len(folds)} detector trainings x {det.epochs} epochs on the fold's real "
                          f"TRAIN images; " if trained else "teacher from the grid's weights; ")
                + f"boxes for {predicted:,} synthetic images", float(parallel),
                _hours(per_fold * len(folds)), _hours(per_fold * math.ceil(len(folds) / parallel)),
                lab.teacher.device != "cpu", f"{note(t_row)}; {note(p_row)}",
                {"images_seen": seen, "predicted": predicted}))
        else:
            ip = lab.inpaint
            per_class = ip.images_per_class or g.images_per_class
            n = len(folds) * len(classes) * per_class
            steps = max(1, round((ip.steps or g.steps) * ip.strength))  # img2img denoises strength x steps
            if lab.method == "inpaint_outpaint":  # step 2 is a second pipeline call on the same image
                steps += max(1, round((ip.steps or g.steps) * lab.outpaint.strength))
            rate, row = generation_rate(gpu_type, g.batched_pipeline, steps, g.width, g.height)
            plans.append(StagePlan(
                "label", f"{lab.method}: {n:,} images ({len(folds)} folds x {len(classes)} classes x {per_class}), "
                f"{steps} denoising steps each", gen_gpus, _hours(n / rate), _hours(n / rate / gen_gpus),
                g.device != "cpu", note(row), {"images": n}))

    if "evaluate" in stages:
        ev_folds = gen_folds
        real = sum(data.val[f] for f in ev_folds)
        synthetic = len(ev_folds) * len(classes) * g.images_per_class
        row = rows(gpu_type, "features")[0]
        seconds = (real + synthetic) / row.images_per_second
        plans.append(StagePlan(
            "evaluate", f"FID/KID/IS/CLIP features of {real:,} real validation + {synthetic:,} synthetic images",
            float(n_gpus), _hours(seconds), _hours(seconds / n_gpus), cfg.evaluate.device != "cpu", note(row),
            {"real_images": real, "synthetic_images": synthetic}))

    if "grid" in stages and cfg.run.task == "classify":
        gr = cfg.grid
        seeds = gr.seeds or [gr.seed if gr.seed is not None else cfg.run.seed]
        folds = gr.folds if gr.folds is not None else list(range(k))
        trials = len(folds) * len(gr.strategies) * len(seeds)
        plans.append(StagePlan(
            "grid", f"{trials} classifier trials ({gr.classifier.model}, {gr.classifier.epochs} epochs at "
            f"{gr.classifier.imgsz} px); not estimated: t2id/plan_throughput.py has no measured classifier rate",
            0, 0.0, 0.0, gr.gpus_per_trial > 0, "not measured", {"trials": trials}))
    elif "grid" in stages:
        gr = cfg.grid
        det = gr.detector
        folds = gr.folds if gr.folds is not None else list(range(k))
        seeds = gr.seeds or [gr.seed if gr.seed is not None else cfg.run.seed]
        trials = len(folds) * len(gr.strategies) * len(seeds)
        per_fold_seen = []
        for f in folds:
            if gr.budget.value is None:
                per_fold_seen.append(det.epochs * data.train[f])  # the fold's real TRAIN images per epoch
            elif gr.budget.unit == "images_seen":
                per_fold_seen.append(gr.budget.value)
            else:  # optimizer steps of max(batch, nominal_batch) images (ultralytics accumulates up to nbs)
                per_fold_seen.append(gr.budget.value * max(det.batch, det.nominal_batch))
        validations = det.epochs if det.validate_every_epoch else 1
        trial_s = [seen / train_rate + validations * data.val[f] / predict_rate for seen, f in zip(per_fold_seen, folds)]
        gpu_s = sum(trial_s) * len(gr.strategies) * len(seeds)
        share = gr.gpus_per_trial or 1.0  # a CPU grid is estimated as if each trial had a GPU
        concurrent = max(1, int(n_gpus / share + 1e-9))
        if gr.max_concurrent:
            concurrent = min(concurrent, gr.max_concurrent)
        # A trial on a GPU fraction runs at that fraction of the GPU's rate; trials go in waves.
        wall = math.ceil(trials / concurrent) * (sum(trial_s) / len(trial_s)) / share
        plans.append(StagePlan(
            "grid", f"{len(folds)} folds x {len(gr.strategies)} strategies x {len(seeds)} seed(s) = {trials} trials; "
            f"each {round(sum(per_fold_seen) / len(folds)):,} images seen ({det.epochs} epochs, {det.imgsz} px) "
            f"+ {validations} validation pass(es)", min(float(n_gpus), concurrent * share), _hours(gpu_s),
            _hours(wall), gr.gpus_per_trial > 0, f"{note(train_row)}; {note(predict_row)}",
            {"trials": trials, "images_seen_per_trial": per_fold_seen, "concurrent_trials": concurrent}))

    if "report" in stages:
        cpu_only("report", "Table II, significance tests, figures, HTML")

    order = {s: i for i, s in enumerate(("data", "split", "lora", "generate", "label", "evaluate", "grid", "report"))}
    plans.sort(key=lambda p: order[p.stage])
    return Plan(config=config_name, run_id=cfg.run.id, folds=k, target_classes=classes, gpu_type=gpu_type,
                gpus=n_gpus, gpus_source=gpus_source, dataset=data, stages=plans, throughputs=list(used.values()),
                price_per_gpu_hour=price_per_gpu_hour, tiny=cfg.lora.base_model == "tiny")


def ddpm_plans(cfg: T2IDConfig, data: Dataset, classes: list[str], stages: set[str]) -> list[StagePlan]:
    """lora.method ddpm: the lora and generate stages' work as counts (optimizer steps; UNet passes of sampling),
    not timed: t2id/plan_throughput.py has no measured UNet2DModel rate. A fold's rare images are taken as
    split evenly over the classes (each class trains its own model on its own images)."""
    from t2id.lora.ddpm import schedule

    lo, g, d = cfg.lora, cfg.generate, cfg.lora.ddpm
    assert d is not None
    folds = lo.folds if lo.folds is not None else list(range(cfg.split.folds))
    steps = []
    for f in folds:
        per_class = data.rare_train[f] // max(1, len(classes))
        try:
            steps.append(schedule(per_class, d, lo.num_workers).total_steps * len(classes))
        except ValueError as exc:
            raise UserError(f"lora (ddpm): fold {f} would train each class on ~{per_class} images: {exc}") from exc
    not_timed = "not estimated: t2id/plan_throughput.py has no measured DDPM (UNet2DModel) rate"
    out = [StagePlan("lora", f"ddpm: {len(folds)} folds x {len(classes)} classes, a UNet2DModel from scratch each "
                     f"({d.resolution} px, {d.epochs} epochs) = {sum(steps):,} steps of batch <= {d.batch_size}; "
                     f"{not_timed}", 0, 0.0, 0.0, lo.use_gpu, "not measured", {"folds": folds, "steps": steps})]
    if "generate" in stages:
        gen_folds = g.folds if g.folds is not None else list(range(cfg.split.folds))
        n = len(gen_folds) * len(classes) * g.images_per_class
        upper = len(gen_folds) * len(classes) * math.ceil(g.max_attempts_factor * g.images_per_class)
        out.append(StagePlan(
            "generate", f"ddpm: {n:,} images ({upper:,} at most with quality-gate top-ups) x {d.inference_steps} "
            f"UNet passes at {d.resolution} px = {n * d.inference_steps:,} passes; {not_timed}", 0, 0.0, 0.0,
            g.device != "cpu", "not measured",
            {"images": n, "images_upper_bound": upper, "unet_passes": n * d.inference_steps}))
    return out


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=1)
