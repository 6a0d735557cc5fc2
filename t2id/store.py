"""One artifact store over a local folder or an S3 prefix.

Keys are '/'-separated paths relative to the store root. Every write is atomic: a reader sees
either the old object or the complete new one, never a part of it.
  - local: write a hidden temp file in the destination folder, fsync, os.replace (atomic on POSIX);
    files get the usual 0666 & ~umask mode (not mkstemp's 0600), so a group sharing a store can read it;
  - S3: a single PUT, or a multipart upload that only becomes visible when completed.
Every write returns the sha256 of the bytes written; on S3 it is also stored as object metadata
(`x-amz-meta-sha256`) so `sha256(key)` needs no download.

Credentials never come from the config: boto3's standard chain (environment, shared config,
instance/pod identity). Transient S3 errors are retried with exponential backoff by botocore's
"standard" retry mode (throttling, 5xx, connection errors), `store.max_attempts` attempts.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import stat
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from t2id.errors import UserError

TMP_PREFIX = ".t2id-tmp-"
_CHUNK = 8 * 1024 * 1024


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ObjectNotFound(UserError):
    """A key that should exist does not."""


class Store(ABC):
    """Artifact store rooted at a local folder or an s3://bucket/prefix."""

    @property
    @abstractmethod
    def root(self) -> str:
        """URI of the store root (a path or s3://bucket/prefix)."""

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """A store rooted at `prefix` under this one (e.g. a run's folder)."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes, durable: bool = True) -> str:
        """Atomically write `data` at `key`; return its sha256. `durable=False` lets a local store skip the
        fsync (an S3 PUT is durable either way): only for an object that is verified whenever it is read, so
        that losing or tearing it in an OS crash merely has it made again (generate's per-image records)."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def write_file(self, key: str, local_path: str | os.PathLike[str]) -> str:
        """Atomically upload a local file to `key`; return its sha256."""

    @abstractmethod
    def read_file(self, key: str, local_path: str | os.PathLike[str]) -> Path:
        """Download `key` to `local_path` (atomically); return the path."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Atomically write `data` at `key` only if no object is there; False (nothing written) if one is.
        Two writers racing for the same key: exactly one gets True (the run lock is built on this)."""

    @abstractmethod
    def sizes(self, prefix: str = "") -> dict[str, int]:
        """key -> size in bytes of every object under the folder `prefix` (recursive), one listing."""

    def list(self, prefix: str = "") -> list[str]:
        """All keys under the folder `prefix` (recursive, sorted), excluding in-flight temp files."""
        return sorted(self.sizes(prefix))

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes of the object at `key`, None when there is none."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete `key` if present (no error when absent)."""

    @abstractmethod
    def sha256(self, key: str) -> str:
        """sha256 of the object at `key` (from metadata when the store recorded it)."""

    def content_sha256(self, key: str) -> str:
        """sha256 of the object's bytes as they are now, never from metadata (what `--verify` checks)."""
        return self.sha256(key)

    def uri(self, key: str = "") -> str:
        """Full URI of `key` (for messages and links; manifests store `ref(key)`)."""
        return f"{self.root.rstrip('/')}/{key}" if key else self.root

    @staticmethod
    def ref(key: str) -> str:
        """What a manifest's `uri` column holds for the object at `key` of the run store: the key itself,
        relative to the run root, so a run folder copied between a disk and S3 (or renamed) still resolves
        (issue 18 item 6). `key_of` turns it back into a key of whichever store reads the manifest."""
        return key

    def key_of(self, uri: str) -> str:
        """The key of a manifest `uri`: a relative reference (`ref`) as is, or, from manifests written
        before references were relative, a full URI under this store's root."""
        if "://" not in uri and not uri.startswith("/"):
            if uri.startswith("../") or "/../" in uri or not uri:
                raise UserError(f"manifest uri {uri!r} leaves the run folder; manifests reference objects inside it")
            return uri
        root = self.root.rstrip("/") + "/"
        if not uri.startswith(root):
            raise UserError(f"{uri} is not inside the store {self.root}: the manifest holds an absolute uri "
                            "from another location; rerun the stage that wrote it")
        return uri[len(root):]

    # Derived helpers: same on every backend.
    def write_text(self, key: str, text: str, durable: bool = True) -> str:
        return self.write_bytes(key, text.encode("utf-8"), durable)

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_table(self, key: str, table: pa.Table) -> str:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        return self.write_bytes(key, buffer.getvalue())

    def read_table(self, key: str) -> pa.Table:
        data = self.read_bytes(key)
        try:
            return pq.read_table(io.BytesIO(data))
        except pa.ArrowException as exc:  # pyarrow names the file '<Buffer>': name it here
            reason = str(exc).splitlines()[0].replace("Could not open Parquet input source '<Buffer>': ", "")
            raise UserError(f"{self.uri(key)}: not a readable parquet file ({reason}); it is damaged: redo the "
                            "stage that wrote it (`t2id run CONFIG --force STAGE`)") from exc

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"invalid store key {key!r}: use a relative 'a/b/c' path")
    return key


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).expanduser().resolve()

    @property
    def root(self) -> str:
        return str(self._root)

    def path(self, key: str) -> Path:
        """Local filesystem path of `key` (local stores only)."""
        return self._root / _check_key(key)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._root / _check_key(prefix.strip("/")))

    def _publish(self, key: str, fill, exclusive: bool = False, durable: bool = True) -> str:
        """Fill a temp file beside `key`, fsync it (unless not `durable`), then move it into place (os.replace),
        or with `exclusive` hard-link it there: link(2) fails when the key exists, exactly like O_CREAT|O_EXCL
        (also on NFS), and the object appears complete (FileExistsError then, nothing written). Without the
        fsync the write is still atomic for every reader; only an OS crash may lose or empty it."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 lets the kernel apply the umask, as for any file a program creates;
        # tempfile.mkstemp would force 0600 and lock others sharing the store out.
        tmp = str(dest.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as fh:
                digest = fill(fh)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            if exclusive:
                os.link(tmp, dest)
                os.unlink(tmp)
            else:
                os.replace(tmp, dest)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the user's to fix: one line
                raise UserError(f"{self.uri(key)}: no space left on the device ({exc.strerror}); free space "
                                "there or point store.uri elsewhere, then rerun") from exc
            raise
        return digest

    def write_bytes(self, key: str, data: bytes, durable: bool = True) -> str:
        def fill(fh):
            fh.write(data)
            return sha256_bytes(data)

        return self._publish(key, fill, durable=durable)

    def write_file(self, key: str, local_path: str | os.PathLike[str]) -> str:
        def fill(fh):
            digest = hashlib.sha256()
            with open(local_path, "rb") as src:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    digest.update(chunk)
                    fh.write(chunk)
            return digest.hexdigest()

        return self._publish(key, fill)

    def create(self, key: str, data: bytes) -> bool:
        try:
            self._publish(key, lambda fh: fh.write(data), exclusive=True)
            return True
        except FileExistsError:
            return False

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri(key)} does not exist") from None

    def read_file(self, key: str, local_path: str | os.PathLike[str]) -> Path:
        src = self.path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri(key)} does not exist")
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{dest.name}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return dest

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            st = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def sizes(self, prefix: str = "") -> dict[str, int]:
        base = self._root / prefix.strip("/") if prefix.strip("/") else self._root
        if not base.is_dir():
            return {}
        found = {}
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    continue
                path = Path(dirpath, name)
                try:
                    found[path.relative_to(self._root).as_posix()] = path.stat().st_size
                except FileNotFoundError:  # deleted since the walk listed it
                    pass
        return found

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def sha256(self, key: str) -> str:
        if not self.exists(key):
            raise ObjectNotFound(f"{self.uri(key)} does not exist")
        return sha256_file(self.path(key))


class S3Store(Store):
    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None,
                 max_attempts: int = 8) -> None:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise UserError(f"store.uri {uri!r}: expected s3://bucket[/prefix]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.region = region
        self.max_attempts = max_attempts
        self._client = s3_client(self.endpoint_url, region, max_attempts)

    def __reduce__(self):  # picklable for Ray tasks: rebuild the client on the other side
        return (S3Store, (self.uri(), self.endpoint_url, self.region, self.max_attempts))

    @property
    def root(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def child(self, prefix: str) -> S3Store:
        sub = _check_key(prefix.strip("/"))
        return S3Store(f"s3://{self.bucket}/{self._key(sub)}", self.endpoint_url, self.region, self.max_attempts)

    def _not_found(self, exc: Exception) -> bool:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def write_bytes(self, key: str, data: bytes, durable: bool = True) -> str:
        digest = sha256_bytes(data)  # a PUT is durable once it returns: `durable` changes nothing here
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={"sha256": digest})
        return digest

    def write_file(self, key: str, local_path: str | os.PathLike[str]) -> str:
        # upload_file uses multipart above its threshold; the object appears only on completion.
        digest = sha256_file(local_path)
        self._client.upload_file(str(local_path), self.bucket, self._key(key),
                                 ExtraArgs={"Metadata": {"sha256": digest}})
        return digest

    def create(self, key: str, data: bytes) -> bool:
        # A conditional PUT (If-None-Match: *): S3 itself refuses it when the key exists, so of two
        # racing writers exactly one succeeds. S3-compatible servers that ignore the header (old MinIO,
        # some Ceph versions) would let both through; AWS S3 and current MinIO honour it.
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*",
                                    Metadata={"sha256": sha256_bytes(data)})
            return True
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            # 412: the key exists; 409: another conditional write to it is in flight (it will win)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self._client.exceptions.NoSuchKey:
            raise ObjectNotFound(f"{self.uri(key)} does not exist") from None

    def read_file(self, key: str, local_path: str | os.PathLike[str]) -> Path:
        dest = Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{dest.name}")
        try:
            self._client.download_file(self.bucket, self._key(key), str(tmp))
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            if self._not_found(exc):
                raise ObjectNotFound(f"{self.uri(key)} does not exist") from None
            raise
        os.replace(tmp, dest)
        return dest

    def _head(self, key: str) -> dict | None:
        try:
            return self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if self._not_found(exc):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def sizes(self, prefix: str = "") -> dict[str, int]:
        prefix = prefix.strip("/")
        folder = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = {}
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
            for obj in page.get("Contents", []):
                # Folder markers ("a/b/", written by pyarrow for Ray Train/Tune) are not objects of the run.
                if not obj["Key"].endswith("/"):
                    found[obj["Key"][strip:]] = int(obj["Size"])
        return found

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder `prefix`, folder markers included; returns the count."""
        folder = self._key(prefix.strip("/")) + "/"
        count = 0
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
            for obj in page.get("Contents", []):
                self._client.delete_object(Bucket=self.bucket, Key=obj["Key"])
                count += not obj["Key"].endswith("/")
        return count

    def sha256(self, key: str) -> str:
        head = self._head(key)
        if head is None:
            raise ObjectNotFound(f"{self.uri(key)} does not exist")
        recorded = head.get("Metadata", {}).get("sha256")
        return recorded or self.content_sha256(key)

    def content_sha256(self, key: str) -> str:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except self._client.exceptions.NoSuchKey:
            raise ObjectNotFound(f"{self.uri(key)} does not exist") from None
        digest = hashlib.sha256()
        for chunk in iter(lambda: body.read(_CHUNK), b""):
            digest.update(chunk)
        return digest.hexdigest()


def s3_client(endpoint_url: str | None = None, region: str | None = None, max_attempts: int = 8):
    """The one boto3 S3 client factory (store, model and dataset sources alike): endpoint from the
    argument or AWS_ENDPOINT_URL, path-style addressing for custom endpoints (MinIO, moto), standard
    retries with backoff."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.client("s3", endpoint_url=endpoint, region_name=region,
                        config=Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                                      s3={"addressing_style": "path"} if endpoint else None))


def ray_storage(store: Store, key: str) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train/Tune's RunConfig under `<store>/<key>`.

    On S3 the filesystem carries the store's endpoint (MinIO, moto, ...), since pyarrow does not read
    AWS_ENDPOINT_URL by itself, and its region (else AWS_REGION / AWS_DEFAULT_REGION); the path is
    then bucket/key without the scheme, as Ray expects with a custom filesystem.
    """
    if isinstance(store, LocalStore):
        return str(Path(store.uri(key)).resolve()), None
    if isinstance(store, S3Store):
        from pyarrow import fs as pafs

        kwargs: dict[str, Any] = {}
        if store.endpoint_url:
            scheme, _, host = store.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = store.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return store.uri(key).removeprefix("s3://"), pafs.S3FileSystem(**kwargs)
    raise TypeError(f"unsupported store {type(store).__name__}")


def open_store(uri: str, endpoint_url: str | None = None, region: str | None = None,
               max_attempts: int = 8) -> Store:
    """Open a local or S3 store from a URI."""
    if uri.startswith("s3://"):
        return S3Store(uri, endpoint_url=endpoint_url, region=region, max_attempts=max_attempts)
    if "://" in uri:
        raise UserError(f"store.uri {uri!r}: use a local path or s3://bucket/prefix")
    return LocalStore(uri)


def store_from_config(store_cfg) -> Store:
    """The store of a `store` config section."""
    return open_store(store_cfg.uri, store_cfg.endpoint_url, store_cfg.region, store_cfg.max_attempts)
