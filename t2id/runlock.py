"""The run lock: at most one `t2id run` works on a run id at a time.

Two runs of the same run id would otherwise redo each other's stages and delete each other's
outputs (issue 18: one run deleted the other's images, and the final marker pointed at them).
The lock is an object in the run's own store, `<run>/_lock.json` (layout.RUN_LOCK), so it works
wherever the store is, for runs started on different machines:

  {"holder": "user@host:pid", "run_id", "token", "started_at", "heartbeat_at", "stage",
   "lease_seconds", "boot_id"}

Taking it is one atomic create-if-absent (`Store.create`: a hard link on a local folder, a
conditional PUT with If-None-Match on S3), so of two runs started together exactly one gets it.
It is a lease: a background thread rewrites heartbeat_at every lease/10 seconds, and a lock whose
heartbeat is older than its lease is stale (its holder died without releasing it, e.g. kill -9)
and is taken over with a warning. So is the lock of a holder that ran on this very machine (same
host name and boot id) and whose process is gone: a run killed on a laptop is resumed at once.
Any other live lock is taken only with `steal=True` (`--steal-lock`).
`stage` names the stage the holder is on (`t2id status` shows it). Times are UTC; holders on
machines whose clocks disagree by more than the lease could see each other's lock as stale.

Limits, stated: taking over or stealing a lock (read it, check it is the one seen, delete it,
create ours) and renewing it (read, check the token, rewrite) are not single atomic operations;
two runs stealing the same lock within milliseconds of each other could both believe they hold
it. A holder whose lock was taken notices at its next heartbeat and stops at the next stage
boundary without writing that stage's marker.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

from t2id import layout
from t2id.errors import UserError
from t2id.events import Events, LogEvents
from t2id.store import ObjectNotFound, Store

LEASE_SECONDS = 300.0  # a holder silent this long is presumed dead; heartbeats come every tenth of it
KEY = layout.RUN_LOCK


def holder_name() -> str:
    """Who holds a lock, as a person would look for it: user@host:pid."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def boot_id() -> str | None:
    """This machine's boot id (Linux), so a pid is only judged on the machine and boot that issued it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def holder_gone(record: dict[str, Any]) -> bool:
    """True when the lock's holder ran on this machine, in this boot, and its process no longer exists."""
    host, _, pid = str(record.get("holder", "")).rpartition("@")[2].rpartition(":")
    if host != socket.gethostname() or record.get("boot_id") is None or record.get("boot_id") != boot_id():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):  # alive under another user, or no pid: not ours to judge
        return False
    try:  # killed but not yet reaped by its parent (a zombie) is gone too
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def read_lock(store: Store) -> dict[str, Any] | None:
    """The run's lock record, None when the run is not locked. An unreadable lock file counts as
    a lock of an unknown holder with no heartbeat (so it is stale, never a crash)."""
    try:
        text = store.read_text(KEY)
    except ObjectNotFound:
        return None
    try:
        record = json.loads(text)
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    return {"holder": f"unknown (unreadable {store.uri(KEY)})", "started_at": None, "heartbeat_at": None}


def heartbeat_age(record: dict[str, Any], now: datetime | None = None) -> float | None:
    """Seconds since the lock's last heartbeat; None when it has no readable heartbeat."""
    try:
        beat = datetime.fromisoformat(record["heartbeat_at"])
    except (KeyError, TypeError, ValueError):
        return None
    return ((now or _now()) - beat).total_seconds()


def is_stale(record: dict[str, Any], now: datetime | None = None) -> bool:
    """True when the holder has not renewed the lock within its lease (or the lock is unreadable)."""
    age = heartbeat_age(record, now)
    lease = record.get("lease_seconds")
    return age is None or not isinstance(lease, int | float) or age > lease


def describe(record: dict[str, Any]) -> str:
    """'<holder> since <started_at> (stage <stage>, last heartbeat <t>)': who to look for, and where."""
    if record.get("started_at") is None and record.get("heartbeat_at") is None:
        return str(record.get("holder"))  # an unreadable or deleted lock: nothing more to say
    return (f"{record.get('holder')} since {record.get('started_at')} (stage {record.get('stage') or 'none yet'}, "
            f"last heartbeat {record.get('heartbeat_at')})")


class RunLock:
    """A held run lock; renews itself in the background until `release()` (or the `with` block ends)."""

    def __init__(self, store: Store, record: dict[str, Any], events: Events) -> None:
        self.store = store
        self.record = record
        self.events = events
        self.lost: dict[str, Any] | None = None  # the lock record found instead of ours, once taken from us
        self._guard = threading.Lock()  # one writer of the lock object at a time (heartbeat vs set_stage)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"t2id-runlock-{record['run_id']}",
                                        daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    def set_stage(self, stage: str | None) -> None:
        """Record the stage this run is on (`t2id status` reads it); fails if the lock was taken."""
        with self._guard:
            self.record["stage"] = stage
        self.check()

    def check(self) -> None:
        """Renew the lock now; raise a UserError when another run has taken it (stole it, or saw it stale)."""
        with self._guard:
            self._renew()
        if self.lost is not None:
            raise UserError(f"run '{self.run_id}' lost its lock to {describe(self.lost)} while on stage "
                            f"{self.record.get('stage')}; stopping without marking that stage done")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock, if it is still ours."""
        self._stop.set()
        self._thread.join()
        try:
            with self._guard:
                current = read_lock(self.store)
                if current is not None and current.get("token") == self.record["token"]:
                    self.store.delete(KEY)
        except Exception as exc:  # never hide the run's own outcome behind a failed unlock
            self.events.warning(f"run '{self.run_id}': could not release the run lock {self.store.uri(KEY)} "
                                f"({exc}); the next run takes it over once it is stale "
                                f"({self.record['lease_seconds']} s)")

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _renew(self) -> None:
        """Rewrite our lock with a fresh heartbeat; note it as lost when it is no longer ours."""
        if self.lost is not None:
            return
        current = read_lock(self.store)
        if current is None or current.get("token") != self.record["token"]:
            self.lost = current or {"holder": "nobody (the lock was deleted)"}
            return
        self.record["heartbeat_at"] = _iso(_now())
        self.store.write_text(KEY, json.dumps(self.record, indent=1))

    def _heartbeat(self) -> None:
        interval = float(self.record["lease_seconds"]) / 10
        while not self._stop.wait(interval):
            try:
                with self._guard:
                    self._renew()
            except Exception as exc:  # a store hiccup: the lease has 9 more intervals to succeed in
                self.events.warning(f"run '{self.run_id}': could not renew the run lock ({exc}); retrying")
            if self.lost is not None:
                return


def acquire(store: Store, run_id: str, steal: bool = False, lease_seconds: float = LEASE_SECONDS,
            events: Events | None = None) -> RunLock:
    """Take the run lock of `store` (the run's store) or fail at once naming its holder.

    A stale lock (no heartbeat within its lease) or one whose holder's process is gone from this
    machine is taken over with a warning; a live one only with `steal` (`t2id run --steal-lock`),
    also with a warning naming what was stolen.
    """
    events = events or LogEvents()
    started = _iso(_now())
    record = {"holder": holder_name(), "run_id": run_id, "token": uuid.uuid4().hex, "started_at": started,
              "heartbeat_at": started, "stage": None, "lease_seconds": lease_seconds, "boot_id": boot_id()}
    for _ in range(5):  # each pass either takes the lock, fails, or removes a dead/stolen one
        if store.create(KEY, json.dumps(record, indent=1).encode()):
            return RunLock(store, record, events)
        current = read_lock(store)
        if current is None:
            continue  # released between our create and our read: try again
        if steal:
            events.warning(f"run '{run_id}': stealing the run lock of {describe(current)}")
        elif holder_gone(current):
            events.warning(f"run '{run_id}': taking over the run lock of {describe(current)}: that process is no "
                           f"longer running on this machine")
        elif is_stale(current):
            age = heartbeat_age(current)
            why = ("it has no readable heartbeat" if age is None else
                   f"no heartbeat for {age:.0f} s (lease {current.get('lease_seconds')} s)")
            events.warning(f"run '{run_id}': taking over the stale run lock of {describe(current)}: {why}")
        else:
            raise UserError(f"run '{run_id}' is locked by {describe(current)}; if that run is dead, "
                            f"rerun with --steal-lock")
        if read_lock(store) == current:  # still the lock we judged: remove it (see the module's limits)
            store.delete(KEY)
    raise UserError(f"run '{run_id}': could not take the run lock {store.uri(KEY)}: other runs keep taking it; "
                    f"check who is running this run id")
