"""ultralytics integration: a DetectionTrainer whose train loader draws from t2id's samplers.

Extension by subclassing only (STYLE.md item 7), nothing in ultralytics is patched:

- `SampledYOLODataset(YOLODataset)`: the train dataset. Its mosaic/mixup/cutmix/copy-paste partner
  images are drawn from the sampler's per-image distribution (`EpochSampler.marginal()`), because
  ultralytics draws the other three mosaic tiles uniformly, which would dilute any sampler
  (with CAS and mosaic, 3 of 4 tiles would otherwise be plain uniform draws).
- `T2IDDetectionTrainer(DetectionTrainer)`: overrides the train dataloader (sampler + dataset above;
  validation keeps ultralytics' standard unsampled loader), and three offline/isolation hooks:
  `get_dataset` reads the data.yaml itself (ultralytics' `check_det_dataset` fetches Arial.ttf),
  `final_eval` validates best.pt through the in-training validator path (the standalone path
  re-runs `check_det_dataset`), and integration callbacks (Ray Tune reporting, platform, events,
  loggers) are dropped so ultralytics never reports into a Ray Tune session that t2id controls.
"""

from __future__ import annotations

import random
from copy import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from ultralytics.data.augment import Compose, CopyPaste, CutMix, MixUp, Mosaic
from ultralytics.data.build import InfiniteDataLoader, seed_worker
from ultralytics.data.dataset import YOLODataset
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK, colorstr, ops
from ultralytics.utils.torch_utils import strip_optimizer, torch_distributed_zero_first, unwrap_model

from t2id.detect.samplers import CASSampler, EpochSampler, RFSSampler, UniformSampler
from t2id.errors import UserError
from t2id.tracking import detector_epoch

# ultralytics' own callbacks are no-ops in this module; every other ultralytics callback module is an
# integration (raytune, platform, events, tensorboard, mlflow, ...) that t2id does not want.
_BASE_CALLBACKS_MODULE = "ultralytics.utils.callbacks.base"


def is_integration_callback(callback: Callable) -> bool:
    """True for ultralytics integration callbacks (Ray Tune, platform, analytics events, loggers)."""
    module = getattr(callback, "__module__", "") or ""
    return module.startswith("ultralytics.") and module != _BASE_CALLBACKS_MODULE


# ----------------------------------------------------------------------------------------------
# Dataset: mosaic/mixup partners follow the sampler
# ----------------------------------------------------------------------------------------------

# ultralytics' mix transforms with partner images from `dataset.draw_partners` instead of uniform draws.
# Each is built through its own constructor, with the arguments ultralytics chose for the transform it
# stands in for (`like`), so nothing depends on a transform's private state.

class SampledMosaic(Mosaic):
    def get_indexes(self) -> list[int]:
        return self.dataset.draw_partners(self.n - 1)

    @classmethod
    def like(cls, mosaic: Mosaic, pre_transform: Any = None) -> SampledMosaic:
        return cls(mosaic.dataset, imgsz=mosaic.imgsz, p=mosaic.p, n=mosaic.n)


class SampledMixUp(MixUp):
    def get_indexes(self) -> int:
        return self.dataset.draw_partners(1)[0]

    @classmethod
    def like(cls, mixup: MixUp, pre_transform: Any = None) -> SampledMixUp:
        return cls(mixup.dataset, pre_transform=pre_transform, p=mixup.p)


class SampledCutMix(CutMix):
    def get_indexes(self) -> int:
        return self.dataset.draw_partners(1)[0]

    @classmethod
    def like(cls, cutmix: CutMix, pre_transform: Any = None) -> SampledCutMix:
        return cls(cutmix.dataset, pre_transform=pre_transform, p=cutmix.p, beta=cutmix.beta,
                   num_areas=cutmix.num_areas)


class SampledCopyPaste(CopyPaste):
    def get_indexes(self) -> int:
        return self.dataset.draw_partners(1)[0]

    @classmethod
    def like(cls, copy_paste: CopyPaste, pre_transform: Any = None) -> SampledCopyPaste:
        return cls(copy_paste.dataset, pre_transform=pre_transform, p=copy_paste.p, mode=copy_paste.mode)


_SAMPLED_TRANSFORMS: dict[type, Any] = {
    Mosaic: SampledMosaic, MixUp: SampledMixUp, CutMix: SampledCutMix, CopyPaste: SampledCopyPaste,
}


def with_sampled_partners(transform: Any, built: dict[int, Any] | None = None) -> Any:
    """The same pipeline with every mix transform (at any depth of nested Composes, including mix
    transforms' own pre_transforms) replaced by its sampled counterpart.

    Shared sub-pipelines stay shared (MixUp's pre_transform is the very Compose of the first stage):
    `built` maps each original object to its replacement.
    """
    built = {} if built is None else built
    if id(transform) in built:
        return built[id(transform)]
    if isinstance(transform, Compose):
        built[id(transform)] = transform
        transform.transforms = [with_sampled_partners(t, built) for t in transform.transforms]
        return transform
    sampled = _SAMPLED_TRANSFORMS.get(type(transform))
    if sampled is None:
        built[id(transform)] = transform
        return transform
    pre = getattr(transform, "pre_transform", None)
    new = sampled.like(transform, None if pre is None else with_sampled_partners(pre, built))
    built[id(transform)] = new
    return new


class SampledYOLODataset(YOLODataset):
    """YOLODataset whose mix-augmentation partners are drawn with the sampler's per-image probabilities.

    The probabilities (`set_partner_probs`, from `EpochSampler.marginal()`; uniform until set) drive
    every extra tile. Draws use Python's `random`, which ultralytics seeds per run and per worker.
    `primary_draws` / `partner_draws` count how often each image was loaded as the main image / as a
    partner (per process: exact with workers=0), so tests and diagnostics can see what was trained on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._partner_cdf: np.ndarray | None = None
        super().__init__(*args, **kwargs)
        self.primary_draws = np.zeros(len(self), dtype=np.int64)
        self.partner_draws = np.zeros(len(self), dtype=np.int64)

    def set_partner_probs(self, probs: np.ndarray) -> None:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.shape != (len(self),) or probs.min() < 0 or not probs.sum() > 0:
            raise ValueError(f"partner probabilities must be {len(self)} non-negative values with a positive sum")
        self._partner_cdf = np.cumsum(probs / probs.sum())

    def draw_partners(self, k: int) -> list[int]:
        if self._partner_cdf is None:
            picks = [random.randrange(len(self)) for _ in range(k)]
        else:
            u = np.array([random.random() for _ in range(k)])
            picks = np.minimum(np.searchsorted(self._partner_cdf, u, side="right"), len(self) - 1).tolist()
        np.add.at(self.partner_draws, picks, 1)
        return picks

    def build_transforms(self, hyp: Any = None) -> Compose:
        # ultralytics composes the pipeline (v8_transforms, also after close_mosaic); the mix steps in it
        # are then built again as their sampled subclasses.
        return with_sampled_partners(super().build_transforms(hyp))

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.primary_draws[index] += 1
        return super().__getitem__(index)


# ----------------------------------------------------------------------------------------------
# data.yaml without ultralytics' check_det_dataset (which fetches fonts)
# ----------------------------------------------------------------------------------------------

def load_data_yaml(data_yaml: str | Path) -> dict[str, Any]:
    """Read an ultralytics data.yaml (path/train/val/names) into the dict the trainer expects, offline."""
    file = Path(data_yaml)
    if not file.is_file():
        raise UserError(f"data.yaml {file} does not exist: materialize the fold first.")
    data = yaml.safe_load(file.read_text()) or {}
    missing = [k for k in ("train", "val", "names") if not data.get(k)]
    if missing:
        raise UserError(f"{file} lacks {', '.join(missing)}: a YOLO data.yaml needs train, val and names.")
    names = data["names"]
    names = dict(enumerate(names)) if isinstance(names, list) else {int(k): str(v) for k, v in names.items()}
    root = Path(data.get("path") or file.parent)
    if not root.is_absolute():
        root = (file.parent / root).resolve()
    for key in ("train", "val", "test"):
        if not data.get(key):
            continue
        paths = [data[key]] if isinstance(data[key], str) else list(data[key])
        resolved = [(root / p).resolve() for p in paths]
        for p in resolved:
            if not p.exists():
                raise UserError(f"{file}: {key} path {p} does not exist; fix the data.yaml or rematerialize the fold.")
        data[key] = str(resolved[0]) if len(resolved) == 1 else [str(p) for p in resolved]
    data.update(names=names, nc=len(names), channels=int(data.get("channels", 3)), path=root, yaml_file=str(file))
    return data


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------

class RecordingValidator(DetectionValidator):
    """DetectionValidator that, while `records` is a dict, keeps every validation image's ground truth and
    predictions (the post-NMS detections the metrics see: conf >= args.conf, at most args.max_det)
    in YOLO-normalized centre format of the original image, keyed by image file."""

    records: dict[str, dict[str, list]] | None = None

    def update_metrics(self, preds: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
        if self.records is not None:
            for si, pred in enumerate(preds):
                pbatch = self._prepare_batch(si, batch)
                scaled = self.scale_preds({k: v.clone() for k, v in pred.items()}, pbatch)
                h, w = (float(v) for v in pbatch["ori_shape"][:2])
                boxes = ops.xyxy2xywh(scaled["bboxes"].float()).cpu().numpy() / np.array([w, h, w, h])
                conf = scaled["conf"].float().cpu().numpy()
                cls = scaled["cls"].cpu().numpy().astype(np.int64)
                order = np.argsort(-conf, kind="stable")[: int(self.args.max_det)]
                self.records[str(pbatch["im_file"])] = {
                    "pred": [{"class_id": int(cls[i]), "x": float(boxes[i, 0]), "y": float(boxes[i, 1]),
                              "w": float(boxes[i, 2]), "h": float(boxes[i, 3]), "conf": float(conf[i])}
                             for i in order]}
        super().update_metrics(preds, batch)


class T2IDDetectionTrainer(DetectionTrainer):
    """DetectionTrainer with t2id's train sampler; everything else is ultralytics' own.

    `epoch_size` (draws per epoch, from a compute budget) puts every strategy on a fixed-length sampler,
    the unsampled ones on `UniformSampler`; None keeps ultralytics' shuffle for sampling "none" and
    the samplers' default lengths. `optimizer_steps` and `images_seen` count what training did.
    """

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict[str, Any] | None = None,
                 _callbacks: dict | None = None, *, sampling: str = "none", rfs_threshold: float = 0.5,
                 cas_epoch_size: int | None = None, epoch_size: int | None = None) -> None:
        if sampling not in {"none", "rfs", "cas"}:
            raise UserError(f"unknown sampling {sampling!r}: use none, rfs or cas.")
        if epoch_size is not None and epoch_size <= 0:
            raise UserError(f"epoch size must be > 0 draws, got {epoch_size}.")
        self.sampling = sampling
        self.rfs_threshold = rfs_threshold
        self.cas_epoch_size = cas_epoch_size
        self.epoch_size = epoch_size
        self.train_sampler: EpochSampler | None = None
        self.optimizer_steps = 0
        self.images_seen = 0
        self.val_records: dict[str, dict[str, list]] = {}
        super().__init__(cfg, overrides, _callbacks)
        if self.ddp:
            # ultralytics' DDP relaunches the trainer class from pickled overrides and loses `sampling`.
            raise UserError(f"device {self.args.device!r} selects several GPUs; t2id trains one detector per "
                            "device (run folds/strategies as parallel trials instead).")
        for event, funcs in self.callbacks.items():  # also reaches the validator, which shares this dict
            self.callbacks[event] = [f for f in funcs if not is_integration_callback(f)]
        self.add_callback("on_train_epoch_start", _sync_sampler_epoch)
        self.add_callback("on_fit_epoch_end", detector_epoch)  # logs to the grid trial's MLflow run, if any

    @property
    def uses_sampler(self) -> bool:
        return self.sampling != "none" or self.epoch_size is not None

    def run_callbacks(self, event: str) -> None:
        # BaseTrainer.__init__ runs on_pretrain_routine_start right after adding integrations: filter here too.
        for callback in self.callbacks.get(event, []):
            if not is_integration_callback(callback):
                callback(self)

    def get_dataset(self) -> dict[str, Any]:
        data = load_data_yaml(self.args.data)
        if self.args.single_cls:
            data.update(names={0: "item"}, nc=1)
        return data

    def get_validator(self) -> RecordingValidator:
        return RecordingValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args),
                                  _callbacks=self.callbacks)

    def preprocess_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.images_seen += int(len(batch["img"]))  # counted, not assumed: every image a forward pass sees
        return super().preprocess_batch(batch)

    def optimizer_step(self) -> None:
        self.optimizer_steps += 1
        super().optimizer_step()

    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None):
        if mode != "train" or not self.uses_sampler:
            return super().build_dataset(img_path, mode, batch)
        stride = max(int(unwrap_model(self.model).stride.max()), 32)
        # The arguments ultralytics' build_yolo_dataset passes for a train split.
        return SampledYOLODataset(
            img_path=img_path, imgsz=self.args.imgsz, batch_size=batch, augment=True, hyp=self.args,
            rect=self.args.rect, cache=self.args.cache or None, single_cls=self.args.single_cls or False,
            stride=stride, pad=0.0, prefix=colorstr("train: "), task=self.args.task, classes=self.args.classes,
            data=self.data, fraction=self.args.fraction,
        )

    def build_sampler(self, dataset: YOLODataset, rank: int) -> EpochSampler:
        image_classes = [np.asarray(label["cls"], dtype=np.int64).ravel() for label in dataset.labels]
        shard = {"num_replicas": max(self.world_size, 1), "rank": max(rank, 0)} if rank != -1 else \
            {"num_replicas": 1, "rank": 0}
        if self.sampling == "none":
            return UniformSampler(len(dataset), seed=self.args.seed, epoch_size=self.epoch_size, **shard)
        if self.sampling == "rfs":
            return RFSSampler(image_classes, self.rfs_threshold, seed=self.args.seed,
                              num_classes=self.data["nc"], epoch_size=self.epoch_size, **shard)
        size = self.epoch_size if self.epoch_size is not None else self.cas_epoch_size
        return CASSampler(image_classes, seed=self.args.seed, epoch_size=size, num_classes=self.data["nc"], **shard)

    def get_dataloader(self, dataset_path: str, batch_size: int = 16, rank: int = 0, mode: str = "train"):
        if mode != "train" or not self.uses_sampler:
            return super().get_dataloader(dataset_path, batch_size, rank, mode)
        with torch_distributed_zero_first(rank):
            dataset = self.build_dataset(dataset_path, mode, batch_size)
        if getattr(dataset, "rect", False):
            raise UserError("rect=True orders images by aspect ratio and cannot be combined with rfs/cas sampling.")
        sampler = self.build_sampler(dataset, rank)
        dataset.set_partner_probs(sampler.marginal())
        self.train_sampler = sampler
        batch = min(batch_size, len(sampler))
        # Same loader settings as ultralytics' build_dataloader, with our sampler instead of shuffle.
        workers = min(self.args.workers, max(0, -(-len(sampler) // max(batch, 1)) - 1))
        generator = torch.Generator()
        generator.manual_seed(6148914691236517205 + RANK + self.args.seed)
        LOGGER.info(f"{colorstr('t2id:')} {self.sampling} sampler, {len(sampler)} draws per epoch "
                    f"for {len(dataset)} train images")
        return InfiniteDataLoader(
            dataset=dataset, batch_size=batch, shuffle=False, sampler=sampler, num_workers=workers,
            prefetch_factor=4 if workers > 0 else None, pin_memory=self.device.type == "cuda",
            collate_fn=getattr(dataset, "collate_fn", None), worker_init_fn=seed_worker, generator=generator,
            drop_last=bool(self.args.compile) and len(sampler) > batch,
        )

    def final_eval(self) -> None:
        """Validate the FINAL model (last.pt: the last epoch's EMA weights), never best.pt: best.pt is chosen
        by fitness on the validation fold, and metrics reported on that same fold would be selected on it.
        Runs through the in-training validator path (offline) and records every validation image's
        predictions (`val_records`)."""
        if RANK not in {-1, 0} or not self.last.exists():
            return
        strip_optimizer(self.last)
        final_model, _ = load_checkpoint(self.last, device=self.device)
        final_model.args = self.args  # the validation loss reads hyperparameters as attributes
        LOGGER.info(f"\nValidating {self.last} (final model)...")
        trained_ema = self.ema.ema
        self.ema.ema = final_model.float()
        self.validator.records = self.val_records = {}
        try:
            self.metrics = self.validator(self)
        finally:
            self.ema.ema = trained_ema
            self.validator.records = None
        self.metrics.pop("fitness", None)


def _sync_sampler_epoch(trainer: T2IDDetectionTrainer) -> None:
    # ultralytics calls set_epoch only under DDP; this keeps resumed runs on the right epoch too.
    if trainer.train_sampler is not None:
        trainer.train_sampler.set_epoch(trainer.epoch)
