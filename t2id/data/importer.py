"""Bring a dataset into a run: resolve the source to a local folder, fingerprint it, copy images.

Sources: 'phantom' (generated into the cache from data.phantom), a local folder, or an s3://
prefix (synced into the cache, keyed by the prefix; objects whose ETag and size are unchanged
are not downloaded again). The source is only read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa

from t2id import layout
from t2id.data.manifest import IMAGE_SCHEMA, QUARANTINE_SCHEMA
from t2id.data.phantom import PHANTOM_VERSION, write_phantom
from t2id.data.validate import Rejection, ScanResult, display_path, stored_bytes, walk_files
from t2id.errors import UserError
from t2id.hashing import sha256_json
from t2id.store import TMP_PREFIX, LocalStore, Store, s3_client

SYNC_STATE = ".t2id-sync.json"


# --- phantom -----------------------------------------------------------------------------------

def phantom_params(phantom_cfg, task: str = "detect") -> dict:
    if task == "classify":  # the image-level variant (t2id.classify.phantom): its own version and cache folder
        from t2id.classify.phantom import CLASSIFY_PHANTOM_VERSION
        return {"version": CLASSIFY_PHANTOM_VERSION, "task": task, **phantom_cfg.model_dump(mode="json")}
    return {"version": PHANTOM_VERSION, **phantom_cfg.model_dump(mode="json")}


def ensure_phantom(phantom_cfg, cache_dir: Path, task: str = "detect") -> Path:
    """The phantom for these settings, generated once into the cache (complete or absent)."""
    params = phantom_params(phantom_cfg, task)
    folder = Path(cache_dir) / "phantom" / sha256_json(params)[:16]
    if (folder / "phantom.json").is_file():
        return folder
    tmp = folder.with_name(f"{TMP_PREFIX}{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if task == "classify":
        from t2id.classify.phantom import write_classify_phantom as writer
    else:
        writer = write_phantom
    try:
        writer(tmp, subjects=phantom_cfg.subjects, frames_per_subject=phantom_cfg.frames_per_subject,
               size=phantom_cfg.size, seed=phantom_cfg.seed)
    except BaseException:  # e.g. a full disk: no half-written folder left in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --- S3 ----------------------------------------------------------------------------------------

def _s3_objects(uri: str, endpoint_url: str | None) -> tuple[object, str, str, list[dict]]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    client = s3_client(endpoint_url)
    folder = f"{prefix}/" if prefix else ""
    objects = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            objects.extend(page.get("Contents", []))
    except client.exceptions.NoSuchBucket:
        raise UserError(f"data.source {uri}: bucket '{bucket}' does not exist") from None
    objects = [o for o in objects if not o["Key"].endswith("/")]
    if not objects:
        raise UserError(f"data.source {uri}: no objects under this prefix; check the URI")
    return client, bucket, folder, objects


def sync_s3(uri: str, cache_dir: Path, endpoint_url: str | None = None, workers: int = 8) -> Path:
    """Mirror an s3:// prefix into the cache; only new or changed objects are downloaded."""
    client, bucket, folder, objects = _s3_objects(uri, endpoint_url)
    local = Path(cache_dir) / "sources" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    state_path = local / SYNC_STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    wanted = {o["Key"][len(folder):]: f"{o['ETag']}:{o['Size']}" for o in objects}

    def fetch(rel: str) -> None:
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}")
        client.download_file(bucket, folder + rel, str(tmp))
        os.replace(tmp, dest)

    todo = [r for r, tag in wanted.items() if state.get(r) != tag or not (local / r).is_file()]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fetch, todo))
    for rel in set(state) - set(wanted):  # deleted upstream
        (local / rel).unlink(missing_ok=True)
    state_path.write_text(json.dumps(wanted, sort_keys=True))
    return local


# --- source --------------------------------------------------------------------------------------

def resolve_source(data_cfg, cache_dir: Path, endpoint_url: str | None = None, task: str = "detect") -> Path:
    """A local folder holding the dataset named by data.source (`task` picks the phantom's variant)."""
    source = data_cfg.source
    if source == "phantom":
        return ensure_phantom(data_cfg.phantom, cache_dir, task)
    if source.startswith("s3://"):
        return sync_s3(source, cache_dir, endpoint_url, workers=data_cfg.workers)
    if "://" in source:
        raise UserError(f"data.source {source!r}: use a local folder, an s3:// prefix or 'phantom'")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise UserError(f"data.source {source!r}: folder not found")
    return path.resolve()


def fingerprint_source(data_cfg, endpoint_url: str | None = None, task: str = "detect") -> dict[str, str]:
    """Cheap identity of the source for the runner's skip logic.

    Local: relative path, size and mtime of every file (a touched file re-imports; contents are
    hashed during import anyway). S3: key, size and ETag of every object. Phantom: its settings
    and generator version (already part of the config hash, plus the code version here).
    """
    source = data_cfg.source
    if source == "phantom":
        return {"source": sha256_json(phantom_params(data_cfg.phantom, task))}
    entries: list[tuple] = []
    if source.startswith("s3://"):
        _client, _bucket, folder, objects = _s3_objects(source, endpoint_url)
        entries = sorted((o["Key"][len(folder):], o["Size"], o["ETag"]) for o in objects)
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise UserError(f"data.source {source!r}: folder not found")
        # The scan's own walk (symlinked folders followed, loops cut); an entry the scan rejects (a broken
        # symlink, an unreadable file) is part of the fingerprint with its reason, so fixing it re-imports.
        files, problems = walk_files(root)
        for path in files:
            rel = display_path(os.path.relpath(path, root))
            try:
                st = os.stat(path)
            except OSError as exc:
                entries.append((rel, -1, exc.strerror or str(exc)))
                continue
            entries.append((rel, st.st_size, st.st_mtime_ns))
        entries.extend((display_path(os.path.relpath(path, root)), -1, reason) for path, reason in problems.items())
        entries.sort()
    for field in ("subject_map", "labels"):  # files that may live outside the dataset folder
        value = getattr(data_cfg, field, None)
        if value and Path(value).expanduser().is_file():
            st = Path(value).expanduser().stat()
            entries.append((field, st.st_size, st.st_mtime_ns))
    return {"source": sha256_json(entries)}


# --- copy into the run -----------------------------------------------------------------------------

def copy_images(scan: ScanResult, store: Store, workers: int = 8,
                progress: Callable[[int], None] | None = None) -> pa.Table:
    """Copy accepted images to layout.data.image(image_id, ext) (skipping present ones); return the manifest.

    A converted image (16-bit, palette, alpha, ...: t2id.data.pixels) is stored as the 8-bit PNG the scan
    hashed, made again here from the source file; a source file changed since the scan is an error.
    """
    present = set(store.list(layout.data.images))
    todo = [rec for rec in scan.images if layout.data.image(rec.image_id, rec.ext) not in present]
    root = str(scan.root)

    def converted(rec) -> bytes:
        with open(os.path.join(root, rec.path), "rb") as fh:
            data = stored_bytes(fh.read(), rec.conversion)
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            raise UserError(f"{rec.path} changed while it was imported; run the import again")
        return data

    if isinstance(store, LocalStore):
        folder = store.path(layout.data.images)
        folder.mkdir(parents=True, exist_ok=True)
        folder_s = str(folder)

        def put(rec) -> None:
            # Content-addressed, and listed in the manifest only after every copy: temp + rename
            # keeps readers safe; skipping a per-file fsync keeps the import fast (the manifest
            # and the stage marker written after this are fsynced).
            dest = os.path.join(folder_s, rec.image_id + rec.ext)
            tmp = os.path.join(folder_s, TMP_PREFIX + rec.image_id + rec.ext)
            try:
                if rec.conversion is None:
                    shutil.copyfile(os.path.join(root, rec.path), tmp)
                else:
                    with open(tmp, "wb") as fh:
                        fh.write(converted(rec))
                os.replace(tmp, dest)
            except BaseException as exc:  # a full disk (or a kill) leaves no temp file behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise UserError(f"{store.uri(layout.data.images)}: no space left on the device while copying "
                                    f"{rec.path} ({exc.strerror}); free space there or point store.uri elsewhere, "
                                    "then rerun: images copied so far are kept") from exc
                raise
    else:
        def put(rec) -> None:
            key = layout.data.image(rec.image_id, rec.ext)
            if rec.conversion is None:
                store.write_file(key, os.path.join(root, rec.path))
            else:
                store.write_bytes(key, converted(rec))

    batches = [todo[i:i + 32] for i in range(0, len(todo), 32)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in pool.map(lambda recs: [put(r) for r in recs], batches):
            if progress is not None:
                progress(len(batch))
    # Images of an earlier import that are no longer in the dataset go away.
    keep = {layout.data.image(rec.image_id, rec.ext) for rec in scan.images}
    for key in present - keep:
        store.delete(key)
    return manifest_table(scan, store)


def manifest_table(scan: ScanResult, store: Store) -> pa.Table:
    records = sorted(scan.images, key=lambda r: (r.group, r.path))
    rows = {
        "image_id": [r.image_id for r in records],
        "uri": [store.ref(layout.data.image(r.image_id, r.ext)) for r in records],
        "width": [r.width for r in records],
        "height": [r.height for r in records],
        "group": [r.group for r in records],
        "source": ["real"] * len(records),
        "boxes": [[{"class_id": c, "x": x, "y": y, "w": w, "h": h} for c, x, y, w, h in r.boxes]
                  for r in records],
        "sha256": [r.sha256 for r in records],
    }
    return pa.table(rows, schema=IMAGE_SCHEMA)


def sources_table(scan: ScanResult) -> pa.Table:
    """image_id -> original path, so a manifest row can be traced back to the user's file; `conversion` says how
    the stored image was made from it (null: stored as is; t2id.data.pixels)."""
    records = sorted(scan.images, key=lambda r: r.path)
    return pa.table({"image_id": [r.image_id for r in records], "path": [r.path for r in records],
                     "label_path": [r.label_path for r in records],
                     "conversion": pa.array([r.conversion for r in records], type=pa.string())})


def quarantine_table(rejected: list[Rejection]) -> pa.Table:
    return pa.table({"path": [r.path for r in rejected], "reason": [r.reason for r in rejected]},
                    schema=QUARANTINE_SCHEMA)
