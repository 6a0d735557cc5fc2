"""The one resume primitive: memoize a unit of work in the store by its identity.

A unit is a piece of a stage worth keeping when the stage is killed or rerun: a fold's LoRA
adapter, a fold's teacher, a grid trial's result, a fold's feature cache. Its memo
(`layout.memo(prefix)`) records the unit's identity (everything that makes its outputs what they
are: settings, seeds, input hashes) and the size and sha256 of each output. The unit is done when
the memo exists, the identity is the same, and every listed output is still there with that size
and hash; anything else redoes the unit. The memo is written after the outputs, so a unit killed
midway has none.

`check_outputs` is the one output check, shared with the runner, which runs it on a stage marker's
outputs before skipping the stage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from t2id.hashing import sha256_json
from t2id.store import ObjectNotFound, Store

SMALL_FILE = 1 << 20  # bytes: outputs smaller than this are hashed on every check, larger ones sized
HASH_WORKERS = 16  # hashing is I/O (S3 requests, file reads; hashlib releases the GIL): threads overlap it


@dataclass(frozen=True)
class Damage:
    """One output that is not what its marker or memo recorded."""

    key: str
    problem: str  # "is missing", "changed (size 10 != recorded 20)", "changed (sha256 ... != recorded ...)"

    def __str__(self) -> str:
        return f"output {self.key} {self.problem}"


def output_sizes(store: Store, keys: Iterable[str]) -> dict[str, int]:
    """Size of each of `keys` that exists, from one listing per outermost folder holding them (one LIST
    request per 1000 objects on S3 instead of one HEAD per key)."""
    keys = set(keys)
    folders = {key.rsplit("/", 1)[0] for key in keys if "/" in key}
    outermost = [f for f in folders
                 if not any("/".join(f.split("/")[:i]) in folders for i in range(1, f.count("/") + 1))]
    listed: dict[str, int] = {}
    for folder in outermost:
        listed.update(store.sizes(folder))
    for key in keys - listed.keys():
        if "/" not in key and (size := store.size(key)) is not None:
            listed[key] = size
    return {key: listed[key] for key in keys if key in listed}


def check_outputs(store: Store, outputs: Mapping[str, str], sizes: Mapping[str, int] | None = None, *,
                  hash_all: bool = False, content: bool = False) -> list[Damage]:
    """What is wrong with recorded outputs (key -> sha256, key -> size), in key order; [] when intact.

    Every output must exist with its recorded size. Its sha256 is compared too when the file is small
    (< SMALL_FILE), when no size was recorded (markers older than sizes), and for every file with
    `hash_all`. `content` hashes the bytes as they are (on S3: a download) instead of taking the sha256
    the store recorded when it wrote the object (`t2id run --verify`).
    """
    sizes = sizes or {}
    found = output_sizes(store, outputs)
    damage, to_hash = [], []
    for key in sorted(outputs):
        size = found.get(key)
        if size is None:
            damage.append(Damage(key, "is missing"))
        elif key in sizes and size != sizes[key]:
            damage.append(Damage(key, f"changed (size {size} != recorded {sizes[key]})"))
        elif hash_all or size < SMALL_FILE or key not in sizes:
            to_hash.append(key)

    def digest(key: str) -> str | None:
        try:
            return store.content_sha256(key) if content else store.sha256(key)
        except ObjectNotFound:  # deleted since it was listed
            return None

    with ThreadPoolExecutor(max_workers=max(1, min(HASH_WORKERS, len(to_hash)))) as pool:
        for key, sha in zip(to_hash, pool.map(digest, to_hash)):
            if sha is None:
                damage.append(Damage(key, "is missing"))
            elif sha != outputs[key]:
                damage.append(Damage(key, f"changed (sha256 {sha[:12]} != recorded {outputs[key][:12]})"))
    return sorted(damage, key=lambda d: d.key)


@dataclass(frozen=True)
class Memo:
    store: Store
    key: str  # layout.memo(prefix) of the unit
    identity: Any  # JSON-serializable
    ignore: bool = False  # --force: treat the memo as absent

    @property
    def digest(self) -> str:
        return sha256_json(self.identity)

    def load(self) -> dict[str, Any] | None:
        """The memo when the unit is done with this identity and intact outputs, else None."""
        if self.ignore or not self.store.exists(self.key):
            return None
        try:
            memo = json.loads(self.store.read_text(self.key))
        except ValueError:
            return None  # unreadable memo: redo the unit
        if memo.get("identity_digest") != self.digest:
            return None
        if check_outputs(self.store, memo.get("outputs", {}), memo.get("sizes"), hash_all=True):
            return None
        return memo

    def done(self) -> bool:
        return self.load() is not None

    def clear(self) -> None:
        self.store.delete(self.key)

    def commit(self, outputs: Iterable[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record the unit as done: its identity and the sha256 and size of each output (which must exist)."""
        keys = sorted(set(outputs))
        memo = {
            "identity_digest": self.digest,
            "identity": self.identity,
            "outputs": {key: self.store.sha256(key) for key in keys},
            "sizes": output_sizes(self.store, keys),
            "extra": extra or {},
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.store.write_text(self.key, json.dumps(memo, indent=1, sort_keys=True, default=str))
        return memo


def memoized(memo: Memo, produce: Callable[[], tuple[Iterable[str], dict[str, Any]] | Iterable[str]]
             ) -> tuple[dict[str, Any], bool]:
    """(memo, reused): the stored memo when the unit is done, else run `produce` and commit.

    `produce` returns the unit's output keys, or (output keys, extra facts to keep in the memo).
    """
    found = memo.load()
    if found is not None:
        return found, True
    memo.clear()  # a unit being redone is not done until it says so again
    produced = produce()
    if isinstance(produced, tuple):
        outputs, extra = produced
    else:
        outputs, extra = produced, {}
    return memo.commit(outputs, extra), False
