"""Classification data (issue 21): the image-level phantom, image-folder / CSV import with defects, stratified split."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from t2id import layout
from t2id.classify.importer import image_label, scan_classification
from t2id.classify.phantom import PLANE_NAMES, write_classify_phantom
from t2id.config import validate_config
from t2id.data.stage import STAGE as DATA_STAGE
from t2id.errors import UserError
from t2id.runner import run_pipeline, run_store
from t2id.split.stage import STAGE as SPLIT_STAGE

STAGES = {"data": DATA_STAGE, "split": SPLIT_STAGE}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_classify_phantom(tmp_path_factory.mktemp("cph") / "ds", subjects=4, frames_per_subject=12, size=32)


def test_phantom_is_long_tailed_seeded_and_has_every_plane_in_every_subject(phantom, tmp_path):
    files = sorted(p.relative_to(phantom).as_posix() for p in phantom.glob("*/*.png"))
    per_class = Counter(f.split("/")[0] for f in files)
    assert set(per_class) == set(PLANE_NAMES) and len(files) == 48
    assert per_class["tracheal ring plane"] < per_class["thyroid lobe plane"] / 2  # rare at the sweep's ends
    assert per_class["vocal fold plane"] < per_class["thyroid cartilage plane"] / 2
    per_subject = Counter((f.split("/")[1][:3], f.split("/")[0]) for f in files)
    assert all(per_subject[(f"s{s:02d}", c)] >= 1 for s in range(4) for c in PLANE_NAMES)
    again = write_classify_phantom(tmp_path / "again", subjects=4, frames_per_subject=12, size=32)
    assert all((again / f).read_bytes() == (phantom / f).read_bytes() for f in files)


def make_defects(phantom: Path, root: Path) -> dict[str, str]:
    """A copy of the phantom with one of each defect; returns path -> the words its reason must hold."""
    shutil.copytree(phantom, root)
    first = sorted((root / "cricoid plane").glob("*.png"))
    (root / "cricoid plane" / "broken.png").write_bytes(first[0].read_bytes()[:60])  # truncated PNG
    (root / "elbow view").mkdir()
    shutil.copy(first[1], root / "elbow view" / "e1.png")  # unknown class folder
    lobe = sorted((root / "thyroid lobe plane").glob("*.png"))[0]
    shutil.copy(lobe, root / "tracheal ring plane" / "copy.png")  # same content under two classes
    shutil.copy(first[2], root / "cricoid plane" / "z_again.png")  # same content twice in one class
    ring = sorted((root / "tracheal ring plane").glob("s*.png"))[0]
    shutil.copy(ring, root / "tracheal ring plane" / "nosubject.png")
    (root / "tracheal ring plane" / "nosubject.png").write_bytes(ring.read_bytes() + b"\0")  # new content, unmapped
    (root / "stray.png").write_bytes(ring.read_bytes())  # not in a class folder
    with open(root / "subjects.csv", "a") as fh:  # the copies have subjects: duplicates are what they are rejected for
        fh.write("tracheal ring plane/copy.png,s00\ncricoid plane/z_again.png,s01\n")
    with open(root / "classes.txt", "a") as fh:
        fh.write("carotid plane\n")  # a class without images
    rel_lobe = f"thyroid lobe plane/{lobe.name}"
    return {"cricoid plane/broken.png": "undecodable", "elbow view/e1.png": "unknown class 'elbow view'",
            "tracheal ring plane/copy.png": "conflicting labels", rel_lobe: "conflicting labels",
            "cricoid plane/z_again.png": "duplicate image: same content as cricoid plane/s",
            "tracheal ring plane/nosubject.png": "no subject", "stray.png": "not in a class folder",
            "carotid plane/": "has no valid image"}


def test_image_folder_defects_become_manifest_and_quarantine_rows(phantom, tmp_path):
    expected = make_defects(phantom, tmp_path / "ds")
    cfg = validate_config({
        "run": {"id": "c1", "task": "classify", "stages": ["data", "split"]},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "data": {"source": str(tmp_path / "ds")}, "split": {"folds": 2},
        "grid": {"strategies": ["baseline"]},
    })
    with pytest.raises(UserError, match="carotid plane"):  # every class needs subjects: the split says which
        run_pipeline(cfg, stages=STAGES)
    store = run_store(cfg)
    quarantine = store.read_table(layout.data.quarantine).to_pylist()
    reasons = {r["path"]: r["reason"] for r in quarantine}
    assert set(reasons) == set(expected), reasons
    for path, words in expected.items():
        assert words in reasons[path], (path, reasons[path])
    manifest = store.read_table(layout.data.manifest)
    assert manifest.num_rows == 48 - 1  # the lobe image lost to the label conflict; z_again.png was a copy
    labels = Counter(image_label(b) for b in manifest["boxes"].to_pylist())
    assert labels[PLANE_NAMES.index("thyroid lobe plane")] == Counter(
        p.parent.name for p in phantom.glob("*/*.png"))["thyroid lobe plane"] - 1
    assert all(b == [{"class_id": b[0]["class_id"], "x": 0.5, "y": 0.5, "w": 1.0, "h": 1.0}]
               for b in manifest["boxes"].to_pylist())


def test_csv_labels_with_subjects_and_stratified_subject_grouped_split(phantom, tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    rows = ["path,label,subject"]
    for i, p in enumerate(sorted(phantom.glob("*/*.png"))):
        shutil.copy(p, root / f"img{i:03d}.png")
        rows.append(f"img{i:03d}.png,{p.parent.name},{p.name[:3]}")
    rows.append("missing.png,cricoid plane,s00")
    rows.append(rows[1])  # listed twice with one label: fine
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "unlisted.png").write_bytes((root / "img001.png").read_bytes() + b"\0")
    scan = scan_classification(root, labels="labels.csv", class_names=PLANE_NAMES)
    reasons = {r.path: r.reason for r in scan.rejected}
    assert set(reasons) == {"missing.png", "unlisted.png"}
    assert "does not exist" in reasons["missing.png"] and "not listed" in reasons["unlisted.png"]
    assert len(scan.images) == 48 and {r.group for r in scan.images} == {"s00", "s01", "s02", "s03"}

    cfg = validate_config({
        "run": {"id": "c2", "task": "classify", "stages": ["data", "split"]},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "data": {"source": str(root), "labels": "labels.csv", "class_names": PLANE_NAMES},
        "split": {"folds": 2}, "grid": {"strategies": ["baseline"]},
    })
    run_pipeline(cfg, stages=STAGES)
    store = run_store(cfg)
    fold_classes = store.read_table(layout.split.fold_classes).to_pylist()
    for name in PLANE_NAMES:  # stratified: every plane is validated in every fold
        assert all(r["images"] > 0 for r in fold_classes if r["name"] == name), name
    folds = store.read_table(layout.split.folds)
    for g in {"s00", "s01", "s02", "s03"}:  # subject-grouped
        assert len(set(folds.filter(pc.equal(folds["group"], g))["fold"].to_pylist())) == 1


def test_phantom_source_check_cli_and_config_rules(tmp_path):
    from t2id.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["data", "phantom", str(tmp_path / "p"), "--task", "classify", "--subjects", "2",
                                 "--frames", "6", "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "tracheal ring plane" in result.output
    (tmp_path / "p" / "cricoid plane" / "bad.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["data", "check", str(tmp_path / "p"), "--task", "classify"])
    assert result.exit_code == 1 and "cricoid plane/bad.png: undecodable" in result.output
    with pytest.raises(Exception, match="remove 'label' from run.stages"):
        validate_config({"run": {"task": "classify", "stages": ["data", "label"]}, "grid": {"strategies": ["cas"]}})
    with pytest.raises(Exception, match="mosaic"):
        validate_config({"run": {"task": "classify"}})
    assert "label" not in validate_config({"run": {"task": "classify"}, "grid": {"strategies": ["cas"]}}).run.stages
    with pytest.raises(Exception, match="layout_lora but run.task is classify"):
        validate_config({"run": {"task": "classify"}, "grid": {"strategies": ["cas"]}, "lora": {"method": "layout_lora"}})


def test_demo_config_plans_and_preflight_names_missing_classifier_weights(tmp_path):
    from t2id.config import builtin_config, load_config
    from t2id.plan import make_plan
    from t2id.preflight import preflight

    cfg = load_config(builtin_config("demo-classify"), overrides={"store.uri": str(tmp_path / "s"),
                                                                  "store.cache_dir": str(tmp_path / "c")})
    plan = make_plan(cfg, "demo-classify")
    assert plan.dataset.images == 96 and plan.dataset.rare_images > 0
    assert next(p for p in plan.stages if p.stage == "grid").counts["trials"] == 24
    preflight(cfg)  # random init: nothing to find
    cfg.grid.classifier.weights = str(tmp_path / "resnet50.pth")
    with pytest.raises(UserError, match="grid.classifier.weights .*file not found"):
        preflight(cfg)


def test_demo_rejects_an_unknown_task_in_one_line(tmp_path):
    from t2id.cli import app

    result = CliRunner().invoke(app, ["demo", "--task", "segment", "--out", str(tmp_path)])
    assert isinstance(result.exception, UserError)  # t2id.cli.main prints it as one line
    assert "--task 'segment': use detect or classify" in str(result.exception)
