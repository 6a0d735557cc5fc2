"""Materialize one fold as an ultralytics dataset in a local cache folder.

Layout: <cache>/datasets/<content hash>/{images,labels}/{train,val}/<image_id><ext|.txt> and
data.yaml (train = the other folds + optional synthetic rows, val = this fold). The folder name
is a hash of everything that decides its content (manifest, folds, classes, the fold, the
synthetic rows), so a matching folder is reused as is. It is built under a temp name and renamed
into place, so a half-built dataset is never picked up, and parallel builders do not clash.
Images come from the run store: hard links on a local store (no copy); from S3 each image is
downloaded once into <cache>/images/ and hard-linked into every fold that uses it. Synthetic rows may
come from another run's store (`synthetic_store`, grid strategies with synthetic_from); their image ids
and sha256 are in the content hash, so another run's set never reuses this run's folder.
"""

from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import yaml

from t2id import layout
from t2id.data.manifest import load_classes, load_fold_rows
from t2id.hashing import sha256_json
from t2id.store import TMP_PREFIX, LocalStore, Store

LAYOUT_VERSION = 1


@dataclass
class FoldDataset:
    fold: int
    root: Path
    data_yaml: Path
    names: list[str]
    train_ids: list[str]  # real + synthetic image ids of the train part
    val_ids: list[str]
    synthetic_ids: list[str] = field(default_factory=list)
    content_hash: str = ""


def _usable_synthetic(synthetic: pa.Table | None) -> list[dict]:
    """Synthetic rows to train on: rejected ones (kept == False) are left out."""
    if synthetic is None or synthetic.num_rows == 0:
        return []
    columns = [c for c in ("image_id", "uri", "sha256", "boxes", "kept") if c in synthetic.column_names]
    rows = synthetic.select(columns).to_pylist()
    return [r for r in rows if r.get("kept", True) is not False]


def _content_hash(run_store: Store, fold: int, synthetic_rows: list[dict]) -> str:
    return sha256_json({
        "layout": LAYOUT_VERSION,
        "fold": fold,
        "manifest": run_store.sha256(layout.data.manifest),
        "folds": run_store.sha256(layout.split.folds),
        "classes": run_store.sha256(layout.data.classes),
        "synthetic": sorted((r["image_id"], r["uri"], r.get("sha256"), r.get("boxes") or []) for r in synthetic_rows),
    })


def _label_text(boxes) -> str:
    return "".join(f"{b['class_id']} {b['x']:.6f} {b['y']:.6f} {b['w']:.6f} {b['h']:.6f}\n" for b in boxes or [])


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)  # same file system: no copy
    except OSError:
        shutil.copyfile(src, dest)


def _fetch(run_store: Store, uri: str, dest: Path, shared: Path) -> None:
    """Put the image at `dest`: linked from a local store, else downloaded once into `shared`
    (keyed by image id = content hash, so every fold and dataset version reuses the download)."""
    key = run_store.key_of(uri)
    if isinstance(run_store, LocalStore):
        _link_or_copy(run_store.path(key), dest)
        return
    cached = shared / dest.name
    if not cached.is_file():
        run_store.read_file(key, cached)  # atomic: temp name + rename
    _link_or_copy(cached, dest)


def materialize_fold(run_store: Store, fold: int, cache_dir: str | os.PathLike[str],
                     synthetic: pa.Table | None = None, workers: int = 8,
                     synthetic_store: Store | None = None) -> FoldDataset:
    """Fold `fold` as an ultralytics dataset (train: other folds + synthetic rows; val: this fold).
    The synthetic rows' `uri`s resolve in `synthetic_store` (default: the run store)."""
    names = load_classes(run_store)
    train = load_fold_rows(run_store, fold, "train").select(["image_id", "uri", "boxes"]).to_pylist()
    val = load_fold_rows(run_store, fold, "val").select(["image_id", "uri", "boxes"]).to_pylist()
    real_ids = {r["image_id"] for r in train} | {r["image_id"] for r in val}
    synthetic_rows = [r for r in _usable_synthetic(synthetic) if r["image_id"] not in real_ids]
    digest = _content_hash(run_store, fold, synthetic_rows)
    root = Path(cache_dir).expanduser() / "datasets" / f"fold{fold}-{digest[:16]}"
    dataset = FoldDataset(
        fold=fold, root=root, data_yaml=root / "data.yaml", names=names,
        train_ids=[r["image_id"] for r in train] + [r["image_id"] for r in synthetic_rows],
        val_ids=[r["image_id"] for r in val], synthetic_ids=[r["image_id"] for r in synthetic_rows],
        content_hash=digest,
    )
    if dataset.data_yaml.is_file():
        return dataset  # built before from the same content

    tmp = root.with_name(f"{TMP_PREFIX}{root.name}-{uuid.uuid4().hex[:8]}")
    jobs = []
    synthetic_store = run_store if synthetic_store is None else synthetic_store
    for part, rows in (("train", train + synthetic_rows), ("val", val)):
        (tmp / "images" / part).mkdir(parents=True, exist_ok=True)
        (tmp / "labels" / part).mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            ext = Path(row["uri"]).suffix.lower() or ".png"
            source = synthetic_store if part == "train" and i >= len(train) else run_store
            jobs.append((source, row["uri"], tmp / "images" / part / f"{row['image_id']}{ext}"))
            (tmp / "labels" / part / f"{row['image_id']}.txt").write_text(_label_text(row["boxes"]))
    try:
        shared = Path(cache_dir).expanduser() / "images"
        shared.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda job: _fetch(*job, shared), jobs))
        spec = {"path": str(root.resolve()), "train": "images/train", "val": "images/val",
                "nc": len(names), "names": dict(enumerate(names))}
        (tmp / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        os.replace(tmp, root)
    except OSError:
        if not dataset.data_yaml.is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a parallel builder finished the same dataset first
    finally:
        if tmp.exists() and dataset.data_yaml.is_file():
            shutil.rmtree(tmp, ignore_errors=True)
    return dataset
