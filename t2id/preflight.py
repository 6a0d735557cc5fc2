"""Checks before a run starts Ray: what can be found wrong up front is found in seconds, as one line.

`t2id run` and `t2id demo` call `preflight(cfg, stages)` right after loading the config; a runner or
job that starts stages another way can call it too. For the stages about to run, it checks:

  1. the store: local, its run folder can be created and a file written and removed there (a path
     under a regular file, a read-only folder, a full disk fail here), and the same for
     store.cache_dir; S3, credentials are present, the endpoint answers within a few seconds, the
     bucket exists and a probe object can be written and deleted;
  2. data.source when it is an s3:// prefix: credentials, endpoint, bucket;
  3. weights named by a local path or an s3:// URI, for the stages that load them:
     lora.base_model (lora, generate, label's inpaint), evaluate.inception_weights and
     evaluate.clip_weights (evaluate; clip also for generate's CLIP gate), the detector weights of
     grid.detector.model and of label's teacher when they name a weights file rather than a model
     yaml. 'tiny' is built in; a hub id is resolved by its stage (from the local hub cache).

S3 calls here use a short connect timeout and at most 2 attempts: the store's client retries
`store.max_attempts` times with backoff, right for a flaky network in a long run but ~20 s of
silence before saying that an endpoint is simply wrong. Every problem is a UserError that names
the config field, the value and the fix.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from t2id.errors import UserError
from t2id.store import TMP_PREFIX, LocalStore, store_from_config

if TYPE_CHECKING:
    from t2id.config import T2IDConfig

CONNECT_TIMEOUT_S = 3.0
ATTEMPTS = 2
TINY = "tiny"


# --- local folders ---------------------------------------------------------------------------------

def _first_file_on_path(path: Path) -> Path | None:
    """The first component of `path` that exists and is not a folder (it blocks creating the rest)."""
    for parent in [*reversed(path.parents), path]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def _folder_problem(field: str, value: str, path: Path, exc: OSError) -> UserError:
    if isinstance(exc, (NotADirectoryError, FileExistsError)) and (blocker := _first_file_on_path(path)):
        return UserError(f"{field} {value!r}: {blocker} is a file, not a folder; point {field} at a folder")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UserError(f"{field} {value!r}: cannot write in {exc.filename or path} (permission denied); "
                         f"choose a folder you can write to, or fix its permissions")
    if exc.errno == errno.EROFS:
        return UserError(f"{field} {value!r}: {exc.filename or path} is on a read-only file system; "
                         f"point {field} at a writable folder")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"{field} {value!r}: no space left on the device ({exc.strerror}); free space there "
                         f"or point {field} elsewhere")
    return UserError(f"{field} {value!r}: cannot write there ({exc.strerror}: {exc.filename or path})")


def check_local_folder(field: str, value: str, path: Path) -> None:
    """`path` can be created and a file written in it and removed again; else a UserError naming `field`."""
    probe = path / f"{TMP_PREFIX}preflight-{uuid.uuid4().hex[:12]}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"t2id preflight\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _folder_problem(field, value, path, exc) from exc
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


# --- S3 --------------------------------------------------------------------------------------------

class _S3:
    """A quick S3 client (short connect timeout, ATTEMPTS attempts) and the buckets already checked."""

    def __init__(self, endpoint_url: str | None, region: str | None) -> None:
        self.endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.region = region
        self._client = None
        self._buckets: set[str] = set()

    @property
    def where(self) -> str:
        return f"the S3 endpoint {self.endpoint}" if self.endpoint else "AWS S3"

    def client(self, field: str, value: str):
        if self._client is None:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import ProfileNotFound

            try:
                credentials = boto3.session.Session().get_credentials()
            except ProfileNotFound as exc:
                raise UserError(f"{field} {value!r}: {exc}; set AWS_PROFILE to a profile in ~/.aws/config, or unset "
                                "it and set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
            if credentials is None:
                raise UserError(f"{field} {value!r}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with a profile in ~/.aws/credentials), or run "
                                "where an instance or pod identity provides them")
            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint, region_name=self.region,
                config=Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=10,
                              retries={"total_max_attempts": ATTEMPTS, "mode": "standard"},
                              s3={"addressing_style": "path"} if self.endpoint else None))
        return self._client

    def call(self, field: str, value: str, operation: str, **kwargs):
        """One S3 call; connection and permission problems become a UserError naming `field`."""
        from botocore.exceptions import (ClientError, ConnectionClosedError, ConnectTimeoutError,
                                         EndpointConnectionError, NoCredentialsError, ReadTimeoutError)

        client = self.client(field, value)
        try:
            return getattr(client, operation)(**kwargs)
        except (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError) as exc:
            raise UserError(f"{field} {value!r}: cannot reach {self.where} ({exc}); check store.endpoint_url / "
                            "AWS_ENDPOINT_URL and that the server is up") from None
        except NoCredentialsError:
            raise UserError(f"{field} {value!r}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            bucket = kwargs.get("Bucket", "")
            if code in ("404", "NoSuchBucket") and operation == "head_bucket":
                raise UserError(f"{field} {value!r}: bucket '{bucket}' does not exist at {self.where}; create it "
                                f"(e.g. `aws s3 mb s3://{bucket}`) or fix {field}") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
                raise UserError(f"{field} {value!r}: access to bucket '{bucket}' denied at {self.where} ({code}); "
                                "check the credentials and the bucket's policy") from None
            raise

    def check_bucket(self, field: str, value: str) -> tuple[str, str]:
        """Credentials, endpoint and bucket of an s3:// `value`; returns (bucket, key prefix)."""
        bucket, _, prefix = value.removeprefix("s3://").partition("/")
        if not bucket:
            raise UserError(f"{field} {value!r}: expected s3://bucket[/prefix]")
        if bucket not in self._buckets:
            self.call(field, value, "head_bucket", Bucket=bucket)
            self._buckets.add(bucket)
        return bucket, prefix.strip("/")

    def check_object(self, field: str, value: str, key: str | None = None, hint: str = "") -> None:
        """The object `value` (or `key` under the prefix `value`) exists."""
        bucket, prefix = self.check_bucket(field, value)
        from botocore.exceptions import ClientError

        full = f"{prefix}/{key}" if key else prefix
        try:
            self.call(field, value, "head_object", Bucket=bucket, Key=full)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                raise UserError(f"{field} {value!r}: s3://{bucket}/{full} does not exist; "
                                f"{hint or 'upload it or fix the URI'}") from None
            raise

    def check_prefix(self, field: str, value: str, hint: str = "") -> None:
        """At least one object exists under the prefix `value`."""
        bucket, prefix = self.check_bucket(field, value)
        listing = self.call(field, value, "list_objects_v2", Bucket=bucket, Prefix=f"{prefix}/" if prefix else "",
                            MaxKeys=1)
        if not listing.get("Contents"):
            raise UserError(f"{field} {value!r}: no objects under that prefix; {hint or 'upload them or fix the URI'}")


# --- weights -----------------------------------------------------------------------------------------

_WEIGHTS_HINT = "run `t2id models cache` on a machine with internet, or point it at a local {kind}"


def _check_weights(s3: _S3, field: str, value: str, kind: str) -> None:
    """`kind`: 'file' (a weights file), 'folder' (a save_pretrained folder) or 'sdxl' (a diffusers SDXL folder)."""
    if value == TINY:
        return
    hint = _WEIGHTS_HINT.format(kind="file" if kind == "file" else "folder")
    if value.startswith("s3://"):
        if kind == "file":
            s3.check_object(field, value, hint=hint)
        elif kind == "sdxl":
            s3.check_object(field, value, key="model_index.json", hint="point it at a diffusers "
                            "StableDiffusionXLPipeline folder (as written by save_pretrained)")
        else:
            s3.check_prefix(field, value, hint=hint)
        return
    path = Path(value).expanduser()
    if kind == "sdxl":
        if not (path.exists() or value.startswith((".", "/", "~"))):
            return  # a hub id ('org/name'): the stage resolves it from the hub cache, or says why not
        if not (path / "model_index.json").is_file():
            raise UserError(f"{field} {value!r}: no model_index.json in that folder; point it at a diffusers "
                            "StableDiffusionXLPipeline folder")
    elif kind == "file" and not path.is_file():
        raise UserError(f"{field} {value!r}: file not found; {hint}")
    elif kind == "folder" and not path.is_dir():
        raise UserError(f"{field} {value!r}: folder not found; {hint}")


def _check_detector(s3: _S3, field: str, model: str) -> None:
    """A detector model yaml is built in or local (its stage checks it); a weights file must exist."""
    if model.endswith((".yaml", ".yml")):
        return
    if model.startswith("s3://"):
        s3.check_object(field, model, hint="upload the weights there or fix the URI")
        return
    path = Path(model).expanduser()
    if path.suffix and not path.is_file():
        raise UserError(f"{field} {model!r}: weights file not found; t2id never downloads weights: copy the file "
                        "there, or name a model yaml (e.g. yolov9s.yaml) for random init")


# --- the checks ----------------------------------------------------------------------------------------

def preflight(cfg: T2IDConfig, stages: Iterable[str] | None = None) -> None:
    """Check the store, an s3:// data source and the weights the `stages` (default: run.stages) load.

    Raises UserError on the first problem; returns quietly when everything needed is in place.
    """
    stages = set(cfg.run.stages if stages is None else stages)
    s3 = _S3(cfg.store.endpoint_url, cfg.store.region)

    # 1. The store (and the local cache every stage writes to).
    store = store_from_config(cfg.store) if cfg.store.uri.startswith("s3://") else None
    if store is None:
        run_root = LocalStore(cfg.store.uri).child(cfg.run.id)
        check_local_folder("store.uri", cfg.store.uri, Path(run_root.root))
    else:
        s3.check_bucket("store.uri", cfg.store.uri)
        run_store = store.child(cfg.run.id)
        probe = f"{TMP_PREFIX}preflight-{uuid.uuid4().hex[:12]}"  # a temp name: never part of the run
        try:
            run_store.write_bytes(probe, b"t2id preflight\n")
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 (the probe's failure, whatever S3 said, is the message)
            raise UserError(f"store.uri {cfg.store.uri!r}: cannot write to {run_store.root} ({exc}); check the "
                            "credentials' permissions (s3:PutObject) and the bucket's policy") from None
        run_store.delete(probe)
    check_local_folder("store.cache_dir", cfg.store.cache_dir, Path(cfg.store.cache_dir).expanduser())

    # 2. The data source on S3.
    if "data" in stages and cfg.data.source.startswith("s3://"):
        s3.check_bucket("data.source", cfg.data.source)

    # 3. Weights, for the stages that load them.
    label = cfg.label
    sdxl = cfg.lora.method != "ddpm"  # ddpm trains from scratch and loads no SDXL (inpaint with ddpm is an error)
    if sdxl and (stages & {"lora", "generate"} or ("label" in stages and label.method != "teacher")):
        _check_weights(s3, "lora.base_model", cfg.lora.base_model, "sdxl")
    if "evaluate" in stages:
        _check_weights(s3, "evaluate.inception_weights", cfg.evaluate.inception_weights, "file")
    if "evaluate" in stages or ("generate" in stages and cfg.generate.quality.min_clip_score is not None):
        _check_weights(s3, "evaluate.clip_weights", cfg.evaluate.clip_weights, "folder")
    if "grid" in stages and cfg.run.task == "classify":
        weights = cfg.grid.classifier.weights  # None: random init
        if weights is not None and weights.startswith("s3://"):
            s3.check_object("grid.classifier.weights", weights, hint="upload the weights there or fix the URI")
        elif weights is not None and not Path(weights).expanduser().is_file():
            raise UserError(f"grid.classifier.weights {weights!r}: file not found; t2id never downloads weights: copy "
                            "the state dict there, or remove grid.classifier.weights to train from scratch")
    elif "grid" in stages:
        _check_detector(s3, "grid.detector.model", cfg.grid.detector.model)
    if "label" in stages and label.method == "teacher":
        teacher = label.teacher.detector
        _check_detector(s3, "label.teacher.detector.model" if teacher else "grid.detector.model",
                        (teacher or cfg.grid.detector).model)
