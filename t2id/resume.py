"""The one resume primitive: memoize a unit of work in the store by its identity.

A unit is a piece of a stage worth keeping when the stage is killed or rerun: a fold's LoRA
adapter, a fold's teacher, a grid trial's result, a fold's feature cache. Its memo
(`layout.memo(prefix)`) records the unit's identity (everything that makes its outputs what they
are: settings, seeds, input hashes) and the sha256 of each output. The unit is done when the memo
exists, the identity is the same, and every listed output is still there with that hash; anything
else redoes the unit. The memo is written after the outputs, so a unit killed midway has none.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from t2id.store import Store
from t2id.hashing import sha256_json


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
        for key, sha in memo.get("outputs", {}).items():
            if not self.store.exists(key) or self.store.sha256(key) != sha:
                return None
        return memo

    def done(self) -> bool:
        return self.load() is not None

    def clear(self) -> None:
        self.store.delete(self.key)

    def commit(self, outputs: Iterable[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record the unit as done: its identity and the sha256 of each output (which must exist)."""
        memo = {
            "identity_digest": self.digest,
            "identity": self.identity,
            "outputs": {key: self.store.sha256(key) for key in sorted(set(outputs))},
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
