"""Canonical hashes of JSON-able values (markers, memos, settings)."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def sha256_json(obj: Any) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces): equal values hash equal everywhere."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
