"""Train one detector for one (fold, strategy) and return per-class metrics.

`detect(...)` is the pure core the grid stage wraps in a Ray Tune trainable:
  1. resolve the model (a model yaml with random init, or a local / s3:// weights file; never a download),
  2. turn the strategy into ultralytics hyperparameters (augment, class weights) + a sampler,
  3. train with `T2IDDetectionTrainer` (paper Sec. III-B: AdamW, lr 1e-3, wd 0.01, dropout 0.1),
  4. read per-class mAP50-95 / mAP50 / precision / recall and PR curves of best.pt on the val fold.
`detect_on_store(...)` materializes the fold from the run store, calls `detect`, and writes best
weights + metrics back under the grid's trial folder. `device` is ultralytics' spelling ('cpu', '0'):
callers choose it with t2id.devices.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2id import layout
from t2id.detect.config import DetectorConfig, StrategySpec, resolve_strategy
from t2id.detect.trainer import T2IDDetectionTrainer
from t2id.errors import UserError

METRIC_NAMES = ("map50_95", "map50", "precision", "recall")
PR_POINTS = 101  # recall grid 0, 0.01, ..., 1 for the stored PR curves

# mosaic+mixup as in YOLOv9's hyp.scratch-high.yaml (mosaic 1.0, mixup 0.15), the paper's detector family.
_AUGMENT = {
    "plain": {"mosaic": 0.0, "mixup": 0.0, "cutmix": 0.0, "copy_paste": 0.0, "close_mosaic": 0},
    "mosaic_mixup": {"mosaic": 1.0, "mixup": 0.15, "cutmix": 0.0, "copy_paste": 0.0},
    "default": {},
}


@dataclass
class DetectResult:
    """Metrics of best.pt on the val fold. Classes without val instances have NaN metrics."""

    strategy: str
    names: list[str]
    per_class: dict[str, dict[str, float]]
    overall: dict[str, float]
    pr_curves: dict[str, list[tuple[float, float]]]  # class -> (recall, precision) at IoU 0.5
    best_weights: Path
    seconds: float
    val_instances: dict[str, int] = field(default_factory=dict)

    def to_rows(self, fold: int) -> list[dict[str, Any]]:
        """One row per class, plus one row with class 'all' holding the overall (mean) metrics."""
        rows = [
            {"fold": int(fold), "strategy": self.strategy, "class_id": i, "class_name": name,
             **self.per_class[name], "val_instances": self.val_instances.get(name, 0)}
            for i, name in enumerate(self.names)
        ]
        rows.append({"fold": int(fold), "strategy": self.strategy, "class_id": -1, "class_name": "all",
                     **self.overall, "val_instances": sum(self.val_instances.values())})
        return rows

    def to_json(self) -> dict[str, Any]:
        def clean(value: float) -> float | None:  # JSON has no NaN
            return None if value is None or math.isnan(value) else float(value)

        return {
            "strategy": self.strategy,
            "names": self.names,
            "per_class": {c: {k: clean(v) for k, v in m.items()} for c, m in self.per_class.items()},
            "overall": {k: clean(v) for k, v in self.overall.items()},
            "pr_curves": {c: [[r, p] for r, p in pts] for c, pts in self.pr_curves.items()},
            "val_instances": self.val_instances,
            "seconds": self.seconds,
        }


def resolve_model(model: str, cache_dir: Path) -> str:
    """A model yaml (ultralytics built-in name or local file) or a local weights path; s3:// weights are
    copied into cache_dir. Anything that would make ultralytics download is a UserError."""
    if model.endswith((".yaml", ".yml")):
        from ultralytics.nn.tasks import yaml_model_load

        try:
            yaml_model_load(model)
        except (FileNotFoundError, OSError) as exc:
            raise UserError(f"detector.model {model!r} is neither a local model yaml nor an ultralytics built-in "
                            "one (e.g. yolov9s.yaml, yolov8n.yaml).") from exc
        return model
    if model.startswith("s3://"):
        from t2id.store import open_store

        parent, name = model.rsplit("/", 1)
        store = open_store(parent)
        if not store.exists(name):
            raise UserError(f"detector.model {model} does not exist: upload the weights there or fix the URI.")
        local = cache_dir / "init_weights" / name
        if not local.exists():
            store.read_file(name, local)
        return str(local)
    path = Path(model).expanduser()
    if not path.suffix:
        raise UserError(f"detector.model {model!r} is a bare name that ultralytics would download: name a model "
                        "yaml (e.g. yolov9s.yaml, random init) or a local .pt weights file.")
    if not path.is_file():
        raise UserError(f"detector.model weights file {path} does not exist: t2id never downloads weights; "
                        "copy the file there or use a model yaml (e.g. yolov9s.yaml) for random init.")
    return str(path.resolve())


def train_overrides(data_yaml: Path, strategy: StrategySpec, detector: DetectorConfig, model: str,
                    out_dir: Path, seed: int, device: str, workers: int) -> dict[str, Any]:
    """The ultralytics arguments of one run (paper Sec. III-B plus the strategy's augment/loss settings)."""
    augment = dict(_AUGMENT[strategy.augment])
    if strategy.augment == "mosaic_mixup":
        # ultralytics' default turns mosaic off for the last 10 epochs; keep that at the paper's 100 epochs
        # (last 10%) and scale it for short runs so mosaic is actually used.
        augment["close_mosaic"] = detector.epochs // 10
    cuda = device not in {"cpu", "mps"} and torch.cuda.is_available()
    # AMP: fp16 AMP runs ultralytics' check_amp, which downloads yolo26n.pt; bf16 skips it.
    amp: bool | str = "bf16" if cuda and torch.cuda.is_bf16_supported() else False
    return {
        "model": model, "data": str(data_yaml), "task": "detect", "mode": "train",
        "imgsz": detector.imgsz, "epochs": detector.epochs, "batch": detector.batch,
        "optimizer": "AdamW", "lr0": detector.lr, "weight_decay": detector.weight_decay,
        "warmup_epochs": detector.warmup_epochs, "nbs": detector.nominal_batch,
        "val": detector.validate_every_epoch,
        "dropout": detector.dropout,  # note: ultralytics applies dropout in classification heads only
        "pretrained": False, "amp": amp, "plots": False, "workers": workers, "seed": seed,
        "deterministic": True, "device": device, "project": str(out_dir), "name": "train", "exist_ok": True,
        "verbose": False, "cls_pw": 1.0 if strategy.class_weights else 0.0, **augment,
    }


def detect(data_yaml: Path, strategy: StrategySpec, detector: DetectorConfig, out_dir: Path, seed: int,
           device: str = "cpu", workers: int = 0) -> DetectResult:
    """Train one detector on data_yaml's train split with `strategy`; metrics of best.pt on its val split."""
    strategy = resolve_strategy(strategy)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(detector.model, out_dir)
    if (out_dir / "train").exists():  # never report a stale best.pt of an earlier, interrupted run
        shutil.rmtree(out_dir / "train")
    overrides = train_overrides(Path(data_yaml), strategy, detector, model, out_dir, seed, device, workers)
    start = time.perf_counter()
    trainer = T2IDDetectionTrainer(overrides=overrides, sampling=strategy.sampling,
                                   rfs_threshold=strategy.rfs_threshold, cas_epoch_size=strategy.cas_epoch_size)
    trainer.train()
    seconds = time.perf_counter() - start
    if not trainer.best.exists():
        raise RuntimeError(f"training finished without {trainer.best}")
    return collect_result(trainer, strategy.name, seconds)


def collect_result(trainer: T2IDDetectionTrainer, strategy: str, seconds: float) -> DetectResult:
    """Per-class metrics and PR curves of the trainer's last validation (best.pt after final_eval)."""
    metrics = trainer.validator.metrics  # ultralytics DetMetrics
    names = [trainer.data["names"][i] for i in range(trainer.data["nc"])]
    nan = float("nan")
    per_class = {name: dict.fromkeys(METRIC_NAMES, nan) for name in names}
    pr_curves: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    box = metrics.box
    recall_grid = np.linspace(0, 1, 1000)
    pick = np.linspace(0, 999, PR_POINTS).round().astype(int)
    prec_values = np.asarray(box.prec_values) if len(box.ap_class_index) else np.zeros((0, 1000))
    for row, class_id in enumerate(box.ap_class_index):
        name = names[int(class_id)]
        precision, recall, map50, map50_95 = box.class_result(row)
        per_class[name] = {"map50_95": float(map50_95), "map50": float(map50),
                           "precision": float(precision), "recall": float(recall)}
        if row < len(prec_values):
            pr_curves[name] = [(float(recall_grid[i]), float(prec_values[row][i])) for i in pick]
    mp, mr, map50, map50_95 = metrics.mean_results()
    overall = {"map50_95": float(map50_95), "map50": float(map50), "precision": float(mp), "recall": float(mr)}
    counts = metrics.nt_per_class if metrics.nt_per_class is not None else np.zeros(len(names), dtype=int)
    val_instances = {name: int(counts[i]) if i < len(counts) else 0 for i, name in enumerate(names)}
    return DetectResult(strategy=strategy, names=names, per_class=per_class, overall=overall, pr_curves=pr_curves,
                        best_weights=Path(trainer.best), seconds=seconds, val_instances=val_instances)


def detect_on_store(run_store, fold: int, strategy: StrategySpec | str, detector: DetectorConfig, cache_dir: Path,
                    seed: int, synthetic=None, device: str = "cpu", workers: int = 0) -> DetectResult:
    """Materialize `fold` from the run store, train, and write the best weights + metrics back.

    The keys are the grid's (`layout.grid.weights` / `trial_metrics` of (fold, strategy)). A strategy
    with synthetic=True needs the run's labelled synthetic rows (`synthetic`, a pyarrow table); other
    strategies ignore them.
    """
    from t2id.data.materialize import materialize_fold

    strategy = resolve_strategy(strategy)
    if strategy.synthetic and synthetic is None:
        raise UserError(f"strategy {strategy.name!r} trains on synthetic images but none were given for fold "
                        f"{fold}: run the generate and label stages first ({layout.label.labels(fold)}).")
    weights_key = layout.grid.weights(fold, strategy.name)
    cache_dir = Path(cache_dir)
    fold_data = materialize_fold(run_store, fold, cache_dir, synthetic=synthetic if strategy.synthetic else None)
    work = cache_dir / "detect" / layout.grid.trial(fold, strategy.name).replace("/", "_")
    result = detect(fold_data.data_yaml, strategy, detector, work, seed, device=device, workers=workers)
    run_store.write_file(weights_key, result.best_weights)
    payload = {"fold": int(fold), **result.to_json(), "best_weights": weights_key}
    run_store.write_text(layout.grid.trial_metrics(fold, strategy.name), json.dumps(payload, indent=2))
    return result
