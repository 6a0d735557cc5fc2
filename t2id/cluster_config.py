"""Config section `cluster`: where Ray runs."""

from __future__ import annotations

from pydantic import Field

from t2id.configbase import Section


class ClusterConfig(Section):
    address: str | None = Field(
        None, description="Ray address to connect to; default RAY_ADDRESS, else start a local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (default: all of this machine's).")
    namespace: str = Field("t2id", description="Kubernetes namespace for RayJobs.")
    image: str = Field("t2id:gpu", description="Container image for Ray pods.")
