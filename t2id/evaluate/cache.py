"""Evaluate's feature cache: per-fold image features kept in the run store and reused via t2id.resume.

Two units per fold (`layout.evaluate.cache(fold, kind)`):
  real       InceptionV3 features of the fold's real reference images,
  synthetic  InceptionV3 features and CLIP scores of its kept synthetic images.
A unit's identity is the fingerprint of the weights that made it and the (id, sha256) of every
image in it, so a rerun with other KID/IS settings never re-extracts, and a changed image or weight
re-extracts exactly the units it is part of. `--force evaluate` ignores the memos.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from t2id import layout
from t2id.hashing import sha256_json
from t2id.resume import Memo
from t2id.store import Store, sha256_file

KINDS = ("real", "synthetic")
Features = dict[str, dict[str, Any]]  # image id (real) or uri (synthetic) -> {pool3, logits, clip}

CACHE_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("pool3", pa.list_(pa.float32())),
    pa.field("logits", pa.list_(pa.float32())),  # synthetic only (Inception Score)
    pa.field("clip", pa.float64()),  # synthetic only
])


def weights_fingerprint(source: str, endpoint_url: str | None = None) -> str:
    """Identity of a weights file or folder without loading it.

    'tiny' is itself (a seeded build); a local file its sha256; a local folder its listing with sizes
    and mtimes; an s3:// object or prefix the sha256s the store records; 'missing' when there is none
    (the stage then fails with the config key when it resolves the weights).
    """
    from t2id.store import open_store

    if source == "tiny":
        return "tiny-seed0"
    if source.startswith("s3://"):
        parent, _, name = source.rstrip("/").rpartition("/")
        obj = open_store(parent, endpoint_url=endpoint_url)
        if name and obj.exists(name):
            return obj.sha256(name)
        folder = open_store(source.rstrip("/"), endpoint_url=endpoint_url)
        listing: dict[str, str] = {k: folder.sha256(k) for k in folder.list()}
    else:
        path = Path(source).expanduser()
        if path.is_file():
            return sha256_file(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        listing = {p.relative_to(path).as_posix(): f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files}
    return sha256_json(listing) if listing else "missing"


def unit_weights(kind: str, inception: str, clip: str, imgsz: int | None = None) -> dict[str, str]:
    """What a unit's features depend on besides its images: the weight fingerprints (real images
    never see CLIP) and the detector input size the images are resized to first."""
    out = {"inception": inception} if kind == "real" else {"inception": inception, "clip": clip}
    return out if imgsz is None else {**out, "imgsz": str(imgsz)}


def feature_memo(store: Store, fold: int, kind: str, weights: dict[str, str], images: list[tuple[str, str]],
                 force: bool = False) -> Memo:
    """The memo of one (fold, kind) unit; `images` are its (id, sha256) pairs in order."""
    identity = {"fold": fold, "kind": kind, "weights": weights, "n_images": len(images),
                "images": sha256_json([list(pair) for pair in images])}
    return Memo(store, layout.memo(layout.evaluate.cache(fold, kind)), identity, ignore=force)


def load_features(store: Store, memo: Memo, fold: int, kind: str) -> Features | None:
    """The unit's features when its memo says they are current, else None."""
    if not memo.done():
        return None
    table = store.read_table(layout.evaluate.features(fold, kind))
    return {r["id"]: {"pool3": np.asarray(r["pool3"], np.float32),
                      "logits": None if r["logits"] is None else np.asarray(r["logits"], np.float32),
                      "clip": math.nan if r["clip"] is None else r["clip"]} for r in table.to_pylist()}


def save_features(store: Store, memo: Memo, fold: int, kind: str, images: list[tuple[str, str]],
                  features: Features) -> None:
    """Write the unit's features, then its memo (the commit point)."""
    def clip_of(f: dict[str, Any]) -> float | None:
        value = f.get("clip", math.nan)
        return None if value is None or not np.isfinite(value) else float(value)

    table = pa.Table.from_pylist(
        [{"id": i, "sha256": sha, "pool3": features[i]["pool3"].tolist(),
          "logits": None if features[i].get("logits") is None else features[i]["logits"].tolist(),
          "clip": clip_of(features[i])} for i, sha in images],
        schema=CACHE_SCHEMA,
    )
    key = layout.evaluate.features(fold, kind)
    store.write_table(key, table)
    memo.commit([key])
