"""t2id: T2ID-CAS (text-to-image diffusion + class-aware sampling) as resumable Ray batch jobs."""

__version__ = "0.1.0"
