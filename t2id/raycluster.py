"""Connect to Ray: the configured cluster, RAY_ADDRESS, or a local Ray sized to this machine."""

from __future__ import annotations

import os

from t2id.cluster_config import ClusterConfig


def ensure_ray(cluster: ClusterConfig) -> None:
    """Initialize Ray once per process; stages call this lazily so `data`/`split` never pay for it."""
    import ray

    if ray.is_initialized():
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cluster.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)
