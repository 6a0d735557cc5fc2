"""The lock is the environment: pyproject's ranges admit it, this venv is exactly it, the images
install it hash-checked, and make reinstalls when pyproject.toml or a lock changes."""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def read_lock(path: Path) -> dict[str, list[tuple[Requirement, list[str]]]]:
    """name -> [(pinned requirement with its marker, hashes)]; a name may be pinned per marker."""
    entries: dict[str, list[tuple[Requirement, list[str]]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if not line or line.startswith((" ", "#")):
            continue
        spec, _, rest = line.partition(" --hash=")
        hashes = re.findall(r"sha256:[0-9a-f]{64}", line)
        req = Requirement(spec.strip())
        entries.setdefault(canonicalize_name(req.name), []).append((req, hashes))
    return entries


def applicable(entries: list[tuple[Requirement, list[str]]]) -> Requirement | None:
    hits = [req for req, _ in entries if req.marker is None or req.marker.evaluate()]
    assert len(hits) <= 1, f"more than one pin applies here: {hits}"
    return hits[0] if hits else None


def pinned_version(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


@pytest.fixture(scope="module")
def lock():
    return read_lock(REPO / "requirements.lock")


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["test"]
    lines += [line.split("#")[0].strip() for line in (REPO / "requirements.in").read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def test_lock_satisfies_every_direct_requirement(lock):
    # A pyproject.toml edit without `make lock` fails here, naming the requirement.
    for req in direct_requirements():
        pins = lock.get(canonicalize_name(req.name))
        assert pins, f"{req.name} is required but not in requirements.lock; run `make lock`"
        pin = applicable(pins)
        assert pin is not None and req.specifier.contains(pinned_version(pin), prereleases=True), (
            f"requirements.lock pins {pin} but pyproject/requirements.in asks {req}; run `make lock`")
        missing_extras = req.extras - pin.extras
        for extra in missing_extras:  # extras are expanded into their own pins
            dist_reqs = metadata.requires(req.name) or []
            for dep in (Requirement(d) for d in dist_reqs):
                if dep.marker and dep.marker.evaluate({"extra": extra}) and not dep.marker.evaluate({"extra": ""}):
                    assert canonicalize_name(dep.name) in lock, f"{req.name}[{extra}] needs {dep.name}, not locked"


@pytest.mark.parametrize("lock_name", ["requirements.lock", "requirements-cpu.lock", "requirements-iac.lock"])
def test_every_pin_is_exact_and_hashed(lock_name):
    entries = read_lock(REPO / lock_name)
    assert len(entries) > 20
    for name, pins in entries.items():
        for req, hashes in pins:
            pinned_version(req)
            assert hashes, f"{lock_name}: {name} has no --hash; pip --require-hashes would refuse the lock"


def test_this_environment_is_exactly_the_lock(lock):
    # The machine CI runs on may keep packages from earlier sessions; `make install` prunes them.
    drift = []
    for name, pins in lock.items():
        pin = applicable(pins)
        if pin is None:
            continue
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            drift.append(f"{name}: locked {pinned_version(pin)}, not installed")
            continue
        if installed != pinned_version(pin):
            drift.append(f"{name}: locked {pinned_version(pin)}, installed {installed}")
    assert not drift, "venv differs from requirements.lock (run `make install`): " + "; ".join(drift)


@pytest.mark.parametrize(("dockerfile", "lock_name"), [("docker/Dockerfile.cpu", "requirements-cpu.lock"),
                                                       ("docker/Dockerfile.gpu", "requirements.lock")])
def test_images_install_exactly_the_lock(dockerfile, lock_name, lock):
    # The CPU image's lock is this lock minus CUDA-only packages (tests/test_cpu_lock.py).
    text = (REPO / dockerfile).read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert any(f"-r /src/{lock_name}" in line and "--require-hashes" in line for line in installs), installs
    for line in installs:  # nothing else may resolve packages on its own
        assert "--require-hashes" in line or "--no-deps" in line, f"{dockerfile}: unlocked install: {line}"
    assert f"COPY {lock_name}" in text
    assert f"!{lock_name}" in (REPO / ".dockerignore").read_text()
    ray_arg = set(re.findall(r"ARG RAY_VERSION=(\S+)", text))
    assert ray_arg == {pinned_version(applicable(lock["ray"]))}, f"{dockerfile}: RAY_VERSION {ray_arg} != lock"


@pytest.mark.parametrize(("changed", "target", "expect"), [
    ("pyproject.toml", ".venv/.t2id-installed", "--require-hashes -r requirements.lock"),
    ("requirements.lock", ".venv/.t2id-installed", "--require-hashes -r requirements.lock"),
    ("requirements-iac.lock", ".venv-iac/.t2id-iac-installed", "--require-hashes -r requirements-iac.lock"),
])
def test_a_changed_input_reinstalls(changed, target, expect):
    # make's what-if (-W) pretends the file just changed; -n prints what would run, runs nothing.
    out = subprocess.run(["make", "-n", "-W", changed, target], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert expect in out and ".ci/venv_prune.py" in out
