"""Dataset faults (issue 18, item 4): every bad input file becomes a rejection with its reason, never a traceback,
in `t2id data check` and in the import; pixel formats are stored as 8-bit the way every reader sees them."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from t2id import layout
from t2id.cli import app
from t2id.config import validate_config
from t2id.data.stage import STAGE as DATA_STAGE
from t2id.data.validate import inspect_image, scan_dataset
from t2id.runner import run_pipeline, run_store

REGEX = r"^(?P<subject>s\d+)_"
BOX = "0 0.5 0.5 0.2 0.2\n"


def _png(path: Path, image: np.ndarray) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cv2.imencode(".png", image)[1].tobytes()
    path.write_bytes(data)
    return data


def _pil(path: Path, image: Image.Image, fmt: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)


def _noise(h: int, w: int, c: int | None = None, seed: int = 0, top: int = 255, dtype=np.uint8) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, top + 1, shape).astype(dtype)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _with_sbit(png: bytes, bits: int) -> bytes:
    """The PNG with an sBIT chunk (significant bits of a greyscale image) before its first IDAT."""
    at = png.index(b"IDAT") - 4
    return png[:at] + _chunk(b"sBIT", bytes([bits])) + png[at:]


def _dataset(root: Path) -> Path:
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(yaml.safe_dump({"train": "images", "val": "images", "names": ["a", "b"]}))
    return root


def _data_config(tmp_path: Path, source: Path, **data) -> object:
    return validate_config({
        "run": {"id": "faults", "stages": ["data"]},
        "store": {"uri": str(tmp_path / "store"), "cache_dir": str(tmp_path / "cache")},
        "data": {"source": str(source), "subject_regex": REGEX, **data},
    })


def _import(tmp_path: Path, source: Path, **data):
    cfg = _data_config(tmp_path, source, **data)
    run_pipeline(cfg, stages={"data": DATA_STAGE})
    store = run_store(cfg)
    quarantine = {r["path"]: r["reason"] for r in store.read_table(layout.data.quarantine).to_pylist()}
    return store, quarantine


def _check(*args: str):
    return CliRunner().invoke(app, ["data", "check", *args])


# --- pixel formats -------------------------------------------------------------------------------

def test_16bit_png_is_stored_as_8bit_grey_scaled_by_its_bit_depth(tmp_path):
    root = _dataset(tmp_path / "ds")
    values12 = _noise(24, 40, top=4095, dtype=np.uint16, seed=1)  # a 12-bit scanner's frame in a 16-bit PNG
    (root / "images" / "s1_12bit.png").write_bytes(_with_sbit(cv2.imencode(".png", values12)[1].tobytes(), 12))
    values16 = _noise(24, 40, top=65535, dtype=np.uint16, seed=2)
    _png(root / "images" / "s1_16bit.png", values16)
    for name in ("s1_12bit", "s1_16bit"):
        (root / "labels" / f"{name}.txt").write_text(BOX)

    store, quarantine = _import(tmp_path, root)
    assert quarantine == {}
    sources = {r["path"]: r for r in store.read_table(layout.data.sources).to_pylist()}
    manifest = {r["image_id"]: r for r in store.read_table(layout.data.manifest).to_pylist()}
    for name, values, bits in (("s1_12bit", values12, 12), ("s1_16bit", values16, 16)):
        source = sources[f"images/{name}.png"]
        assert f"{bits} " in source["conversion"] and "8-bit grey" in source["conversion"]
        row = manifest[source["image_id"]]
        key = store.key_of(row["uri"])
        assert store.sha256(key) == row["sha256"]  # the manifest describes the stored bytes
        expected = np.rint(values.astype(np.float64) * 255 / (2 ** bits - 1)).astype(np.uint8)
        stored = Image.open(io.BytesIO(store.read_bytes(key)))
        assert stored.mode == "L"
        # Every reader now sees the same pixels: Pillow's RGB conversion (LoRA, generation, evaluation) and
        # OpenCV (the detector). Before, Pillow clipped the 16-bit values at 255 and OpenCV divided by 256.
        assert np.array_equal(np.asarray(stored.convert("RGB"))[:, :, 0], expected)
        bgr = cv2.imdecode(np.frombuffer(store.read_bytes(key), np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(bgr[:, :, 0], expected)


def test_every_pixel_format_is_converted_or_rejected_with_a_reason(tmp_path):
    root = _dataset(tmp_path / "ds")
    grey = Image.fromarray(_noise(16, 16, seed=3))
    rgb = Image.fromarray(_noise(16, 16, 3, seed=4))
    converted = {  # file -> (stored mode, the source pixels the stored image must equal)
        "s1_palette.png": (rgb.quantize(16), "RGB"),
        "s1_grey_alpha.png": (Image.merge("LA", (grey, grey.point(lambda v: 255 - v))), "L"),
        "s1_rgba.png": (Image.merge("RGBA", (*rgb.split(), grey)), "RGB"),
        "s1_bilevel.png": (grey.convert("1"), "L"),
    }
    for name, (image, _) in converted.items():
        _pil(root / "images" / name, image, "PNG")
    _pil(root / "images" / "s1_cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    floats = np.random.default_rng(5).random((8, 8)).astype(np.float32)
    _pil(root / "images" / "s1_float.tif", Image.fromarray(floats), "TIFF")
    _pil(root / "images" / "s1_int32.tif", Image.fromarray(_noise(8, 8, top=100000, dtype=np.int32, seed=6)), "TIFF")
    frames = [Image.fromarray(_noise(8, 8, seed=s)) for s in (7, 8)]
    _pil(root / "images" / "s1_pages.tif", frames[0], "TIFF", save_all=True, append_images=frames[1:])

    store, quarantine = _import(tmp_path, root)
    assert set(quarantine) == {f"images/s1_{name}" for name in ("cmyk.jpg", "float.tif", "int32.tif", "pages.tif")}
    assert "CMYK" in quarantine["images/s1_cmyk.jpg"]
    assert "float" in quarantine["images/s1_float.tif"] and "32-bit integer" in quarantine["images/s1_int32.tif"]
    assert "2 frames" in quarantine["images/s1_pages.tif"]
    sources = {r["path"]: r for r in store.read_table(layout.data.sources).to_pylist()}
    uris = {r["image_id"]: r["uri"] for r in store.read_table(layout.data.manifest).to_pylist()}
    for name, (image, mode) in converted.items():
        source = sources[f"images/{name}"]
        assert source["conversion"], name
        stored = Image.open(io.BytesIO(store.read_bytes(store.key_of(uris[source["image_id"]]))))
        assert stored.mode == mode and stored.format == "PNG", name
        assert np.array_equal(np.asarray(stored), np.asarray(image.convert(mode))), name


# --- JPEG ------------------------------------------------------------------------------------------

def _jpegs() -> dict[str, bytes]:
    picture = cv2.GaussianBlur(_noise(96, 128, 3, seed=9), (9, 9), 3)  # smooth, so every block holds data
    out = {"baseline": cv2.imencode(".jpg", picture)[1].tobytes(),
           "restarts": cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_RST_INTERVAL, 2])[1].tobytes(),
           "progressive": cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()}
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "JPEG", optimize=True, exif=Image.Exif())
    out["optimized"] = buffer.getvalue()
    return out


@pytest.mark.parametrize("kind", ["baseline", "restarts", "progressive", "optimized"])
def test_a_jpeg_cut_short_with_an_end_marker_is_rejected(kind):
    data = _jpegs()[kind]
    assert not isinstance(inspect_image(data, ".jpg"), str)  # whole: accepted
    for fraction in (0.3, 0.6, 0.9):
        cut = data[: int(len(data) * fraction)] + b"\xff\xd9"  # what Pillow's LOAD_TRUNCATED_IMAGES writes
        with Image.open(io.BytesIO(cut)) as image:
            image.load()  # Pillow decodes it without a word (libjpeg's warning is not even printed)
        reason = inspect_image(cut, ".jpg")
        assert isinstance(reason, str) and "JPEG data ends before the image does" in reason, (kind, fraction, reason)


def test_a_jpeg_cut_at_a_restart_marker_is_rejected():
    data = _jpegs()["restarts"]
    marker = data.rindex(b"\xff\xd0", 0, len(data) // 2)  # a restart marker in the middle of the scan
    cut = data[:marker] + b"\xff\xd9"
    reason = inspect_image(cut, ".jpg")
    assert isinstance(reason, str) and "restart markers" in reason


# --- pixel count -------------------------------------------------------------------------------------

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with a few rows of pixel data: whatever decodes it fails."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def test_pixel_count_cap_reads_the_header_only(tmp_path):
    root = _dataset(tmp_path / "ds")
    _png(root / "images" / "s1_small.png", _noise(100, 100, seed=10))
    _png(root / "images" / "s1_big.png", _noise(200, 300, seed=11))
    (root / "images" / "s1_bomb.png").write_bytes(_png_header_only(20000, 20000))  # 400M pixels, a few KB
    (root / "images" / "s1_cap.png").write_bytes(_png_header_only(8000, 8000))  # over 50M, under Pillow's limit
    _, quarantine = _import(tmp_path, root, max_pixels=20_000)
    assert quarantine["images/s1_big.png"] == ("image too large: 300 x 200 = 60000 pixels > data.max_pixels (20000); "
                                               "downscale it, or raise data.max_pixels")
    # Rejected for its size, not as truncated: the decision came from the header, before any decoding.
    assert "20000 x 20000 = 400000000 pixels > data.max_pixels" in quarantine["images/s1_bomb.png"]
    assert "s1_small.png" not in " ".join(quarantine)
    default = scan_dataset(root, subject_regex=REGEX, max_pixels=validate_config({}).data.max_pixels)
    reasons = {r.path: r.reason for r in default.rejected}
    assert "8000 x 8000 = 64000000 pixels > data.max_pixels (50000000)" in reasons["images/s1_cap.png"]
    assert "20000 x 20000" in reasons["images/s1_bomb.png"]


# --- files and folders -------------------------------------------------------------------------------

def _filesystem_faults(root: Path) -> dict[str, str]:
    """A dataset with every file-system fault; returns rejected path -> a phrase of its reason."""
    _dataset(root)
    images = root / "images"
    _png(images / "s1_ok.png", _noise(16, 16, seed=20))
    (root / "labels" / "s1_ok.txt").write_text(BOX)
    os.symlink("/nonexistent/t2id/frame.png", images / "s1_dangling.png")
    os.symlink("s1_loop.png", images / "s1_loop.png")
    _png(Path(os.fsdecode(os.fsencode(images) + b"/s1_caf\xe9.png")), _noise(16, 16, seed=21))  # Latin-1 name
    os.mkfifo(images / "s1_fifo.png")  # opening it would block the scan forever
    extra = root.parent / f"{root.name}-extra"  # a folder linked in from elsewhere: followed
    _png(extra / "s2_linked.png", _noise(16, 16, seed=22))
    os.symlink(extra, images / "linked")
    os.symlink(".", images / "again")  # a link back to its own folder: a loop
    return {"images/s1_dangling.png": "broken symlink: it points to '/nonexistent/t2id/frame.png'",
            "images/s1_loop.png": "symlink loop",
            "images/s1_caf\\xe9.png": "file name is not valid UTF-8",
            "images/s1_fifo.png": "not a regular file",
            "images/again": "which is scanned already"}


def test_file_system_faults_are_rejections_in_data_check(tmp_path):
    root = tmp_path / "ds"
    expected = _filesystem_faults(root)
    result = _check(str(root), "--subject-regex", REGEX)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit(1), not an exception escaping the command
    lines = result.stdout.splitlines()
    for path, phrase in expected.items():
        assert any(line.startswith(f"{path}: ") and phrase in line for line in lines), (path, result.stdout)
    assert "2 image(s) accepted" in result.stderr  # s1_ok.png and the linked folder's image


def test_file_system_faults_are_quarantined_by_the_import(tmp_path):
    root = tmp_path / "ds"
    expected = _filesystem_faults(root)
    store, quarantine = _import(tmp_path, root)
    assert set(quarantine) == set(expected)
    for path, phrase in expected.items():
        assert phrase in quarantine[path], (path, quarantine[path])
    sources = sorted(r["path"] for r in store.read_table(layout.data.sources).to_pylist())
    assert sources == ["images/linked/s2_linked.png", "images/s1_ok.png"]  # the symlinked folder was followed


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", "true"], capture_output=True)
    return probe.returncode == 0


def test_an_unreadable_file_is_a_rejection(tmp_path):
    root = _dataset(tmp_path / "ds")
    _png(root / "images" / "s1_ok.png", _noise(16, 16, seed=30))
    _png(root / "images" / "s1_locked.png", _noise(16, 16, seed=31))
    (root / "images" / "s1_locked.png").chmod(0)
    args = ["data", "check", str(root), "--subject-regex", REGEX]
    if os.geteuid() != 0:
        result = CliRunner().invoke(app, args)
        code, stdout = result.exit_code, result.stdout
    else:
        # root reads any file: run the check as an unprivileged user of a user namespace, who owns these files
        # yet has no capability to override their mode 000.
        if not _can_unshare():
            pytest.skip("running as root and `unshare --user` is not available here")
        proc = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000",
                               sys.executable, "-m", "t2id.cli", *args], capture_output=True, text=True, timeout=120)
        code, stdout = proc.returncode, proc.stdout
        assert "Traceback" not in proc.stderr, proc.stderr
    assert code == 1
    assert "images/s1_locked.png: cannot read the file (Permission denied)" in stdout.splitlines()


# --- subjects ----------------------------------------------------------------------------------------

def test_data_check_without_subjects_runs_every_other_check(tmp_path):
    root = _dataset(tmp_path / "ds")
    _png(root / "images" / "s1_ok.png", _noise(16, 16, seed=40))
    _png(root / "images" / "s1_bad.png", _noise(16, 16, seed=41))
    (root / "labels" / "s1_bad.txt").write_text("7 0.5 0.5 0.2 0.2\n")
    (root / "images" / "s1_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    result = _check(str(root))  # no subject map, no regex, no subjects.csv
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert any("subjects unknown; set data.subject_map" in line for line in lines)
    assert any(line.startswith("labels/s1_bad.txt: line 1: class id 7 out of range") for line in lines)
    assert any(line.startswith("images/s1_broken.png: undecodable image") for line in lines)
    assert "1 image(s) accepted, 2 file(s) rejected, 1 dataset finding(s)" in result.stderr
