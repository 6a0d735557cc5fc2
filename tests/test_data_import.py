"""Import and validation: every defect is named with its reason, valid edge cases pass, the
source is never modified, the data stage writes its tables locally and on the S3 test server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import boto3
import cv2
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from t2id import layout
from t2id.config import validate_config
from t2id.data.manifest import IMAGE_SCHEMA, image_id_of
from t2id.data.phantom import write_phantom
from t2id.data.validate import decode_check, parse_label, scan_dataset
from t2id.errors import UserError
from t2id.data.stage import STAGE as DATA_STAGE
from t2id.runner import run_pipeline as _run_pipeline
from t2id.runner import run_store
from t2id.split.stage import STAGE as SPLIT_STAGE

STAGES = {"data": DATA_STAGE, "split": SPLIT_STAGE}


def run_pipeline(cfg, **kwargs):
    """The real runner with just this issue's stages (importing every stage loads torch & co.)."""
    return _run_pipeline(cfg, stages=STAGES, **kwargs)

NAMES = ["a", "b", "c"]


def _png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, data = cv2.imencode(".png", image)
    path.write_bytes(data.tobytes())


def _noise(h, w, c=None, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    top = 65535 if dtype == np.uint16 else 255
    shape = (h, w) if c is None else (h, w, c)
    return rng.integers(0, top, shape).astype(dtype)


# The corrupted-input fixture: one file per rejection reason, plus every valid edge case.
# path -> a phrase its rejection reason must contain
DEFECTS = {
    "labels/orphan.txt": "label without image",
    "images/notes.gif": "unknown extension",
    "images/anon.png": "no subject",
    "images/s2_dup.png": "duplicate image: same content as images/s1_rgb.png",
    "images/s2_broken.png": "undecodable image",
    "labels/s3_fields.txt": "expected 5 fields",
    "labels/s3_text.txt": "non-numeric",
    "labels/s3_nan.txt": "non-finite",
    "labels/s3_class.txt": "class id 7 out of range",
    "labels/s3_coords.txt": "normalized to [0, 1]",
    "labels/s3_zero.txt": "width and height must be positive",
    "labels/s3_outside.txt": "box extends outside the image",
}
VALID = {  # image -> number of boxes
    "images/s1_crlf.png": 2,
    "images/s1_empty.png": 0,
    "images/s1_16bit.png": 1,
    "images/s1_photo.jpg": 1,
    "images/s2_gray_wide.png": 1,
    "images/s1_rgb.png": 1,
    "images/s2_background.png": 0,  # no label file at all
}


def make_corrupt_dataset(root: Path) -> Path:
    img = root / "images"
    lab = root / "labels"
    lab.mkdir(parents=True)
    box = "1 0.5 0.5 0.2 0.2\n"
    # valid
    _png(img / "s1_crlf.png", _noise(40, 40, seed=1))
    (lab / "s1_crlf.txt").write_bytes(b"0 0.5 0.5 0.2 0.2\r\n2 0.25 0.25 0.1 0.1\r\n\r\n\n")
    _png(img / "s1_empty.png", _noise(40, 40, seed=2))
    (lab / "s1_empty.txt").write_text("")
    _png(img / "s1_16bit.png", _noise(48, 32, dtype=np.uint16, seed=3))
    (lab / "s1_16bit.txt").write_text(box)
    ok, jpg = cv2.imencode(".jpg", _noise(30, 50, 3, seed=4))
    (img / "s1_photo.jpg").write_bytes(jpg.tobytes())
    (lab / "s1_photo.txt").write_text(box)
    _png(img / "s2_gray_wide.png", _noise(24, 64, seed=5))
    (lab / "s2_gray_wide.txt").write_text("2 0.9995 0.5 0.001 0.3\n")  # pokes out < tolerance: clipped
    _png(img / "s1_rgb.png", _noise(32, 32, 3, seed=6))
    (lab / "s1_rgb.txt").write_text(box)
    _png(img / "s2_background.png", _noise(32, 32, seed=7))
    # defects
    (lab / "orphan.txt").write_text(box)
    (img / "notes.gif").write_bytes(b"GIF89a")
    _png(img / "anon.png", _noise(32, 32, seed=8))
    (img / "s2_dup.png").write_bytes((img / "s1_rgb.png").read_bytes())
    (img / "s2_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    bad = {"fields": "0 0.5 0.5 0.2\n", "text": "0 0.5 half 0.2 0.2\n", "nan": "0 nan 0.5 0.2 0.2\n",
           "class": "7 0.5 0.5 0.2 0.2\n", "coords": "0 1.5 0.5 0.2 0.2\n", "zero": "0 0.5 0.5 0 0.2\n",
           "outside": "0 0.95 0.5 0.2 0.2\n"}
    for i, (name, line) in enumerate(bad.items()):
        _png(img / f"s3_{name}.png", _noise(32, 32, seed=20 + i))
        (lab / f"s3_{name}.txt").write_text(box + line)
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images", "val": "images", "names": NAMES}))
    (root / ".DS_Store").write_bytes(b"junk")  # hidden files are not data
    return root


REGEX = r"^(?P<subject>s\d+)_"


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
        digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


@pytest.fixture
def corrupt(tmp_path) -> Path:
    return make_corrupt_dataset(tmp_path / "bad")


def test_every_defect_is_named_and_edge_cases_pass(corrupt):
    scan = scan_dataset(corrupt, subject_regex=REGEX)
    reasons = {r.path: r.reason for r in scan.rejected}
    assert set(reasons) == set(DEFECTS), reasons
    for path, phrase in DEFECTS.items():
        assert phrase in reasons[path], (path, reasons[path])
    accepted = {r.path: r for r in scan.images}
    assert {p: len(r.boxes) for p, r in accepted.items()} == VALID
    assert (accepted["images/s1_16bit.png"].width, accepted["images/s1_16bit.png"].height) == (32, 48)
    assert (accepted["images/s2_gray_wide.png"].width, accepted["images/s2_gray_wide.png"].height) == (64, 24)
    clipped = accepted["images/s2_gray_wide.png"].boxes[0]
    assert clipped[1] + clipped[3] / 2 <= 1.0
    assert accepted["images/s2_background.png"].label_path is None
    assert "image images/s3_class.png not imported" in reasons["labels/s3_class.txt"]


def test_decode_check_rejects_damaged_files_with_a_reason():
    ok, png = cv2.imencode(".png", _noise(40, 40, seed=9))
    png = png.tobytes()
    assert decode_check(png, ".png") == (40, 40)
    flipped = bytearray(png)
    flipped[png.index(b"IDAT") + 40] ^= 0xFF  # a flipped byte inside the pixel data: its chunk CRC fails
    ok, jpg = cv2.imencode(".jpg", _noise(30, 50, 3, seed=4))
    jpg = jpg.tobytes()
    damaged = {"flipped": (bytes(flipped), ".png"), "truncated": (png[: len(png) // 2], ".png"),
               "not an image": (b"\x89PNG\r\n\x1a\n garbage", ".png"), "empty": (b"", ".png"),
               "truncated jpeg": (jpg[: len(jpg) // 2], ".jpg")}
    for name, (data, ext) in damaged.items():
        reason = decode_check(data, ext)
        assert isinstance(reason, str) and reason.startswith("undecodable image"), (name, reason)
        assert reason == decode_check(data, ext) and "0x" not in reason  # reproducible quarantine rows


def test_subject_map_variants(corrupt, tmp_path):
    rows = ["image,subject"] + [f"{p},{p.split('/')[1].split('_')[0]}" for p in VALID]
    (tmp_path / "map.csv").write_text("\n".join(rows) + "\n")
    scan = scan_dataset(corrupt, subject_map=str(tmp_path / "map.csv"))
    assert {r.path for r in scan.images} == set(VALID)
    assert {r.group for r in scan.images} == {"s1", "s2"}
    (tmp_path / "map.yaml").write_text(yaml.safe_dump({Path(p).stem: "x" for p in VALID}))  # stems work too
    assert len(scan_dataset(corrupt, subject_map=str(tmp_path / "map.yaml")).images) == len(VALID)


def make_subject_clash_dataset(root: Path) -> Path:
    """Two subjects, each with a frame001.png in its own folder (the issue's case)."""
    for i, subject in enumerate(("s1", "s2")):
        for j in (1, 2):
            _png(root / "images" / subject / f"frame00{j}.png", _noise(16, 16, seed=100 + 10 * i + j))
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images", "names": NAMES}))
    return root


def test_subject_map_matches_paths_and_rejects_ambiguous_basenames(tmp_path):
    root = make_subject_clash_dataset(tmp_path / "clash")
    frames = [f"{s}/frame00{j}.png" for s in ("s1", "s2") for j in (1, 2)]
    # Keyed by the path relative to the dataset root, or by an unambiguous tail of it: each frame
    # gets its own subject (basename matching with "first wins" put all of s2 into s1).
    for keys in ([f"images/{f}" for f in frames], frames):
        (tmp_path / "map.csv").write_text("image,subject\n" + "".join(f"{k},{k.split('/')[-2]}\n" for k in keys))
        scan = scan_dataset(root, subject_map=str(tmp_path / "map.csv"))
        assert {r.path: r.group for r in scan.images} == {f"images/{f}": f.split("/")[0] for f in frames}
    # A basename naming two images is an error that lists the clash, on one line.
    (tmp_path / "map.csv").write_text("frame001.png,s1\nframe002.png,s1\n")
    with pytest.raises(UserError) as err:
        scan_dataset(root, subject_map=str(tmp_path / "map.csv"))
    message = str(err.value)
    assert "'frame001.png' -> images/s1/frame001.png, images/s2/frame001.png" in message
    assert "'frame002.png'" in message and "relative to the dataset root" in message and "\n" not in message
    # One image under two keys with different subjects, and one key given two subjects: errors too.
    (tmp_path / "map.csv").write_text("images/s1/frame001.png,s1\ns1/frame001.png,s9\n")
    with pytest.raises(UserError, match="different subjects: images/s1/frame001.png"):
        scan_dataset(root, subject_map=str(tmp_path / "map.csv"))
    (tmp_path / "map.csv").write_text("s1/frame001.png,s1\ns1/frame001.png,s2\n")
    with pytest.raises(UserError, match="line 2: 's1/frame001.png' is given subject 's2'"):
        scan_dataset(root, subject_map=str(tmp_path / "map.csv"))


def test_parse_label_accepts_crlf_and_blank_lines():
    boxes, problems = parse_label("0 0.5 0.5 0.2 0.2\r\n\r\n   \n1 0.1 0.1 0.1 0.1\r\n", 2)
    assert problems == [] and [b[0] for b in boxes] == [0, 1]
    assert parse_label("", 2) == ([], [])
    _, problems = parse_label("0 0.5 0.5 0.2 0.2\n0 inf 0.5 0.2 0.2\n2 0.5 0.5 0.2 0.2\n", 2)
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3"]


def test_ultralytics_layout_with_train_val_and_dict_names(tmp_path):
    root = tmp_path / "ds"
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            _png(root / "images" / split / f"p{i}_{split}.png", _noise(32, 32, seed=hash((split, i)) % 1000))
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"p{i}_{split}.txt").write_text("1 0.5 0.5 0.3 0.3\n")
    (root / "labels" / "train.cache").write_bytes(b"ultralytics cache")  # ignored
    (root / "data.yaml").write_text(yaml.safe_dump({"path": "/somewhere/else", "train": "images/train",
                                                    "val": "images/val", "names": {0: "x", 1: "y"}}))
    scan = scan_dataset(root, subject_regex=r"^(?P<subject>p\d)_")
    assert not scan.rejected and len(scan.images) == 5 and scan.names == ["x", "y"]
    assert all(r.boxes[0][0] == 1 for r in scan.images)


def test_missing_subject_source_is_a_clear_error(tmp_path):
    root = tmp_path / "ds"
    _png(root / "images" / "a.png", _noise(8, 8))
    with pytest.raises(UserError, match="subject_map"):
        scan_dataset(root, class_names=["x"])


def test_check_cli_prints_each_rejection_and_exits_1(corrupt, tmp_path):
    from t2id.cli import app

    before = _tree_digest(corrupt)
    result = CliRunner().invoke(app, ["data", "check", str(corrupt), "--subject-regex", REGEX])
    assert result.exit_code == 1, result.output
    for path, phrase in DEFECTS.items():
        assert any(line.startswith(f"{path}: ") and phrase in line for line in result.stdout.splitlines()), path
    assert _tree_digest(corrupt) == before  # the source is never modified
    good = write_phantom(tmp_path / "good", subjects=2, frames_per_subject=2, size=64)
    result = CliRunner().invoke(app, ["data", "check", str(good)])
    assert result.exit_code == 0, result.output


def _config(store_uri: str, source: str, **data):
    return validate_config({
        "run": {"id": "r1", "stages": ["data", "split"]},
        "store": {"uri": store_uri, "cache_dir": str(Path(store_uri).parent / "cache")
                  if not store_uri.startswith("s3://") else "/tmp/t2id-test-cache-unused"},
        "data": {"source": source, **data},
        "split": {"folds": 2},
    })


def test_data_stage_imports_quarantines_and_skips(corrupt, tmp_path):
    before = _tree_digest(corrupt)
    cfg = _config(str(tmp_path / "store"), str(corrupt), subject_regex=REGEX)
    outcomes = run_pipeline(cfg, only="data")
    assert outcomes[0].status == "ran"
    store = run_store(cfg)
    manifest = store.read_table(layout.data.manifest)
    assert manifest.schema.equals(IMAGE_SCHEMA)
    assert manifest.num_rows == len(VALID)
    for row in manifest.to_pylist():
        key = store.key_of(row["uri"])
        assert key == layout.data.image(row["image_id"], Path(key).suffix)
        assert store.sha256(key) == row["sha256"] and row["image_id"] == image_id_of(row["sha256"])
    quarantine = store.read_table(layout.data.quarantine).to_pylist()
    assert {r["path"] for r in quarantine} == set(DEFECTS)
    assert json.loads(store.read_text(layout.data.classes)) == {"names": NAMES}
    stats = {r["name"]: r for r in store.read_table(layout.data.stats).to_pylist()}
    assert stats["b"]["instances"] == 3 and stats["c"]["images"] == 2
    assert store.read_bytes(layout.data.class_distribution)[:8] == b"\x89PNG\r\n\x1a\n"
    assert _tree_digest(corrupt) == before
    # unchanged config and source: skipped; a changed source file: imported again
    assert run_pipeline(cfg, only="data")[0].status == "skipped"
    (corrupt / "labels" / "orphan.txt").unlink()
    assert run_pipeline(cfg, only="data")[0].status == "ran"
    assert len(store.read_table(layout.data.quarantine)) == len(DEFECTS) - 1


def test_strict_import_fails_naming_the_files(corrupt, tmp_path):
    cfg = _config(str(tmp_path / "store"), str(corrupt), subject_regex=REGEX, strict=True)
    with pytest.raises(UserError, match="labels/orphan.txt: label without image"):
        run_pipeline(cfg, only="data")


def test_import_from_s3_into_s3_store(s3_server, s3_bucket, tmp_path):
    src = write_phantom(tmp_path / "ph", subjects=2, frames_per_subject=3, size=64, seed=1)
    client = boto3.client("s3", endpoint_url=s3_server)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        client.upload_file(str(path), s3_bucket, f"datasets/ph/{path.relative_to(src).as_posix()}")
    cfg = validate_config({
        "run": {"id": "r-s3", "stages": ["data", "split"]},
        "store": {"uri": f"s3://{s3_bucket}/runs", "cache_dir": str(tmp_path / "cache")},
        "data": {"source": f"s3://{s3_bucket}/datasets/ph"},
        "split": {"folds": 2},
    })
    from t2id.cli import app

    checked = CliRunner().invoke(app, ["data", "check", f"s3://{s3_bucket}/datasets/ph"])
    assert checked.exit_code == 0 and "6 images" in checked.stdout, checked.output
    outcomes = run_pipeline(cfg)
    assert [o.status for o in outcomes] == ["ran", "ran"]
    store = run_store(cfg)
    manifest = store.read_table(layout.data.manifest)
    assert manifest.num_rows == 6 and set(manifest["group"].to_pylist()) == {"s00", "s01"}
    assert all(u.startswith(f"{layout.data.images}/") for u in manifest["uri"].to_pylist())  # run-relative keys
    assert all(store.uri(store.key_of(u)).startswith(f"s3://{s3_bucket}/runs/r-s3/") for u in manifest["uri"].to_pylist())
    assert store.read_table(layout.data.quarantine).num_rows == 0
    assert [o.status for o in run_pipeline(cfg)] == ["skipped", "skipped"]
    # an object changed upstream changes the fingerprint: the import runs again, and split after it
    label_key = "datasets/ph/labels/s00_f000.txt"
    text = client.get_object(Bucket=s3_bucket, Key=label_key)["Body"].read().decode()
    without_straps = "".join(line + "\n" for line in text.splitlines() if not line.startswith("3 "))
    assert without_straps != text
    client.put_object(Bucket=s3_bucket, Key=label_key, Body=without_straps.encode())
    assert [o.status for o in run_pipeline(cfg)] == ["ran", "ran"]
    straps = sum(b["class_id"] == 3 for boxes in store.read_table(layout.data.manifest)["boxes"].to_pylist() for b in boxes)
    assert straps == sum(b["class_id"] == 3 for boxes in manifest["boxes"].to_pylist() for b in boxes) - 2


def test_validation_is_unaffected_by_ultralytics_patching_pillow():
    # ultralytics replaces PIL.Image.open on import with a wrapper that tries to install pi-heif for any
    # file Pillow cannot identify; in a process that trains detectors, validation must still quarantine.
    import PIL.Image
    import ultralytics.utils.patches  # noqa: F401  (installs the patch)

    from t2id.data.validate import decode_check

    assert PIL.Image.open is not ultralytics.utils.patches._image_open  # the patch is really active here
    assert decode_check(b"not an image at all", ".png") == "undecodable image: not a valid PNG file"
    assert decode_check(b"\xff\xd8\xff garbage", ".jpg").startswith("undecodable image:")
