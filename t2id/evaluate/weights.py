"""Where evaluation weights come from: a local file/folder or an s3:// URI, never the internet.

A weight source in the config is resolved to a local path. s3:// objects are downloaded once
into a content-keyed cache (the object's sha256, which the store records as metadata), so a
rerun or a second worker on the same node reuses them and a changed object is fetched again.
A missing source is a UserError that names the config key and says how to get the weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from t2id.errors import UserError
from t2id.store import ObjectNotFound, open_store

CACHE_HINT = "run `t2id models cache` on a machine with internet or point it at a local {kind}"


def _missing(config_key: str, source: str, kind: str) -> UserError:
    return UserError(f"{config_key}: {source} not found; " + CACHE_HINT.format(kind=kind))


def _split_s3(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b/name' -> ('s3://bucket/a/b', 'name')."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or parent in ("s3:/", "s3:"):
        raise UserError(f"{uri}: expected s3://bucket/path/to/object")
    return parent, name


def resolve_weights_file(source: str, cache_dir: Path, config_key: str,
                         endpoint_url: str | None = None) -> Path:
    """Local path of a weights file named by a local path or s3:// URI."""
    if source.startswith("s3://"):
        parent, name = _split_s3(source)
        store = open_store(parent, endpoint_url=endpoint_url)
        try:
            digest = store.sha256(name)
        except ObjectNotFound:
            raise _missing(config_key, source, "file") from None
        dest = Path(cache_dir).expanduser() / "weights" / digest / name
        if not dest.is_file():  # downloads land under a temp name and are renamed when complete
            store.read_file(name, dest)
        return dest
    path = Path(source).expanduser()
    if not path.is_file():
        raise _missing(config_key, source, "file")
    return path


def resolve_weights_dir(source: str, cache_dir: Path, config_key: str,
                        endpoint_url: str | None = None) -> Path:
    """Local folder of a weights directory (e.g. a save_pretrained folder) from a path or s3:// prefix."""
    if source.startswith("s3://"):
        store = open_store(source.rstrip("/"), endpoint_url=endpoint_url)
        keys = store.list()
        if not keys:
            raise _missing(config_key, source, "folder")
        listing = {key: store.sha256(key) for key in keys}
        digest = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
        dest = Path(cache_dir).expanduser() / "weights" / digest
        done = dest / ".t2id-complete"
        if not done.is_file():
            for key in keys:
                store.read_file(key, dest / key)
            done.write_text(json.dumps(listing))
        return dest
    path = Path(source).expanduser()
    if not path.is_dir():
        raise _missing(config_key, source, "folder")
    return path


def upload_path(local: Path, uri: str, endpoint_url: str | None = None) -> str:
    """Upload a local file (to the object `uri`) or folder (under the prefix `uri`); return `uri`."""
    local = Path(local)
    if local.is_file():
        parent, name = _split_s3(uri) if uri.startswith("s3://") else (str(Path(uri).parent), Path(uri).name)
        open_store(parent, endpoint_url=endpoint_url).write_file(name, local)
        return uri
    store = open_store(uri.rstrip("/"), endpoint_url=endpoint_url)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.write_file(path.relative_to(local).as_posix(), path)
    return uri
