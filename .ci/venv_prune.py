"""Make a venv hold exactly what a lock file names: uninstall every other distribution.

`pip install -r LOCK` adds and upgrades but never removes, so a package dropped from the lock
would linger in an existing venv and tests could pass on a machine where a fresh install fails.
Run with the venv's own interpreter: `.venv/bin/python .ci/venv_prune.py requirements.lock`.
"""
from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

KEEP = {"pip", "t2id"}  # the installer itself, and the project (installed editable, not locked)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_names(lock: Path) -> set[str]:
    pattern = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==")
    return {canonical(m.group(1)) for line in lock.read_text().splitlines() if (m := pattern.match(line))}


def main(lock_path: str) -> int:
    wanted = locked_names(Path(lock_path)) | KEEP
    extra = sorted({canonical(d.metadata["Name"]) for d in distributions()} - wanted)
    if extra:
        print(f"removing {len(extra)} package(s) not in {lock_path}: {', '.join(extra)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
