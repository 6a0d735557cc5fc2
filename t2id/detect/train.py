"""Train one detector for one (fold, strategy) and return per-class metrics.

`detect(...)` is the pure core the grid stage wraps in a Ray Tune trainable:
  1. resolve the model (a model yaml with random init, or a local / s3:// weights file; never a download),
  2. turn the strategy into ultralytics hyperparameters (augment, class weights) + a sampler,
  3. train with `T2IDDetectionTrainer` (paper Sec. III-B: AdamW, lr 1e-3, wd 0.01, dropout 0.1),
  4. validate the FINAL model (last epoch; never best.pt, which is selected on the val fold) on the val
     fold, keeping every val image's predictions (conf >= 0.001, <= 300 per image): mAP50-95 / mAP50
     are computed from them with t2id.detect.coco_map, precision / recall and PR curves are ultralytics'.
`epoch_size` fixes the draws per epoch for every strategy (a compute budget, `budget_epoch_size`);
optimizer steps and images seen are counted during training.
`detect_on_store(...)` materializes the fold from the run store, calls `detect`, and writes the final
weights, the predictions and the metrics back under the grid's trial folder. `device` is ultralytics' spelling ('cpu', '0'):
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
from t2id.detect import predictions as preds
from t2id.detect.config import BudgetConfig, DetectorConfig, StrategySpec, resolve_strategy
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
    """Metrics of the final model on the val fold. Classes without val instances have NaN metrics."""

    strategy: str
    names: list[str]
    per_class: dict[str, dict[str, float]]
    overall: dict[str, float]
    pr_curves: dict[str, list[tuple[float, float]]]  # class -> (recall, precision) at IoU 0.5
    weights: Path  # the final model (last.pt)
    seconds: float
    val_instances: dict[str, int] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # predictions.parquet rows (t2id.detect.predictions)
    optimizer_steps: int = 0  # counted during training
    images_seen: int = 0  # counted during training (training images drawn, with repeats)
    epoch_size: int | None = None  # draws per epoch fixed by a budget (None: the strategy's own length)
    selection: str = "final"  # the reported model: the last epoch's, never one chosen on the val fold
    record: dict[str, Any] = field(default_factory=dict)  # detect_on_store: to_json() + store keys + budget

    @property
    def best_weights(self) -> Path:
        """The reported weights (the final model), under the name the label teacher reads."""
        return self.weights

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
            "optimizer_steps": int(self.optimizer_steps),
            "images_seen": int(self.images_seen),
            "epoch_size": self.epoch_size,
            "selection": self.selection,
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
        "conf": preds.CONF, "max_det": preds.MAX_DET,  # validation: what predictions.parquet keeps
        "pretrained": False, "amp": amp, "plots": False, "workers": workers, "seed": seed,
        "deterministic": True, "device": device, "project": str(out_dir), "name": "train", "exist_ok": True,
        "verbose": False, "cls_pw": 1.0 if strategy.class_weights else 0.0, **augment,
    }


def budget_epoch_size(budget: BudgetConfig, n_real: int, detector: DetectorConfig) -> tuple[int, int]:
    """(the trial's budget in `budget.unit`, draws per epoch) for a fold with `n_real` real training images.

    Every strategy of a fold gets the same draws per epoch, so the same batches and optimizer steps
    (ultralytics steps once per `accumulate = round(nominal_batch / batch)` batches).
    """
    if n_real <= 0:
        raise UserError("the fold has no real training images to size the compute budget from.")
    epochs, batch = detector.epochs, detector.batch
    accumulate = max(round(detector.nominal_batch / batch), 1)
    if budget.unit == "images_seen":
        value = budget.value if budget.value is not None else n_real * epochs
        return value, max(math.ceil(value / epochs), 1)
    value = budget.value if budget.value is not None else math.ceil(epochs * math.ceil(n_real / batch) / accumulate)
    return value, max(math.ceil(value * accumulate / epochs), 1) * batch


def detect(data_yaml: Path, strategy: StrategySpec, detector: DetectorConfig, out_dir: Path, seed: int,
           device: str = "cpu", workers: int = 0, epoch_size: int | None = None) -> DetectResult:
    """Train one detector on data_yaml's train split with `strategy` (`epoch_size` draws per epoch when
    given); metrics and per-image predictions of the final model on its val split."""
    strategy = resolve_strategy(strategy)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(detector.model, out_dir)
    if (out_dir / "train").exists():  # never report a stale best.pt of an earlier, interrupted run
        shutil.rmtree(out_dir / "train")
    overrides = train_overrides(Path(data_yaml), strategy, detector, model, out_dir, seed, device, workers)
    start = time.perf_counter()
    trainer = T2IDDetectionTrainer(overrides=overrides, sampling=strategy.sampling,
                                   rfs_threshold=strategy.rfs_threshold, cas_epoch_size=strategy.cas_epoch_size,
                                   epoch_size=epoch_size)
    trainer.train()
    seconds = time.perf_counter() - start
    if not trainer.last.exists():
        raise RuntimeError(f"training finished without {trainer.last}")
    result = collect_result(trainer, strategy.name, seconds)
    result.epoch_size = epoch_size
    return result


def prediction_rows(trainer: T2IDDetectionTrainer) -> list[dict[str, Any]]:
    """predictions.parquet rows: every val image, its label-file boxes and the final model's detections."""
    rows = []
    for label in trainer.validator.dataloader.dataset.labels:
        file = str(label["im_file"])
        classes = np.asarray(label["cls"]).reshape(-1).astype(int)
        boxes = np.asarray(label["bboxes"], dtype=np.float64).reshape(-1, 4)  # normalized xywh, as in the file
        gt = [{"class_id": int(c), "x": float(b[0]), "y": float(b[1]), "w": float(b[2]), "h": float(b[3])}
              for c, b in zip(classes, boxes, strict=True)]
        rows.append({"image_id": Path(file).stem, "gt": gt,
                     "pred": trainer.val_records.get(file, {}).get("pred", [])})
    return rows


def collect_result(trainer: T2IDDetectionTrainer, strategy: str, seconds: float) -> DetectResult:
    """Metrics of the trainer's last validation (the final model, after final_eval): mAP50-95 / mAP50 from
    its recorded per-image predictions (t2id.detect.coco_map), precision / recall and PR curves ultralytics'."""
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
    rows = prediction_rows(trainer)
    coco = preds.coco_map(preds.table(rows), len(names))
    overall.update(map50_95=coco.map50_95, map50=coco.map50)
    for i, name in enumerate(names):
        per_class[name].update(map50_95=coco.per_class[i][0], map50=coco.per_class[i][1])
    return DetectResult(strategy=strategy, names=names, per_class=per_class, overall=overall, pr_curves=pr_curves,
                        weights=Path(trainer.last), seconds=seconds, val_instances=val_instances, predictions=rows,
                        optimizer_steps=trainer.optimizer_steps, images_seen=trainer.images_seen)


def detect_on_store(run_store, fold: int, strategy: StrategySpec | str, detector: DetectorConfig, cache_dir: Path,
                    seed: int, synthetic=None, device: str = "cpu", workers: int = 0,
                    budget: BudgetConfig | None = None, synthetic_store=None) -> DetectResult:
    """Materialize `fold` from the run store, train, and write the final weights, the per-image
    predictions and the metrics back under the grid's trial folder of (fold, strategy, seed).

    `budget` (default: BudgetConfig(), equal images seen = the fold's real training images x epochs)
    fixes the draws per epoch from the fold's REAL training images, whatever the strategy. A strategy
    with synthetic=True needs the run's labelled synthetic rows (`synthetic`, a pyarrow table); other
    strategies ignore them. `synthetic_store` is the store their image keys resolve in (default: the run
    store; another run's store for a strategy with synthetic_from).
    """
    from t2id.data.materialize import materialize_fold

    strategy = resolve_strategy(strategy)
    budget = BudgetConfig() if budget is None else budget
    if strategy.synthetic and synthetic is None:
        raise UserError(f"strategy {strategy.name!r} trains on synthetic images but none were given for fold "
                        f"{fold}: run the generate and label stages first ({layout.label.labels(fold)}).")
    cache_dir = Path(cache_dir)
    fold_data = materialize_fold(run_store, fold, cache_dir, synthetic=synthetic if strategy.synthetic else None,
                                 synthetic_store=synthetic_store)
    n_real = len(fold_data.train_ids) - len(fold_data.synthetic_ids)
    budget_value, epoch_size = budget_epoch_size(budget, n_real, detector)
    work = cache_dir / "detect" / layout.grid.trial(fold, strategy.name, seed).replace("/", "_")
    result = detect(fold_data.data_yaml, strategy, detector, work, seed, device=device, workers=workers,
                    epoch_size=epoch_size)
    weights_key = layout.grid.weights(fold, strategy.name, seed)
    predictions_key = layout.grid.predictions(fold, strategy.name, seed)
    run_store.write_file(weights_key, result.weights)
    run_store.write_table(predictions_key, preds.table(result.predictions))
    payload = {"fold": int(fold), "seed": int(seed), **result.to_json(), "weights": weights_key,
               "predictions": predictions_key, "budget_unit": budget.unit, "budget": int(budget_value),
               "n_real_train": n_real, "n_synthetic_train": len(fold_data.synthetic_ids)}
    run_store.write_text(layout.grid.trial_metrics(fold, strategy.name, seed), json.dumps(payload, indent=2))
    result.record = payload  # what the grid publishes for this trial
    return result
