"""The store: same behaviour on a local folder and on a real S3 API server (moto on loopback)."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import urllib.request

import pyarrow as pa
import pytest

from t2id.store import TMP_PREFIX, LocalStore, ObjectNotFound, S3Store, open_store


def test_bytes_roundtrip_and_sha(store):
    digest = store.write_bytes("a/b/c.bin", b"hello")
    assert digest == hashlib.sha256(b"hello").hexdigest()
    assert store.read_bytes("a/b/c.bin") == b"hello"
    assert store.sha256("a/b/c.bin") == digest
    assert store.exists("a/b/c.bin") and not store.exists("a/b/missing")


def test_overwrite_replaces_whole_object(store):
    store.write_bytes("k", b"x" * 1000)
    store.write_bytes("k", b"short")
    assert store.read_bytes("k") == b"short"


def test_files_and_tables(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    digest = store.write_file("files/big.bin", src)
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    out = store.read_file("files/big.bin", tmp_path / "dl" / "big.bin")
    assert out.read_bytes() == src.read_bytes()

    table = pa.table({"image_id": ["a", "b"], "fold": [0, 1]})
    store.write_table("t/x.parquet", table)
    assert store.read_table("t/x.parquet").equals(table)


def test_list_delete_and_child(store):
    for key in ["run/x/1", "run/x/2", "run/y/3", "other/4"]:
        store.write_text(key, key)
    assert store.list("run") == ["run/x/1", "run/x/2", "run/y/3"]
    assert store.list("run/x/") == ["run/x/1", "run/x/2"]
    assert store.list("ru") == []  # folder semantics, not string prefix
    child = store.child("run")
    assert child.list() == ["x/1", "x/2", "y/3"]
    assert child.read_text("y/3") == "run/y/3"
    assert child.key_of(child.uri("x/1")) == "x/1"
    child.delete("x/1")
    child.delete("x/1")  # deleting an absent key is fine
    assert store.list("run") == ["run/x/2", "run/y/3"]
    assert store.delete_prefix("run") == 2
    assert store.list("run") == []


def test_missing_object_is_a_clear_error(store, tmp_path):
    with pytest.raises(ObjectNotFound, match="does not exist"):
        store.read_bytes("nope")
    with pytest.raises(ObjectNotFound):
        store.read_file("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_invalid_keys_rejected(store):
    for key in ["", "/abs", "a/../b", "a//b"]:
        with pytest.raises(ValueError):
            store.write_bytes(key, b"x")


def test_store_is_picklable_for_ray(store):
    import pickle

    clone = pickle.loads(pickle.dumps(store))
    store.write_text("p", "v")
    assert clone.read_text("p") == "v"


def test_open_store_rejects_other_schemes():
    from t2id.errors import UserError

    with pytest.raises(UserError, match="s3://bucket/prefix"):
        open_store("gs://bucket/x")


# Atomicity: an interrupted write leaves no visible object.

_UPLOAD = """
import sys
from t2id.store import open_store
open_store(sys.argv[1], endpoint_url=sys.argv[3] or None).write_file("obj", sys.argv[2])
"""


def _wait_for(predicate, proc, timeout=60.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def test_local_writer_killed_mid_write_leaves_no_visible_object(tmp_path):
    """The writer is SIGKILLed while its temp file is half written: readers never see `obj`."""
    store = LocalStore(tmp_path / "store")
    fifo = tmp_path / "source.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-c", _UPLOAD, store.root, str(fifo), ""])
    with open(fifo, "wb") as feeder:  # blocks until the uploader opens the fifo
        feeder.write(os.urandom(9 * 1024 * 1024))  # more than one chunk: the temp file gets data
        feeder.flush()
        tmp_written = lambda: any(p.stat().st_size > 0 for p in (tmp_path / "store").glob(TMP_PREFIX + "*"))
        assert _wait_for(tmp_written, proc), "uploader never started writing"
        proc.kill()  # the source is still open: the upload is mid-way
        proc.wait()
    assert not store.exists("obj")
    assert store.list() == []  # the leftover temp file is invisible to readers


def test_s3_writer_killed_mid_multipart_leaves_no_visible_object(s3_server, s3_bucket, tmp_path):
    """SIGKILL during a multipart upload: the object never appears (parts are not an object)."""
    import boto3

    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(96 * 1024 * 1024))
    store = S3Store(f"s3://{s3_bucket}/r", endpoint_url=s3_server)
    client = boto3.client("s3", endpoint_url=s3_server)
    proc = subprocess.Popen([sys.executable, "-c", _UPLOAD, store.root, str(big), s3_server])
    started = lambda: bool(client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"))
    assert _wait_for(started, proc), "upload finished before it could be interrupted"
    proc.kill()
    proc.wait()
    assert not store.exists("obj")
    assert store.list() == []


def test_local_writer_failure_removes_temp_file(tmp_path):
    store = LocalStore(tmp_path / "s")

    class Boom(Exception):
        pass

    def fill(fh):
        fh.write(b"partial")
        raise Boom

    with pytest.raises(Boom):
        store._publish("x/y", fill)
    assert not store.exists("x/y")
    assert list((tmp_path / "s" / "x").iterdir()) == []


def test_local_write_skips_fsync_only_when_not_durable(tmp_path, monkeypatch):
    """generate's per-image records are written with durable=False: the same atomic publish, minus the fsync
    (every other object, and the PNG before its record, is fsynced)."""
    store = LocalStore(tmp_path / "s")
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store.write_bytes("a.png", b"png")
    assert len(synced) == 1
    assert store.write_text("a.json", '{"k": 1}', durable=False) == hashlib.sha256(b'{"k": 1}').hexdigest()
    assert len(synced) == 1 and store.read_text("a.json") == '{"k": 1}'
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["a.json", "a.png"]  # no temp file left


# Retries: transient S3 errors (503) are retried with backoff.

class _FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to the moto server but answers 503 to the first `failures` requests."""

    upstream = ""
    failures = 0
    seen = 0

    def _handle(self):
        cls = type(self)
        cls.seen += 1
        body = self._read_body()
        if cls.failures > 0:
            cls.failures -= 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "transfer-encoding", "content-length", "expect")}
        headers.setdefault("Content-Type", "binary/octet-stream")  # else urllib marks it as a form post
        req = urllib.request.Request(cls.upstream + self.path, data=body or None, method=self.command,
                                     headers=headers)
        try:
            resp = urllib.request.urlopen(req)
            status, headers, payload = resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            status, headers, payload = err.code, err.headers, err.read()
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b""):  # trailers
            pass
        return b"".join(parts)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

    def log_message(self, *args):
        pass


def test_s3_transient_errors_are_retried(s3_server, s3_bucket):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _FlakyProxy.upstream = s3_server
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _FlakyProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = S3Store(f"s3://{s3_bucket}/r", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=5)
        _FlakyProxy.failures, _FlakyProxy.seen = 2, 0
        store.write_bytes("k", b"payload")
        assert _FlakyProxy.seen >= 3  # two 503s, then the write went through
        _FlakyProxy.failures = 2
        assert store.read_bytes("k") == b"payload"

        impatient = S3Store(f"s3://{s3_bucket}/r", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2)
        _FlakyProxy.failures = 5
        with pytest.raises(Exception, match="503|ServiceUnavailable|reached max retries"):
            impatient.read_bytes("k")
    finally:
        server.shutdown()


# Exclusive create (the run lock), sizes, content hashes.

def test_create_is_exclusive(store):
    assert store.create("locks/l.json", b"first") is True
    assert store.create("locks/l.json", b"second") is False
    assert store.read_bytes("locks/l.json") == b"first"
    assert store.list("locks") == ["locks/l.json"]  # no temp file left behind by the refused create
    barrier = threading.Barrier(4)
    wins = []

    def race(i):
        barrier.wait()
        wins.append(store.create("locks/race.json", f"{i}".encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False, False, False, True]


def test_sizes_and_size(store):
    store.write_bytes("s/a.bin", b"12345")
    store.write_bytes("s/b/c.bin", b"")
    assert store.sizes("s") == {"s/a.bin": 5, "s/b/c.bin": 0}
    assert store.size("s/a.bin") == 5 and store.size("s/missing") is None and store.size("s/b") is None


def test_content_sha256_reads_the_bytes_not_the_metadata(s3_server, s3_bucket):
    """On S3 `sha256` trusts the metadata recorded at write time; `content_sha256` (--verify) does not."""
    store = S3Store(f"s3://{s3_bucket}/r", endpoint_url=s3_server)
    recorded = store.write_bytes("k", b"original")
    store._client.put_object(Bucket=s3_bucket, Key="r/k", Body=b"replaced", Metadata={"sha256": recorded})
    assert store.sha256("k") == recorded
    assert store.content_sha256("k") == hashlib.sha256(b"replaced").hexdigest()


def test_published_files_follow_the_umask(tmp_path):
    """Readable by the group sharing a store: 0666 & ~umask like any file a program writes, where
    mkstemp's 0600 locked everyone else out."""
    previous = os.umask(0o022)
    try:
        store = LocalStore(tmp_path / "s")
        store.write_bytes("a/b.bin", b"x")
        store.write_file("a/c.bin", __file__)
        store.create("a/lock.json", b"{}")
        os.umask(0o007)
        store.write_bytes("a/d.bin", b"x")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "s" / "a").iterdir()}
    assert modes == {"b.bin": 0o644, "c.bin": 0o644, "lock.json": 0o644, "d.bin": 0o660}


# Folder markers: Ray Tune / pyarrow write keys ending in '/' on S3 (issue 18, item 3).

def test_s3_folder_markers_are_not_keys_and_cleanup_removes_them(s3_server, s3_bucket):
    import boto3

    from t2id.resume import output_sizes

    client = boto3.client("s3", endpoint_url=s3_server)
    store = S3Store(f"s3://{s3_bucket}/run", endpoint_url=s3_server)
    for marker in ("run/grid/", "run/grid/tune/", "run/grid/tune/fold=0-cas-seed=0/"):
        client.put_object(Bucket=s3_bucket, Key=marker, Body=b"")
    store.write_text("grid/tune/fold=0-cas-seed=0/result.json", "{}")
    store.write_text("grid/trials.parquet", "t")
    assert store.list("grid") == ["grid/trials.parquet", "grid/tune/fold=0-cas-seed=0/result.json"]
    assert store.list() == store.list("grid")
    assert output_sizes(store, ["grid/trials.parquet"]) == {"grid/trials.parquet": 1}
    for key in store.list("grid/tune"):  # list-then-delete cleanup (e.g. stale outputs) never sees a marker
        store.delete(key)
    assert store.delete_prefix("grid/tune") == 0  # only markers were left: removed, not counted
    left = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="run/").get("Contents", [])]
    assert left == ["run/grid/", "run/grid/trials.parquet"]
    assert store.delete_prefix("grid") == 1
    assert client.list_objects_v2(Bucket=s3_bucket, Prefix="run/").get("KeyCount") == 0
