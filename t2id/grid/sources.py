"""Synthetic sets of ANOTHER t2id run (`synthetic_from` of a grid strategy): how one grid compares generators.

One run trains one generator (lora.method); a second run with the same data and split sections and
another generator writes its own synthetic sets. A strategy with `synthetic_from: <that run's root>`
trains this run's detector (or classifier) on the other run's kept, labelled rows, with images read
from the other run's store: the manifests hold run-relative keys (`Store.ref`), which resolve against
the store that wrote them. The comparison is fair only on the same folds: before any trial the other
run's classes, split and data manifest images must equal this run's (`check_same_split`).
"""

from __future__ import annotations

import json
from typing import Any

from t2id import layout
from t2id.errors import UserError
from t2id.grid.settings import GridSettings
from t2id.store import S3Store, Store, open_store

FIX = "run the other config with the same data and split sections as this one (only lora/generate/label may differ)"


def open_source(store: Store, uri: str) -> Store:
    """The other run's store at `uri` (its root), opened with this run's store settings: the same S3 endpoint,
    region and retries, credentials from the environment as usual."""
    if uri.startswith("s3://") and isinstance(store, S3Store):
        return S3Store(uri, endpoint_url=store.endpoint_url, region=store.region, max_attempts=store.max_attempts)
    return open_store(uri)  # a local path is resolved here, against the working directory (as store.uri)


def run_name(store: Store) -> str:
    """A run's id as its root's last segment (<store.uri>/<run.id>)."""
    return store.root.rstrip("/").rsplit("/", 1)[-1]


def sources(s: GridSettings) -> list[str]:
    """The distinct synthetic_from URIs of the strategies this grid trains, in config order."""
    specs = [s.grid.strategy_spec(name) for name in s.grid.strategies]
    return list(dict.fromkeys(spec.synthetic_from for spec in specs if spec.synthetic and spec.synthetic_from))


def _rows(store: Store, key: str, columns: list[str]) -> list[tuple]:
    table = store.read_table(key)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        return [("columns missing:", *missing)]
    return sorted(zip(*(table[c].to_pylist() for c in columns)))


def _difference(this: Store, other: Store, key: str) -> str | None:
    """Why `key` differs between the two runs (None when it holds the same content)."""
    if key == layout.data.classes:
        mine, theirs = (json.loads(st.read_text(key))["names"] for st in (this, other))
        return None if mine == theirs else f"classes {theirs} vs {mine}"
    if this.sha256(key) == other.sha256(key):
        return None
    # Same content written by another pyarrow/zstd build is still the same split: compare the rows that matter.
    columns = ["image_id", "fold"] if key == layout.split.folds else ["image_id", "sha256"]
    mine, theirs = _rows(this, key, columns), _rows(other, key, columns)
    if mine == theirs:
        return None
    only_other = len(set(theirs) - set(mine))
    only_this = len(set(mine) - set(theirs))
    return f"{' + '.join(columns)} differ: {only_other} row(s) only there, {only_this} only here"


def check_same_split(this: Store, other: Store, strategy: str, uri: str) -> None:
    """Raise a UserError unless `other` has this run's classes, data manifest images (ids + sha256) and folds."""
    for key in (layout.data.classes, layout.data.manifest, layout.split.folds):
        if not other.exists(key):
            raise UserError(f"grid strategy {strategy!r}: synthetic_from {uri} (run {run_name(other)}) has no {key}; "
                            f"run its data and split stages first, or fix the path ({other.root})")
        if not this.exists(key):
            raise UserError(f"grid: this run {run_name(this)} has no {key}; run its data and split stages first")
        why = _difference(this, other, key)
        if why is not None:
            raise UserError(f"grid strategy {strategy!r}: synthetic_from {uri} (run {run_name(other)}) has another {key} "
                            f"than this run {run_name(this)} ({why}); {FIX}, or drop synthetic_from")


def open_sources(store: Store, s: GridSettings) -> dict[str, Store]:
    """synthetic_from URI -> the other run's store, each checked to share this run's split (before any trial)."""
    out = {}
    for uri in sources(s):
        other = open_source(store, uri)
        strategy = next(n for n in s.grid.strategies if s.grid.strategy_spec(n).synthetic_from == uri)
        check_same_split(store, other, strategy, uri)
        out[uri] = other
    return out


def synthetic_key(task: str, fold: int) -> str:
    """Where a run keeps the synthetic rows its grid trains on: label's labelled rows (detect), generate's
    rows (classify: the prompt's class is the label)."""
    return layout.generate.manifest(fold) if task == "classify" else layout.label.labels(fold)


def source_status(other: Store, uri: str, task: str, fold: int) -> tuple[str | None, int, str]:
    """(key of the fold's synthetic rows in the other run or None, usable row count, reason when None)."""
    from t2id.classify.trial import kept_synthetic
    from t2id.grid.core import usable_synthetic

    key = synthetic_key(task, fold)
    if not other.exists(key):
        return None, 0, f"{key} does not exist in synthetic_from run {uri} (run its generate and label stages)"
    usable = kept_synthetic if task == "classify" else usable_synthetic
    count = usable(other.read_table(key)).num_rows
    if count == 0:
        return None, 0, f"{key} of synthetic_from run {uri} holds no kept, labelled synthetic images"
    return key, count, ""


def external_inputs(store: Store, s: GridSettings) -> dict[str, str]:
    """The other runs' stage markers the grid trains from (outside this run and its config): a regenerated
    other run reruns this grid stage, whose per-trial memos then retrain only the trials it feeds."""
    from t2id.runner import outputs_digest, read_marker

    found: dict[str, str] = {}
    stages = ("data", "split", "generate") if s.task == "classify" else ("data", "split", "generate", "label")
    for uri in sources(s):
        other = open_source(store, uri)
        for stage in stages:
            marker: dict[str, Any] | None = read_marker(other, stage)
            found[f"synthetic_from:{uri}:{stage}"] = outputs_digest(marker) if marker is not None else "missing"
    return found
