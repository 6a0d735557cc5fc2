"""One classifier trial: train on a fold's train part (+ synthetic images) with a strategy, report the FINAL model.

The strategy axes are the detector's (t2id.detect.config.StrategySpec), with the same maths:
  - sampling: none (uniform), rfs, cas: the detector's samplers (t2id.detect.samplers) over one class
    per image. RFS (LVIS): r_c = max(1, sqrt(t / f_c)), f_c the fraction of images of class c; CAS (Shen et
    al.): a class uniformly, then an image of it, cycling a shuffled per-class list;
  - class_weights: cross-entropy weighted by inverse class frequency of the images the trial trains on,
    w_c = N / (K_present * n_c) (mean weight 1 over images), as the lung-ultrasound study weights its
    classes (papers/lung-ultrasound-textual-inversion-ddpm.txt); a class absent from training gets 0;
  - synthetic: the fold's kept generated images join the training pool, each labelled with the class its
    prompt asked for (label_source "prompt": there are no boxes to check, nothing to label).
  - augment: classification has none of the detector's (mosaic/mixup); only `plain` is accepted
    (t2id.classify.config); every strategy gets the classifier's own augmentation (grid.classifier.hflip, jitter).
Equal budget (grid.budget): every strategy's epoch draws the same number of images, from the fold's REAL
training image count (synthetic images are not counted), so all strategies see the same images in number
and take the same optimizer steps. No checkpoint is selected on the validation images: the metrics are the
last epoch's (`selection: final`).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from t2id.classify.config import ClassifierConfig
from t2id.classify.importer import image_label
from t2id.classify.metrics import classification_metrics
from t2id.classify.models import build_classifier
from t2id.detect.config import BudgetConfig, StrategySpec
from t2id.detect.samplers import CASSampler, EpochSampler, RFSSampler, UniformSampler
from t2id.errors import UserError

# ImageNet statistics: what torchvision's pretrained weights expect; harmless from scratch.
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class FoldImages:
    """A fold's images as uint8 tensors [N, 3, S, S] with their class ids."""

    train: torch.Tensor
    train_labels: np.ndarray
    val: torch.Tensor
    val_labels: np.ndarray
    val_ids: list[str]
    n_real: int  # real training images (the budget's unit); the rest of `train` is synthetic


def decode(data: bytes, size: int) -> torch.Tensor:
    """Image bytes -> uint8 [3, size, size] (grey replicated to RGB, bilinear resize)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(store, uris: list[str], size: int) -> torch.Tensor:
    if not uris:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return torch.stack([decode(store.read_bytes(store.key_of(uri)), size) for uri in uris])


def fold_images(store, fold: int, size: int, synthetic: pa.Table | None = None, synthetic_store=None) -> FoldImages:
    """The fold's real train and val images from the run's store, plus kept synthetic rows (class = class_id)
    whose images resolve in `synthetic_store` (default: the run's store)."""
    from t2id.data.manifest import load_fold_rows

    train = load_fold_rows(store, fold, "train")
    val = load_fold_rows(store, fold, "val")
    train_labels = [image_label(b) for b in train["boxes"].to_pylist()]
    images = load_images(store, train["uri"].to_pylist(), size)
    if synthetic is not None and synthetic.num_rows:
        extra = load_images(store if synthetic_store is None else synthetic_store, synthetic["uri"].to_pylist(), size)
        images = torch.cat([images, extra])
        train_labels += [int(c) for c in synthetic["class_id"].to_pylist()]
    return FoldImages(train=images, train_labels=np.array(train_labels, np.int64),
                      val=load_images(store, val["uri"].to_pylist(), size),
                      val_labels=np.array([image_label(b) for b in val["boxes"].to_pylist()], np.int64),
                      val_ids=val["image_id"].to_pylist(), n_real=train.num_rows)


def budget_epoch_size(budget: BudgetConfig, n_real: int, cfg: ClassifierConfig) -> tuple[int, int]:
    """(the trial's budget in `budget.unit`, draws per epoch), the same for every strategy of a fold.
    Default: the fold's real training images per epoch (images_seen), or the optimizer steps that takes."""
    if n_real <= 0:
        raise UserError("the fold has no real training images to size the compute budget from.")
    if budget.unit == "images_seen":
        value = budget.value if budget.value is not None else n_real * cfg.epochs
        return value, max(math.ceil(value / cfg.epochs), 1)
    value = budget.value if budget.value is not None else cfg.epochs * math.ceil(n_real / cfg.batch)
    return value, max(math.ceil(value / cfg.epochs), 1) * cfg.batch


def make_sampler(spec: StrategySpec, labels: np.ndarray, num_classes: int, seed: int, epoch_size: int) -> EpochSampler:
    """The strategy's epoch sampler over single-label images (the detector's samplers, one class per image)."""
    image_classes = [[int(c)] for c in labels]
    if spec.sampling == "rfs":
        return RFSSampler(image_classes, spec.rfs_threshold, seed, num_classes, num_replicas=1, rank=0,
                          epoch_size=epoch_size)
    if spec.sampling == "cas":
        return CASSampler(image_classes, seed, epoch_size, num_classes, num_replicas=1, rank=0)
    return UniformSampler(len(labels), seed, epoch_size, num_replicas=1, rank=0)


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """w_c = N / (K_present * n_c): inverse class frequency with mean weight 1 over the training images."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def _normalize(batch_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = batch_u8.to(device, non_blocking=True).float().div_(255.0)
    return (x - MEAN.to(device)) / STD.to(device)


def jitter(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Shift the batch by up to 10% of the side (replicated edges) and jitter each image's gain and offset."""
    n, side = x.shape[0], x.shape[-1]
    pad = max(side // 10, 1)
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=rng))
    x = nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")[..., dy:dy + side, dx:dx + side]
    gain = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=rng)
    offset = 0.5 * torch.randn(n, 1, 1, 1, generator=rng)
    return x * gain.to(x.device) + offset.to(x.device)


def train_classifier(data: FoldImages, spec: StrategySpec, cfg: ClassifierConfig, classes: list[str], seed: int,
                     budget: BudgetConfig | None = None, device: str = "cpu",
                     weights: Path | None = None) -> dict[str, Any]:
    """Train with `spec` under the equal `budget`; metrics and per-image predictions of the final model."""
    budget = BudgetConfig() if budget is None else budget
    k = len(classes)
    torch.manual_seed(seed)
    dev = torch.device(device)
    budget_value, epoch_size = budget_epoch_size(budget, data.n_real, cfg)
    sampler = make_sampler(spec, data.train_labels, k, seed, epoch_size)
    model = build_classifier(cfg.model, k, cfg.imgsz, weights).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_weights = class_weights(data.train_labels, k).to(dev) if spec.class_weights else None
    loss_fn = nn.CrossEntropyLoss(weight=loss_weights)
    labels_t = torch.from_numpy(data.train_labels)
    flip_rng = torch.Generator().manual_seed(seed)
    steps = seen = 0
    losses = []
    start = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(sampler.epoch_indices(epoch))
        for lo in range(0, len(order), cfg.batch):
            idx = order[lo:lo + cfg.batch]
            x = data.train[idx]
            if cfg.hflip:
                flip = torch.rand(len(idx), generator=flip_rng) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            if len(idx) == 1:  # BatchNorm cannot train on one image: the draw still counts, no step
                seen += 1
                continue
            x = _normalize(x, dev)
            if cfg.jitter:
                x = jitter(x, flip_rng)
            loss = loss_fn(model(x), labels_t[idx].to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            seen += len(idx)
            losses.append(loss.item())
    seconds = time.perf_counter() - start

    # The final model on the fold's validation images (never used to pick an epoch).
    model.eval()
    probs = []
    with torch.no_grad():
        for lo in range(0, len(data.val), 256):
            probs.append(torch.softmax(model(_normalize(data.val[lo:lo + 256], dev)).float(), dim=1).cpu())
    probs_np = torch.cat(probs).numpy() if probs else np.zeros((0, k))
    overall, per_class = classification_metrics(data.val_labels, probs_np)
    nan_to_none = lambda v: None if v is None or not math.isfinite(v) else float(v)  # noqa: E731 (JSON has no NaN)
    return {
        "overall": {m: nan_to_none(v) for m, v in overall.items()},
        "per_class": {name: {m: nan_to_none(v) for m, v in per_class[c].items()} for c, name in enumerate(classes)},
        "seconds": seconds, "optimizer_steps": steps, "images_seen": seen, "epoch_size": epoch_size,
        "budget_unit": budget.unit, "budget": int(budget_value), "selection": "final",
        "n_real_train": data.n_real, "n_synthetic_train": len(data.train_labels) - data.n_real,
        "final_loss": losses[-1] if losses else None,
        "predictions": {"image_id": data.val_ids, "target": data.val_labels.tolist(), "probs": probs_np.tolist()},
        "state_dict": model.state_dict(),
    }


PREDICTIONS_SCHEMA = pa.schema([("image_id", pa.string()), ("target", pa.int32()), ("probs", pa.list_(pa.float32()))])


def predictions_table(predictions: dict[str, list]) -> pa.Table:
    return pa.table(predictions, schema=PREDICTIONS_SCHEMA)
