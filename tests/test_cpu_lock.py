"""The CPU image's lock (issue 16, item 11): requirements.lock minus the CUDA-only packages torch
never loads on a CPU, byte for byte the same pins and hashes, regenerated without drift; and the
`pip check` stand-in that the CPU image runs (.ci/cpu_lock.py --verify-env) on real metadata."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_lock import read_lock

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_lock():
    """.ci/cpu_lock.py as a module (.ci is not a package)."""
    spec = importlib.util.spec_from_file_location("cpu_lock", REPO / ".ci" / "cpu_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_lock_is_the_main_lock_minus_the_named_cuda_packages(cpu_lock):
    main = read_lock(REPO / "requirements.lock")
    cpu = read_lock(REPO / "requirements-cpu.lock")
    assert set(main) - set(cpu) == cpu_lock.LEFT_OUT
    assert set(cpu) <= set(main)
    for name, pins in cpu.items():  # same versions, markers and hashes: the tested wheels, nothing re-resolved
        assert [(str(r), h) for r, h in pins] == [(str(r), h) for r, h in main[name]], name
    # What the CPU image still carries of torch's CUDA runtime is a named, reasoned choice too.
    kept_cuda = {n for n in cpu if re.match(r"^(nvidia-|cuda-|triton$)", n)}
    assert kept_cuda == cpu_lock.KEPT
    assert {"torch", "torchvision", "ray", "ultralytics", "opencv-python"} <= set(cpu)


def test_regenerating_the_cpu_lock_changes_nothing(cpu_lock):
    # `make lock` runs the script with the system python3 (standard library only): the same call here.
    out = subprocess.run([sys.executable, "-I", str(REPO / ".ci" / "cpu_lock.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert cpu_lock.derive((REPO / "requirements.lock").read_text()) == (REPO / "requirements-cpu.lock").read_text()
    assert "$(PYTHON) .ci/cpu_lock.py" in (REPO / "Makefile").read_text().split("\nlock:")[1].split("\n\n")[0]


def test_a_torch_upgrade_that_renames_a_cuda_package_stops_make_lock(cpu_lock):
    lock = (REPO / "requirements.lock").read_text()
    renamed = lock.replace("nvidia-cusolver==", "nvidia-cusolver-cu14==")  # neither left out nor kept
    with pytest.raises(SystemExit, match=r"LEFT_OUT names \['nvidia-cusolver'\] are not in requirements.lock"):
        cpu_lock.derive(renamed)
    added = lock.replace("nvidia-nvtx==", "nvidia-nvtx==13.0.85 \\\n    --hash=sha256:" + "0" * 64 + "\n"
                         "nvidia-npp==13.0.1.2 \\\n    --hash=sha256:" + "1" * 64 + "\nnvidia-nvtx==", 1)
    with pytest.raises(SystemExit, match=r"CUDA packages \['nvidia-npp'\] in neither LEFT_OUT nor KEPT"):
        cpu_lock.derive(added)


def test_verify_env_allows_exactly_the_left_out_packages_to_be_missing(cpu_lock):
    """On this venv's real metadata (the full lock): take the left-out packages away and torch's
    requirements on them are the only unmet ones, which --verify-env accepts; take numpy away too and
    it is refused, naming who needs it; leave a left-out package in and it is refused."""
    installed, requires = cpu_lock.environment()
    assert cpu_lock.unmet_requirements(installed, requires) == []  # `pip check` of this venv: clean
    cpu = {n: v for n, v in installed.items() if n not in cpu_lock.LEFT_OUT}
    reqs = {n: r for n, r in requires.items() if n in cpu}
    unmet = cpu_lock.unmet_requirements(cpu, reqs)
    assert {dep for _, dep, _ in unmet} == {"triton", "cuda-bindings", "cuda-toolkit"}  # torch's direct ones
    assert {name for name, _, _ in unmet} == {"torch"}
    assert cpu_lock.cpu_venv_problems(cpu, reqs) == []
    no_numpy = {n: v for n, v in cpu.items() if n != "numpy"}
    problems = cpu_lock.cpu_venv_problems(no_numpy, reqs)
    assert problems and all("requires numpy: not installed" in p for p in problems)
    assert any(p.startswith("torchvision requires numpy") for p in problems)
    assert cpu_lock.cpu_venv_problems(installed, requires) == [
        f"{n} is installed, but LEFT_OUT of the CPU lock" for n in sorted(cpu_lock.LEFT_OUT)]


def test_cpu_image_installs_the_cpu_lock_and_verifies_it():
    text = (REPO / "docker" / "Dockerfile.cpu").read_text().replace("\\\n", " ")
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert any("--require-hashes --no-deps -r /src/requirements-cpu.lock" in line for line in installs), installs
    assert not any("requirements.lock" in line for line in installs)
    assert "COPY requirements-cpu.lock /src/" in text and "COPY .ci/cpu_lock.py /src/.ci/" in text
    assert "python /src/.ci/cpu_lock.py --verify-env" in text
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert {"!requirements-cpu.lock", "!.ci/cpu_lock.py"} <= set(ignore)
