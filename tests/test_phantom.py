"""The phantom: deterministic, YOLO-valid, long-tailed, subject-correlated."""

from __future__ import annotations

import csv
import hashlib

import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from t2id.data.config import PAPER_CLASSES
from t2id.data.phantom import write_phantom
from t2id.data.validate import scan_dataset


def _tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return write_phantom(tmp_path_factory.mktemp("phantom"), subjects=6, frames_per_subject=10, size=128, seed=0)


def test_same_arguments_give_identical_files(tmp_path):
    a = write_phantom(tmp_path / "a", subjects=2, frames_per_subject=3, size=64, seed=5)
    b = write_phantom(tmp_path / "b", subjects=2, frames_per_subject=3, size=64, seed=5)
    c = write_phantom(tmp_path / "c", subjects=2, frames_per_subject=3, size=64, seed=6)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)


def test_layout_names_and_subject_map(phantom):
    spec = yaml.safe_load((phantom / "data.yaml").read_text())
    assert [spec["names"][i] for i in range(len(PAPER_CLASSES))] == PAPER_CLASSES
    images = sorted(p.name for p in (phantom / "images").glob("*.png"))
    labels = sorted(p.name for p in (phantom / "labels").glob("*.txt"))
    assert len(images) == 60 and [n.replace(".png", ".txt") for n in images] == labels
    rows = list(csv.DictReader((phantom / "subjects.csv").open()))
    assert {r["subject"] for r in rows} == {f"s{i:02d}" for i in range(6)}
    img = cv2.imread(str(phantom / "images" / images[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (128, 128) and img.dtype == np.uint8


def test_valid_and_long_tailed_with_every_class_in_every_subject(phantom):
    scan = scan_dataset(phantom)  # the importer's checks accept every file
    assert not scan.rejected and len(scan.images) == 60
    instances = np.zeros(len(PAPER_CLASSES), int)
    subjects_with = [set() for _ in PAPER_CLASSES]
    for rec in scan.images:
        for c, x, y, w, h in rec.boxes:
            instances[c] += 1
            subjects_with[c].add(rec.group)
            assert w * 128 >= 8 and h * 128 >= 8  # big enough for a tiny detector at low imgsz
    rare = {PAPER_CLASSES.index("tracheal ring"), PAPER_CLASSES.index("vocal fold")}
    common = set(range(len(PAPER_CLASSES))) - rare
    assert max(instances[c] for c in rare) < min(instances[c] for c in common)  # Fig. 2's long tail
    assert instances.max() / instances.min() >= 5
    assert all(len(s) == 6 for s in subjects_with)


def test_frames_of_a_subject_look_alike(phantom):
    def load(s, f):  # compare anatomy and gain, not the speckle grain: blur first
        image = cv2.imread(str(phantom / "images" / f"s{s:02d}_f{f:03d}.png"), 0).astype(np.float32)
        return cv2.GaussianBlur(image, (0, 0), 3)

    within = np.mean([np.abs(load(s, 4) - load(s, 5)).mean() for s in range(3)])
    between = np.mean([np.abs(load(s, 4) - load(s + 1, 4)).mean() for s in range(3)])
    assert within < 0.6 * between


def test_cli_writes_phantom(tmp_path):
    from t2id.cli import app

    result = CliRunner().invoke(app, ["data", "phantom", str(tmp_path / "p"), "--subjects", "2", "--frames", "2",
                                      "--size", "64", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p" / "images").glob("*.png"))) == 4
    assert "tracheal ring" in result.output
