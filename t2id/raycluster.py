"""Connect to Ray: the configured cluster, RAY_ADDRESS, or a local Ray sized to this machine.

Also the one way Ray work reports progress to the driver's console (`progress_relay`): workers tell a
small actor how far they are, a driver thread forwards the change to the stage's `advance`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from t2id.cluster_config import ClusterConfig
from t2id.events import Advance


def ensure_ray(cluster: ClusterConfig) -> None:
    """Initialize Ray once per process; stages call this lazily so `data`/`split` never pay for it.

    Ray's startup lines (token-auth notice, "Started a local Ray instance") and the workers' output
    (log_to_driver) go to the driver's stdout/stderr: on the quiet console that is the stage's log
    file (t2id.console.StageLogs), with -v the terminal.
    """
    import ray

    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cluster.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)


def shutdown_ray() -> None:
    """Disconnect from (or stop the local) Ray if this process started it; a no-op otherwise.

    The quiet console calls it before giving the terminal back, so workers' last forwarded lines and
    Ray's exit messages land in the stage log rather than after the run's summary.
    """
    import sys

    ray = sys.modules.get("ray")  # never import Ray just to find it was not running
    if ray is not None and ray.is_initialized():
        ray.shutdown()


class _Relay:
    """Latest progress per unit (e.g. a LoRA fold's optimizer step): absolute values, so a worker
    restarted from a checkpoint never counts a step twice."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def set(self, unit: str, value: float) -> None:
        self.values[unit] = max(value, self.values.get(unit, 0))

    def get(self) -> dict[str, float]:
        return self.values


@contextlib.contextmanager
def progress_relay(advance: Advance, poll_seconds: float = 0.5) -> Iterator[Any]:
    """A Ray actor handle that remote code calls as `relay.set.remote(unit, done_so_far)` (fire and
    forget); while the block runs, a driver thread adds the total's growth to `advance`. Ray must be
    initialized. The actor takes no CPU, so it never competes with the work for a slot."""
    import ray

    actor = ray.remote(num_cpus=0)(_Relay).remote()
    stop = threading.Event()
    reported = 0.0

    def forward() -> None:
        nonlocal reported
        with contextlib.suppress(Exception):  # progress is a courtesy: it never fails the work
            total = sum(ray.get(actor.get.remote(), timeout=30).values())
            if total > reported:
                advance(int(total - reported))
                reported = total

    def poll() -> None:
        while not stop.wait(poll_seconds):
            forward()

    thread = threading.Thread(target=poll, name="t2id-progress", daemon=True)
    thread.start()
    try:
        yield actor
    finally:
        stop.set()
        thread.join()
        forward()  # the last steps reported before the work returned
        with contextlib.suppress(Exception):
            ray.kill(actor)
