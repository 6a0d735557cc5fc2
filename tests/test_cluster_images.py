"""What the images need that no linter sees (issue 16): the system libraries behind cv2, and the
built-in configs of a regular (non-editable) install, as `pip install /src` lays it out in the images."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "gpu": REPO / "docker" / "Dockerfile.gpu"}
# What the slim base (python:3.11-slim-bookworm = debian:bookworm-slim + python) already has: libc,
# the C++ runtime apt itself links, zlib that dpkg links.
BASE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}


def _runtime_apt_packages(dockerfile: Path) -> set[str]:
    """Packages `apt-get install` adds in the final stage (after the last FROM)."""
    final = dockerfile.read_text().split("\nFROM ")[-1]
    packages: set[str] = set()
    for match in re.finditer(r"apt-get install ([^&]*)", final.replace("\\\n", " ")):
        packages |= {w for w in match.group(1).split() if not w.startswith("-")}
    return packages


def _dpkg(*args: str) -> str:
    return subprocess.run(["dpkg-query", *args], capture_output=True, text=True, check=True).stdout


def _closure(packages: set[str]) -> set[str]:
    """The packages apt installs for `packages`: their Depends/Pre-Depends, transitively (from this
    machine's dpkg database, Debian bookworm like the CPU image's base)."""
    seen: set[str] = set()
    todo = list(packages)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        fields = _dpkg("-W", "-f=${Depends}, ${Pre-Depends}", name)
        for alternative in filter(None, (p.strip() for p in fields.split(","))):
            dep = alternative.split("|")[0].split()[0].split(":")[0]
            todo.append(dep)
    return seen


def _cv2_shared_object() -> Path:
    import cv2

    folder = Path(cv2.__file__).parent
    found = sorted(folder.glob("cv2*.so")) + sorted(folder.glob("python-3*/cv2*.so"))
    assert found, f"no cv2 extension module in {folder}"
    return found[0]


@pytest.mark.skipif(not shutil.which("ldd") or not shutil.which("dpkg-query"), reason="needs ldd and dpkg")
def test_cpu_image_apt_list_satisfies_ldd_of_cv2():
    """Every system library cv2 (opencv-python, ultralytics' dependency) loads must come from the
    base image or from what Dockerfile.cpu installs; otherwise `import cv2` (the data stage) dies in
    the image with `ImportError: libGL.so.1` while it works here."""
    if "bookworm" not in Path("/etc/os-release").read_text():
        pytest.skip("the package mapping is read from a Debian bookworm dpkg database (the CPU base image's)")
    so = _cv2_shared_object()
    venv = Path(sys.prefix).resolve()
    libs = {}
    for line in subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=True).stdout.splitlines():
        match = re.match(r"\s*(\S+) => (/\S+)", line)
        if match and not Path(match.group(2)).resolve().is_relative_to(venv):  # bundled .libs come with the wheel
            libs[match.group(1)] = match.group(2)
    assert "libGL.so.1" in libs  # what the image lacked
    owners = {}
    for soname, path in libs.items():
        out = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
        if out.returncode != 0:  # /lib -> /usr/lib merged paths
            out = subprocess.run(["dpkg", "-S", str(Path(path).resolve())], capture_output=True, text=True)
        assert out.returncode == 0, f"{soname}: {path} belongs to no Debian package here"
        owners[soname] = out.stdout.split(":")[0]
    for kind in ("cpu", "gpu"):  # both on the same slim Debian base (test below)
        provided = _closure(_runtime_apt_packages(DOCKERFILES[kind])) | BASE_PACKAGES
        missing = {soname: pkg for soname, pkg in owners.items() if pkg not in provided}
        assert missing == {}, f"Dockerfile.{kind}'s apt-get install lacks the packages of {missing}"


def test_both_images_run_the_python_the_lock_was_resolved_for():
    """Ray refuses a worker whose Python major.minor differs from the head's (head and CPU workers
    run the CPU image, GPU workers the GPU image), and the lock pins other numpy/scipy releases for
    Python >= 3.12 than the 3.11 ones CI tests: both images start from one python:3.11 base."""
    bases = {}
    for kind, dockerfile in DOCKERFILES.items():
        text = dockerfile.read_text()
        [bases[kind]] = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M)
        froms = re.findall(r"^FROM (\S+)", text, flags=re.M)
        assert froms == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"], (kind, froms)
    assert bases["cpu"] == bases["gpu"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim-bookworm", bases["cpu"])
    assert match, bases
    lock_python = re.search(r"--python-version (\d+)\.(\d+)", (REPO / "Makefile").read_text()).groups()
    assert match.groups() == lock_python == (str(sys.version_info.major), str(sys.version_info.minor))


def test_a_regular_install_finds_its_built_in_configs(tmp_path):
    """`python -m jobs.pipeline --smoke-test` and `t2id demo` in the image load the built-in demo
    config from the installed package (no checkout beside it): build the wheel the images build,
    install it under a prefix, and look the config up from there."""
    src = tmp_path / "src"  # what the images COPY to /src; building here keeps setuptools' build/ out of REPO
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("t2id", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(src)], check=True, capture_output=True, cwd=tmp_path)
    [wheel] = wheels.glob("t2id-*.whl")
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", "--prefix", str(prefix),
                    str(wheel)], check=True, capture_output=True)
    site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    probe = ("import t2id, t2id.config as c; p = c.builtin_config('demo'); c.load_config(p); "
             "print(t2id.__file__); print(p)")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    module, config = out.stdout.split()
    assert Path(module).is_relative_to(site)  # the installed copy, not this checkout
    assert Path(config) == prefix / "share" / "t2id" / "configs" / "demo.yaml"
    for name in ("cpu", "gpu"):  # the images' build stage has configs/ where pip install /src reads it
        assert "COPY configs /src/configs" in DOCKERFILES[name].read_text()
