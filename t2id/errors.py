"""User-facing errors.

A `UserError` is a mistake the user can fix (a bad config value, a missing file, bad data).
The CLI prints its message as one line and exits 1; `--debug` shows the traceback.
Anything else is a bug and keeps its traceback, except the storage faults `one_line` knows
(a full disk, a missing bucket, an unreachable endpoint, missing credentials): the user fixes
those too, so they get one line as well.

Ray wraps what a task, actor, Train worker or Tune trial raises: a `RayTaskError` (which holds
the original in `.cause`), Ray Data's `UserCodeException`, Ray Train's `WorkerGroupError` (the
workers' errors by rank in `.worker_failures`) and `ControllerError` (`.controller_failure`).
`one_line` looks through those wrappers for the original error, so a UserError raised in a worker
reads the same as one raised on the driver. Ray Data keeps only the text of a UDF's error (its
UserCodeException holds no exception object), so there the wrapper's traceback text is read for
the UserError's own last line (`t2id.errors.UserError: <message>`).
"""

from __future__ import annotations

import errno
import re
import sys


class UserError(Exception):
    """An error caused by input the user controls; the message says what is wrong and what to do."""


class ConfigError(UserError):
    """The config file is unreadable or does not validate."""


def _is_ray_wrapper(exc: BaseException) -> bool:
    # By module, so that this file imports nothing heavy (the CLI imports it first). `RayTaskError(UserError)`,
    # the class Ray builds to be both the wrapper and the original's type, is a wrapper too.
    return any(cls.__module__.split(".")[0] == "ray" for cls in type(exc).__mro__)


def _wrapped(exc: BaseException) -> list[BaseException]:
    """What a Ray exception wraps, most specific first."""
    inner: list[BaseException] = []
    for attr in ("cause", "controller_failure"):  # RayTaskError / Ray Train's ControllerError
        value = getattr(exc, attr, None)
        if isinstance(value, BaseException):
            inner.append(value)
    failures = getattr(exc, "worker_failures", None)  # Ray Train's WorkerGroupError: rank -> error
    if isinstance(failures, dict):
        inner.extend(failures[rank] for rank in sorted(failures) if isinstance(failures[rank], BaseException))
    inner.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
    return inner


_ERROR_LINE = re.compile(r"^(t2id(?:\.\w+)+)\.(\w+): (.+)$")


def _user_error_in_text(text: str) -> str | None:
    """The message of the last UserError a traceback text ends with ('t2id.errors.UserError: msg'), if any."""
    for line in reversed(text.splitlines()):
        match = _ERROR_LINE.match(line.strip())
        if match is None:
            continue
        cls = getattr(sys.modules.get(match.group(1)), match.group(2), None)
        if isinstance(cls, type) and issubclass(cls, UserError):
            return match.group(3)
    return None


def _storage_line(exc: BaseException) -> str | None:
    """One line for a storage fault the user fixes (disk, bucket, endpoint, credentials), else None."""
    if isinstance(exc, OSError) and not type(exc).__module__.startswith("botocore"):
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{where}no space left on the device ({exc.strerror}); free space or point store.uri elsewhere"
        if exc.errno == errno.EROFS:
            return f"{where}the file system is read-only; point store.uri or store.cache_dir at a writable folder"
        return None
    module = type(exc).__module__
    if not module.startswith(("botocore", "boto3", "s3transfer")):
        return None
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return (f"S3: no usable credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                "with a profile in ~/.aws/credentials, or run where an instance or pod identity is available")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"):
        return (f"S3: cannot reach the endpoint ({exc}); check store.endpoint_url / AWS_ENDPOINT_URL and that "
                "the server is up")
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        bucket = response.get("Error", {}).get("BucketName", "")
        if code == "NoSuchBucket":
            return f"S3: bucket {bucket!r} does not exist ({exc}); create it or fix the s3:// URI"
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"S3: access denied ({exc}); check the credentials and the bucket's policy"
    return None


def one_line(exc: BaseException) -> str | None:
    """The message to print as the one `error:` line for `exc`, or None when it is a bug (keep the traceback).

    A UserError gives its own message; a Ray wrapper gives the one-line message of the error it wraps, if
    that one has one; a storage fault the user fixes gives a line saying what to do.
    """
    seen: set[int] = set()
    wrappers: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if _is_ray_wrapper(current):
            wrappers.append(current)
            todo.extend(_wrapped(current))
        elif isinstance(current, UserError):
            return str(current)
        elif (line := _storage_line(current)) is not None:
            return line
    for wrapper in wrappers:  # Ray Data: only the worker's traceback text is left
        if (message := _user_error_in_text(str(wrapper))) is not None:
            return message
    return None
