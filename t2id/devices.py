"""One device resolver: `auto | cpu | cuda` from a config field to what torch, ultralytics and Ray
need. `auto` means a GPU when the process (or the Ray cluster, for placement) has one."""

from __future__ import annotations

from typing import Literal

from t2id.errors import UserError

DeviceChoice = Literal["auto", "cpu", "cuda"]


def resolve_device(choice: str, field: str) -> str:
    """'cuda' or 'cpu' for this process; `field` names the config key in the error."""
    import torch

    if choice not in ("auto", "cpu", "cuda"):
        raise UserError(f"{field}: {choice!r} is not a device; use auto, cpu or cuda")
    has_cuda = torch.cuda.is_available()
    if choice == "cuda" and not has_cuda:
        raise UserError(f"{field}: 'cuda' but this process sees no GPU; use 'auto' or 'cpu', or run it on a GPU worker")
    return "cuda" if choice == "cuda" or (choice == "auto" and has_cuda) else "cpu"


def ultralytics_device(device: str) -> str:
    """ultralytics spells the first GPU '0'."""
    return "0" if device == "cuda" else "cpu"


def ray_gpus(choice: str, field: str, gpus_per_task: float = 1.0) -> float:
    """GPUs to request per Ray task/actor for `choice`, checked against the connected Ray cluster."""
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if choice == "cuda" and have < gpus_per_task:
        raise UserError(f"{field}: 'cuda' but the Ray cluster has {have:g} GPU(s); use 'auto' or 'cpu'")
    if choice == "cuda" or (choice == "auto" and have >= gpus_per_task):
        return gpus_per_task
    return 0.0
