"""The grid's classification trial: one (fold, strategy, seed) classifier training on the run's store.

Reads the fold from the run (data + split; synthetic rows from the generate stage's manifest), trains
(t2id.classify.train), and writes under the trial's folder (t2id.layout.grid): predictions.parquet
(image_id, target, probs of the final model), final.pt (its state dict), metrics.json. Returns the plain
JSON record the grid publishes (`per_class`, `overall`, counts, budget, `selection: final`).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from t2id import layout
from t2id.classify.config import ClassifierConfig
from t2id.classify.train import fold_images, predictions_table, train_classifier
from t2id.detect.config import BudgetConfig, StrategySpec
from t2id.errors import UserError
from t2id.store import Store


def kept_synthetic(table: pa.Table) -> pa.Table:
    """Generated rows that passed the quality gate; their class is `class_id` (label_source "prompt")."""
    if "kept" in table.column_names:
        table = table.filter(pc.fill_null(table["kept"], False))
    return table


def synthetic_status(store: Store, use_synthetic: bool, fold: int) -> tuple[str | None, int, str]:
    """(store key of the fold's generated rows or None, kept row count, reason when None)."""
    if not use_synthetic:
        return None, 0, "the generate stage is not enabled (run.stages), so there is no synthetic set"
    key = layout.generate.manifest(fold)
    if not store.exists(key):
        return None, 0, f"{key} does not exist (run the generate stage)"
    count = kept_synthetic(store.read_table(key)).num_rows
    if count == 0:
        return None, 0, f"{key} holds no kept synthetic images"
    return key, count, ""


def resolve_weights(weights: str | None, cache_dir: Path) -> Path | None:
    """grid.classifier.weights as a local file (an s3:// URI is copied into the cache once)."""
    if weights is None:
        return None
    if weights.startswith("s3://"):
        from t2id.store import open_store

        parent, name = weights.rsplit("/", 1)
        source = open_store(parent)
        if not source.exists(name):
            raise UserError(f"grid.classifier.weights {weights} does not exist: upload the file there or fix the URI")
        local = cache_dir / "init_weights" / name
        if not local.exists():
            source.read_file(name, local)
        return local
    return Path(weights).expanduser()


def classify_on_store(store: Store, fold: int, spec: StrategySpec, cfg: ClassifierConfig, classes: list[str],
                      cache_dir: Path, seed: int, synthetic: pa.Table | None = None, device: str = "cpu",
                      budget: BudgetConfig | None = None, synthetic_store: Store | None = None) -> dict[str, Any]:
    """One classifier training on `fold`; the synthetic rows' images resolve in `synthetic_store` (default:
    the run store; another run's store for a strategy with synthetic_from)."""
    if spec.synthetic and synthetic is None:
        raise UserError(f"strategy {spec.name!r} trains on synthetic images but none were given for fold {fold}: "
                        f"run the generate stage first ({layout.generate.manifest(fold)})")
    data = fold_images(store, fold, cfg.imgsz, synthetic if spec.synthetic else None, synthetic_store=synthetic_store)
    out = train_classifier(data, spec, cfg, classes, seed, budget=budget, device=device,
                           weights=resolve_weights(cfg.weights, Path(cache_dir)))
    weights_key = layout.grid.weights(fold, spec.name, seed)
    predictions_key = layout.grid.predictions(fold, spec.name, seed)
    buffer = io.BytesIO()
    torch.save(out.pop("state_dict"), buffer)
    store.write_bytes(weights_key, buffer.getvalue())
    store.write_table(predictions_key, predictions_table(out.pop("predictions")))
    record = {"fold": int(fold), "seed": int(seed), "strategy": spec.name, **out, "weights": weights_key,
              "predictions": predictions_key,
              "synthetic_label_source": "prompt" if spec.synthetic else None}
    store.write_text(layout.grid.trial_metrics(fold, spec.name, seed), json.dumps(record, indent=2))
    return record
