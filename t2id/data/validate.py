"""Read and check a YOLO dataset: every file is either accepted or rejected with a reason.

Layouts (ultralytics conventions):
  - `data.yaml` (or one *.yaml at the root holding `names`) with `train`/`val`/`test` image
    folders (a string or a list); a label sits where the image path has `/images/` replaced by
    `/labels/` and its extension by `.txt` (next to the image when the path has no `images` folder);
  - a flat `images/` + `labels/` pair.
Names come from data.class_names, else the yaml's `names` (list, or dict id -> name).

Checks (the reasons a file is rejected; the source is only read, never modified):
  file:  cannot be read (permission, I/O error), broken or looping symlink, not a regular file,
         name not valid UTF-8 (the manifest and the quarantine hold names as UTF-8 text);
  image: unknown extension, more pixels than data.max_pixels (read from the header, before decoding),
         undecodable (a full decode; a JPEG must also be whole: t2id.data.pixels.jpeg_truncation),
         pixel format without a safe 8-bit form (t2id.data.pixels: 16-bit grey, palette, alpha and
         bilevel images are converted, CMYK and float rejected), no subject (mapping file or file-name
         regex), duplicate (same stored bytes as another image);
  label: no image for it, unknown extension, and per line: 5 fields, numeric, finite, integer
         class id in range, centre/size in [0, 1], positive w/h, box inside the image.
CRLF, trailing blank lines and empty label files are fine (empty = background); an image with
no label file is a background image. A bad label rejects its image too (training on it as
background would teach the detector that the object is background).
Folders: hidden ones are skipped; symlinked folders are followed (datasets are often assembled from
links), each real folder once: a link to a folder already scanned (a loop, or a second path to it) is
rejected with that reason, and so is a folder that cannot be listed.
`data check` (require_subjects=False) reports unknown subjects as a dataset finding and runs every
other check; the import needs them and stops.

Speed: one thread pool reads, hashes and decodes each image once (Pillow's decoders release the GIL).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image, UnidentifiedImageError

from t2id.data.manifest import image_id_of
from t2id.data.pixels import conversion_for, jpeg_truncation, png_bytes, to_8bit
from t2id.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXT = ".txt"
YAML_NAMES = ("data.yaml", "dataset.yaml")
SUBJECT_MAP_DEFAULT = "subjects.csv"  # picked up at the dataset root when no map/regex is configured

@dataclass
class ImageRecord:
    path: str  # relative to the dataset root, '/'-separated
    sha256: str
    width: int
    height: int
    group: str
    boxes: list[tuple[int, float, float, float, float]]
    label_path: str | None  # None = background image without a label file
    conversion: str | None = None  # None: stored as is; else how the import stored it as 8-bit (t2id.data.pixels)

    @property
    def image_id(self) -> str:
        return image_id_of(self.sha256)

    @property
    def ext(self) -> str:
        """The stored file's extension: a converted image is stored as PNG."""
        if self.conversion is not None:
            return ".png"
        ext = Path(self.path).suffix.lower()
        return ".jpg" if ext == ".jpeg" else ext


@dataclass
class Rejection:
    path: str
    reason: str


@dataclass
class ScanResult:
    root: Path
    names: list[str]
    images: list[ImageRecord] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # dataset-level errors `data check` reports (subjects unknown)
    files_seen: int = 0


@dataclass
class _Layout:
    names: list[str] | None
    image_dirs: list[Path]
    yaml_path: Path | None


# --- layout ------------------------------------------------------------------------------------

def _find_yaml(root: Path) -> Path | None:
    for name in YAML_NAMES:
        if (root / name).is_file():
            return root / name
    candidates = []
    for path in sorted(root.glob("*.y*ml")):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and "names" in doc:
            candidates.append(path)
    return candidates[0] if len(candidates) == 1 else None


def _parse_names(raw, where: str) -> list[str]:
    if isinstance(raw, list):
        names = [str(n) for n in raw]
    elif isinstance(raw, dict):
        try:
            ids = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise UserError(f"{where}: `names` keys must be class ids 0..n-1, got {list(raw)}") from None
        if ids != list(range(len(ids))):
            raise UserError(f"{where}: `names` ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        names = [str(raw[k] if k in raw else raw[str(k)]) for k in ids]
    else:
        raise UserError(f"{where}: `names` must be a list or a mapping id -> name")
    if not names:
        raise UserError(f"{where}: `names` is empty; list the class names")
    return names


def find_layout(root: Path) -> _Layout:
    yaml_path = _find_yaml(root)
    if yaml_path is not None:
        try:
            doc = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{yaml_path}: not valid YAML ({exc}); fix it or remove it to use images/ + labels/") from None
        if not isinstance(doc, dict):
            raise UserError(f"{yaml_path}: expected a mapping with train/val/names")
        base = root
        rel = doc.get("path")
        # An absolute `path` points at the machine that wrote the yaml; the folder holding it wins.
        if isinstance(rel, str) and not os.path.isabs(rel) and (root / rel).is_dir():
            base = (root / rel)
        dirs: list[Path] = []
        for split in ("train", "val", "test"):
            entries = doc.get(split)
            if entries is None:
                continue
            for entry in entries if isinstance(entries, list) else [entries]:
                path = base / str(entry)
                if path.is_file():
                    raise UserError(f"{yaml_path}: `{split}: {entry}` is a file list; t2id reads image "
                                    f"folders: point `{split}` at a folder of images")
                if not path.is_dir():
                    raise UserError(f"{yaml_path}: `{split}: {entry}` is not a folder under {base}")
                dirs.append(path)
        if not dirs:
            raise UserError(f"{yaml_path}: no `train`/`val` image folder given")
        names = _parse_names(doc["names"], str(yaml_path)) if "names" in doc else None
        return _Layout(names, dirs, yaml_path)
    if (root / "images").is_dir():
        return _Layout(None, [root / "images"], None)
    raise UserError(f"{root}: no data.yaml and no images/ folder; expected a YOLO dataset "
                    f"(data.yaml with train/val folders, or images/ + labels/)")


def label_path_for(image: str) -> str:
    """The ultralytics rule: last '/images/' -> '/labels/', extension -> .txt (paths as strings)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if sa in image:
        image = sb.join(image.rsplit(sa, 1))
    return os.path.splitext(image)[0] + LABEL_EXT


def _label_dir_for(image_dir: Path) -> Path:
    return Path(label_path_for(str(image_dir / "x"))).parent


def _ignored(name: str) -> bool:
    # Hidden files (.DS_Store, editors' swap files) and ultralytics' label caches are not data.
    return name.startswith(".") or name.endswith(".cache")


def display_path(path: str) -> str:
    """`path` as printable UTF-8 text: name bytes that are not UTF-8 (which Python keeps as surrogates) as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _file_problem(path: str) -> str | None:
    """Why the directory entry `path` cannot be read as a file, or None when it can be opened."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            target = display_path(os.readlink(path))
            if exc.errno == errno.ELOOP:
                return f"symlink loop: it points to '{target}', which leads back to itself"
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return f"broken symlink: it points to '{target}', which does not exist"
        return f"cannot read the file ({exc.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, pipe or socket)"
    return None


def walk_files(folder: str | os.PathLike[str], seen: set[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Every file under `folder` (str paths), and path -> reason for each entry that cannot be imported.

    Hidden entries and ultralytics' label caches are skipped. Symlinked folders are followed, each real folder
    once (`seen` holds the real paths scanned; share it between calls over overlapping folders): a symlink to a
    folder scanned already (a loop back to a parent, or a second link to one folder) is reported, a real folder
    met again (data.yaml's train and val overlapping) is not. Reported, never skipped silently: a folder that
    cannot be listed, names that are not UTF-8, broken or looping symlinks, anything that is not a regular file.
    """
    seen = set() if seen is None else seen
    files: list[str] = []
    problems: dict[str, str] = {}

    def unlistable(exc: OSError) -> None:  # os.walk's hook; by default it skips such a folder without a word
        problems[exc.filename] = f"folder cannot be listed ({exc.strerror}); nothing in it is imported"

    top = os.fspath(folder)
    seen.add(os.path.realpath(top))
    for dirpath, dirs, names in os.walk(top, onerror=unlistable, followlinks=True):
        keep = []
        for name in sorted(dirs):
            path = os.path.join(dirpath, name)
            if name.startswith("."):
                continue
            if not _is_utf8(name):
                problems[path] = "folder name is not valid UTF-8; rename it (nothing in it is imported)"
                continue
            real = os.path.realpath(path)
            if real in seen:
                if os.path.islink(path):
                    problems[path] = (f"symlinked folder leads to '{display_path(real)}', which is scanned already "
                                      "(a loop, or a second link to one folder): its files are imported once")
                continue
            seen.add(real)
            keep.append(name)
        dirs[:] = keep
        for name in sorted(names):
            if _ignored(name):
                continue
            path = os.path.join(dirpath, name)
            if not _is_utf8(name):
                problems[path] = "file name is not valid UTF-8; rename it"
            elif (problem := _file_problem(path)) is not None:
                problems[path] = problem
            else:
                files.append(path)
    return files, problems


# --- subjects ----------------------------------------------------------------------------------

SubjectOf = Callable[[str], str | None]
SubjectsFor = Callable[[list[str]], SubjectOf]  # the dataset's image paths -> a resolver for them


def load_subject_map(path: Path) -> dict[str, str]:
    """CSV (columns image,subject; header optional) or YAML/JSON mapping: image path -> subject.

    A key given twice with two different subjects is an error (it would otherwise depend on row order).
    """
    if not path.is_file():
        raise UserError(f"subject map {path} not found; set data.subject_map to a CSV/YAML file or use data.subject_regex")
    text = path.read_text(encoding="utf-8-sig")
    mapping: dict[str, str] = {}
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        doc = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        if not isinstance(doc, dict):
            raise UserError(f"subject map {path}: expected a mapping image -> subject")
        return {str(k): str(v) for k, v in doc.items()}
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if not rows:
        raise UserError(f"subject map {path} is empty; give one 'image,subject' row per image")
    header = [c.strip().lower() for c in rows[0]]
    key_col, val_col, start = 0, 1, 0
    if {"subject", "group"} & set(header):
        val_col = header.index("subject") if "subject" in header else header.index("group")
        key_col = next((header.index(k) for k in ("image", "path", "file", "filename") if k in header),
                       1 - val_col if len(header) == 2 else 0)
        start = 1
    for i, row in enumerate(rows[start:], start=start + 1):
        if len(row) <= max(key_col, val_col):
            raise UserError(f"subject map {path} line {i}: expected 'image,subject', got {row}")
        key, subject = row[key_col].strip(), row[val_col].strip()
        if mapping.setdefault(key, subject) != subject:
            raise UserError(f"subject map {path} line {i}: '{key}' is given subject '{subject}' here and "
                            f"'{mapping[key]}' earlier; give each image one subject")
        mapping[key] = subject
    return mapping


def _key_forms(rel: str) -> list[str]:
    """The map keys that may name the image at `rel` (its path relative to the dataset root): the
    path itself and every shorter tail of it at a '/' (e.g. images/s1/f.png, s1/f.png, f.png),
    each with or without its extension."""
    parts = rel.split("/")
    tails = ["/".join(parts[i:]) for i in range(len(parts))]
    return tails + [t.rsplit(".", 1)[0] for t in tails if "." in t.rsplit("/", 1)[-1]]


def match_subject_map(mapping: dict[str, str], rels: list[str], where: str) -> dict[str, str]:
    """image path (relative to the dataset root) -> subject, from a map whose keys are paths.

    A key names the image whose root-relative path it equals (that always wins); a shorter key (a tail of that path at
    a '/', e.g. a file name, or the path without its extension) is accepted only when it names
    exactly one image of the dataset. A key naming several images, or an image named by keys with
    different subjects, is an error listing the clashes: basename matching with "first wins" puts
    frames of one subject into another subject's fold without a word.
    """
    keys_of: dict[str, list[str]] = {}
    for rel in rels:
        for form in dict.fromkeys(_key_forms(rel)):
            keys_of.setdefault(form, []).append(rel)
    exact = set(rels)
    subject_of: dict[str, tuple[str, str]] = {}  # rel -> (key, subject)
    ambiguous: list[str] = []
    conflicting: list[str] = []
    for raw_key, subject in mapping.items():
        key = raw_key.replace("\\", "/").removeprefix("./")
        hits = [key] if key in exact else keys_of.get(key, [])
        if len(hits) > 1:
            ambiguous.append(f"'{key}' -> {', '.join(hits[:4])}" + (f" (+{len(hits) - 4} more)" if len(hits) > 4 else ""))
            continue
        if hits:
            prev = subject_of.setdefault(hits[0], (key, subject))
            if prev[1] != subject:
                conflicting.append(f"{hits[0]}: '{prev[0]}' -> {prev[1]}, '{key}' -> {subject}")
    if ambiguous or conflicting:
        clashes = ambiguous + conflicting
        more = f" (+{len(clashes) - 5} more)" if len(clashes) > 5 else ""
        what = ("keys name more than one image" if ambiguous else "") + \
               (" and " if ambiguous and conflicting else "") + \
               ("images are named by keys with different subjects" if conflicting else "")
        raise UserError(f"subject map {where}: {what}: {'; '.join(clashes[:5])}{more}; key each image by its "
                        f"path relative to the dataset root (e.g. images/s1/frame001.png)")
    return {rel: subject for rel, (_, subject) in subject_of.items()}


def subject_resolver(root: Path, subject_map: str | None, subject_regex: str | None) -> tuple[SubjectsFor, str]:
    """A function (image paths relative to the root) -> (relpath -> subject or None), and a
    description for messages. Map keys are matched against the dataset's whole list of images, so
    an ambiguous key is found before any image is assigned."""
    if subject_regex:
        pattern = re.compile(subject_regex)

        def by_regex(rel: str) -> str | None:
            for text in (rel.rsplit("/", 1)[-1], rel):
                m = pattern.search(text)
                if m and m.group("subject"):
                    return m.group("subject")
            return None

        return (lambda rels: by_regex), f"the file name does not match data.subject_regex {subject_regex!r}"
    if subject_map:
        map_path = Path(subject_map).expanduser()
        if not map_path.is_absolute() and not map_path.is_file():
            map_path = root / subject_map
    elif (root / SUBJECT_MAP_DEFAULT).is_file():
        map_path = root / SUBJECT_MAP_DEFAULT
    else:
        raise UserError(f"{root}: subjects unknown; set data.subject_map (CSV image,subject) or "
                        f"data.subject_regex, or put {SUBJECT_MAP_DEFAULT} at the dataset root")
    mapping = load_subject_map(map_path)

    def for_images(rels: list[str]) -> SubjectOf:
        matched = match_subject_map(mapping, rels, str(map_path))
        return lambda rel: matched.get(rel) or None

    return for_images, (f"it is not in the subject map {map_path} (keys: image paths relative to the "
                        f"dataset root {root})")


# --- labels ------------------------------------------------------------------------------------

def parse_label(text: str, n_classes: int, tolerance: float = 1e-3) -> tuple[list[tuple], list[str]]:
    """YOLO label text -> (boxes, problems). Boxes poking out by <= tolerance are clipped."""
    boxes: list[tuple] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):  # splitlines: \n, \r\n, \r
        line = raw.strip()
        if not line:
            continue
        fields = line.split()
        where = f"line {number}"
        if len(fields) != 5:
            problems.append(f"{where}: expected 5 fields 'class x y w h', got {len(fields)}")
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.append(f"{where}: non-numeric field in {line!r}")
            continue
        if not all(math.isfinite(v) for v in values):
            problems.append(f"{where}: non-finite value in {line!r}")
            continue
        cls, x, y, w, h = values
        if cls != int(cls) or not 0 <= cls < n_classes:
            problems.append(f"{where}: class id {fields[0]} out of range: expected an integer in 0..{n_classes - 1}")
            continue
        if not all(0.0 <= v <= 1.0 for v in (x, y, w, h)):
            problems.append(f"{where}: coordinates must be normalized to [0, 1], got {' '.join(fields[1:])}")
            continue
        if w <= 0.0 or h <= 0.0:
            problems.append(f"{where}: width and height must be positive, got w={fields[3]} h={fields[4]}")
            continue
        x0, y0, x1, y1 = x - w / 2, y - h / 2, x + w / 2, y + h / 2
        if min(x0, y0) < -tolerance or max(x1, y1) > 1.0 + tolerance:
            problems.append(f"{where}: box extends outside the image (x {x0:.4f}..{x1:.4f}, y {y0:.4f}..{y1:.4f})")
            continue
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)
        boxes.append((int(cls), (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0))
    return boxes, problems


# --- images ------------------------------------------------------------------------------------

def _pil_open(fp: io.BytesIO) -> Image.Image:
    """Pillow's own Image.open. Importing ultralytics replaces PIL.Image.open process-wide with a
    wrapper that, on a file Pillow cannot identify, tries to pip-install pi-heif and then raises
    ModuleNotFoundError (ultralytics/utils/patches.py). Validation must get Pillow's
    UnidentifiedImageError instead, whatever was imported before it."""
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None) if patches is not None else None
    return (original or Image.open)(fp)


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    conversion: str | None = None  # None: the file is stored as is; else how it is stored as 8-bit (t2id.data.pixels)
    stored_sha256: str | None = None  # sha256 of the converted PNG the import stores (None: the file's own)


def _size_past_pillow_limit(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an image Image.open refuses outright (over 2 x Image.MAX_IMAGE_PIXELS): the format
    plugins Pillow registers read the header alone, without Image.open's decompression-bomb check."""
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(data[:16]):
            continue
        try:
            with factory(io.BytesIO(data)) as image:
                return image.size
        except Exception:  # noqa: BLE001 (not this format: try the next plugin, as Image.open does)
            continue
    return None


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return (f"image too large: {width} x {height} = {width * height} pixels > data.max_pixels ({max_pixels}); "
            f"downscale it, or raise data.max_pixels")


def inspect_image(data: bytes, ext: str, max_pixels: int | None = None) -> ImageInfo | str:
    """What the import stores for these image bytes (size, and the 8-bit conversion if any), or why it rejects them.

    1. The header alone gives the size: more than `max_pixels` is rejected before any pixel is decoded (a
       20000 x 20000 PNG of a few hundred KB needs 400 MB to decode).
    2. A full decode with Pillow: it reads every pixel, so a truncated file or a corrupt compressed stream fails
       here and not later in a training loop. For PNG, `verify()` first checks every chunk's CRC, which catches
       flipped bytes that still inflate. A JPEG must also be whole (t2id.data.pixels.jpeg_truncation).
    3. The pixel format: stored as is, converted to 8-bit (the sha256 is then the stored PNG's), or rejected.
    """
    if not data:
        return "undecodable image: the file is empty"
    kind = ext.lstrip(".").upper()
    try:
        with _pil_open(io.BytesIO(data)) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                return _too_many_pixels(width, height, max_pixels)
            if ext == ".png":
                image.verify()
        with _pil_open(io.BytesIO(data)) as image:
            image.load()
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                return f"{frames} frames (an animation or a multi-page file); save the frame to use as its own image"
            if image.format == "JPEG" and (cut := jpeg_truncation(data, image.tobytes())) is not None:
                return f"undecodable image: {cut}"
            try:
                conversion = conversion_for(image, data)
            except ValueError as exc:
                return f"unsupported pixels: {exc}"
            stored = hashlib.sha256(png_bytes(to_8bit(image, data))).hexdigest() if conversion else None
    except UnidentifiedImageError:  # its message holds a memory address: not for a reproducible quarantine
        return f"undecodable image: not a valid {kind} file"
    except Image.DecompressionBombError as exc:
        size = _size_past_pillow_limit(data)
        if size is not None:
            return _too_many_pixels(*size, max_pixels if max_pixels is not None else 2 * Image.MAX_IMAGE_PIXELS)
        return f"image too large: {exc}"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"undecodable image: {kind} data is corrupt or truncated ({exc})"
    if width == 0 or height == 0:
        return f"undecodable image: {kind} has zero width or height"
    return ImageInfo(width, height, conversion, stored)


def decode_check(data: bytes, ext: str, max_pixels: int | None = None) -> tuple[int, int] | str:
    """(width, height) when the bytes are an image the import accepts, else the reason they are not."""
    info = inspect_image(data, ext, max_pixels)
    return info if isinstance(info, str) else (info.width, info.height)


def stored_bytes(data: bytes, conversion: str | None) -> bytes:
    """The bytes the import stores for an image file: the file itself, or its 8-bit PNG (`conversion` set)."""
    if conversion is None:
        return data
    with _pil_open(io.BytesIO(data)) as image:
        image.load()
        return png_bytes(to_8bit(image, data))


# --- the scan ----------------------------------------------------------------------------------

def scan_dataset(root: str | os.PathLike[str], subject_map: str | None = None, subject_regex: str | None = None,
                 class_names: list[str] | None = None, tolerance: float = 1e-3, workers: int = 8,
                 progress: Callable[[int], None] | None = None, max_pixels: int | None = None,
                 require_subjects: bool = True) -> ScanResult:
    """Check every file of a local YOLO dataset; return accepted images and rejected files.

    `max_pixels`: larger images are rejected from their header (None: Pillow's own limit). `require_subjects`
    False (`data check`): a missing or unusable subject source becomes a finding in `ScanResult.findings` and
    every other check still runs; True (the import): it is a UserError.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    layout = find_layout(root)
    names = class_names or layout.names
    if not names:
        raise UserError(f"{root}: class names unknown; set data.class_names or add `names` to data.yaml")
    result = ScanResult(root=root, names=list(names))
    try:
        subjects_for, no_subject_why = subject_resolver(root, subject_map, subject_regex)
    except UserError as exc:
        if require_subjects:
            raise
        result.findings.append(str(exc))
        subjects_for, no_subject_why = (lambda rels: lambda rel: "unknown"), ""
    if class_names and layout.names and list(class_names) != layout.names:
        result.warnings.append(f"data.class_names overrides the names in {layout.yaml_path}")

    # Paths are plain strings from here on: pathlib's per-call parsing and resolve()'s lstat per
    # component cost more than decoding a small PNG.
    root_prefix = str(root) + os.sep

    def rel(path: str) -> str:
        if path.startswith(root_prefix):
            return path[len(root_prefix):].replace(os.sep, "/")
        return Path(os.path.relpath(path, root)).as_posix()

    def suffix(path: str) -> str:
        return os.path.splitext(path)[1].lower()

    # 1. Files: images under the image folders, labels under the matching label folders. Entries that cannot
    #    be read as files (see walk_files) are rejected here, with their reason.
    image_files: dict[str, None] = {}
    label_dirs: dict[str, None] = {}
    problems: dict[str, str] = {}
    seen: set[str] = set()
    for folder in dict.fromkeys(folder.resolve() for folder in layout.image_dirs):
        label_dirs[str(_label_dir_for(folder))] = None
        files, found = walk_files(folder, seen)
        image_files.update(dict.fromkeys(files))
        problems.update(found)
    label_files: dict[str, None] = {}
    label_seen: set[str] = set()
    for folder in label_dirs:
        if os.path.isdir(folder):
            files, found = walk_files(folder, label_seen)
            problems.update(found)
            for path in files:
                if suffix(path) == LABEL_EXT or path not in image_files:
                    label_files[path] = None
    for path, reason in problems.items():
        result.rejected.append(Rejection(display_path(rel(path)), reason))
    images: list[str] = []
    for path in image_files:
        if suffix(path) == LABEL_EXT and path in label_files:
            continue  # a label sitting next to its image (no images/ folder in the path)
        if suffix(path) in IMAGE_EXTS:
            images.append(path)
        else:
            result.rejected.append(Rejection(rel(path), f"unknown extension '{os.path.splitext(path)[1]}' "
                                             f"(images: {' '.join(IMAGE_EXTS)})"))
    for path in label_files:
        if suffix(path) != LABEL_EXT and path not in image_files:
            result.rejected.append(Rejection(rel(path), f"unknown extension '{os.path.splitext(path)[1]}' in a "
                                             f"labels folder (labels are .txt)"))
    result.files_seen = len(image_files) + len([p for p in label_files if p not in image_files]) + len(problems)

    # 2. Per image (threads): read once, hash, decode once, subject, label.
    def check(path: str) -> ImageRecord | Rejection:
        r = rel(path)
        label = label_path_for(path)
        label_rel = rel(label) if label in label_files else None
        tail = f" (its label {label_rel} is not imported either)" if label_rel else ""
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:  # unreadable (permissions), or gone or changed since the listing
            return Rejection(r, f"cannot read the file ({exc.strerror})" + tail)
        info = inspect_image(data, suffix(path), max_pixels)
        if isinstance(info, str):
            return Rejection(r, info + tail)
        group = subject_of(r)
        if not group:
            return Rejection(r, f"no subject: {no_subject_why}" + tail)
        boxes: list[tuple] = []
        if label_rel is not None:
            try:
                with open(label, "rb") as fh:
                    text = fh.read().decode("utf-8-sig")
            except UnicodeDecodeError:
                return Rejection(label_rel, f"label is not UTF-8 text; image {r} not imported")
            except OSError as exc:
                return Rejection(label_rel, f"cannot read the label ({exc.strerror}); image {r} not imported")
            boxes, problems = parse_label(text, len(names), tolerance)
            if problems:
                more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
                return Rejection(label_rel, "; ".join(problems[:3]) + more + f"; image {r} not imported")
        sha256 = info.stored_sha256 or hashlib.sha256(data).hexdigest()
        return ImageRecord(r, sha256, info.width, info.height, group, boxes, label_rel, info.conversion)

    images.sort(key=rel)
    try:
        subject_of = subjects_for([rel(p) for p in images])
    except UserError as exc:  # a subject map whose keys clash
        if require_subjects:
            raise
        result.findings.append(str(exc))
        subject_of = lambda rel: "unknown"  # noqa: E731
    claimed = {label_path_for(path) for path in images}
    for path in label_files:
        if suffix(path) == LABEL_EXT and path not in claimed and path not in image_files:
            stem = os.path.splitext(os.path.basename(path))[0]
            result.rejected.append(Rejection(rel(path), f"label without image: no image file with stem '{stem}' for it"))
    # Batches of files per task: one future per image costs as much as a small PNG's hash.
    batches = [images[i:i + 32] for i in range(0, len(images), 32)]
    checked: list[ImageRecord | Rejection] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in pool.map(lambda paths: [check(p) for p in paths], batches):
            checked.extend(batch)
            if progress is not None:
                progress(len(batch))

    # 3. Duplicates: the first image (sorted path) with given stored bytes wins (two 16-bit files can differ only
    #    in bits the 8-bit conversion drops).
    first_of: dict[str, str] = {}
    for item in checked:
        if isinstance(item, Rejection):
            result.rejected.append(item)
        elif item.sha256 in first_of:
            tail = f" (its label {item.label_path} is not imported either)" if item.label_path else ""
            result.rejected.append(Rejection(item.path, f"duplicate image: same content as {first_of[item.sha256]}" + tail))
        else:
            first_of[item.sha256] = item.path
            result.images.append(item)
    result.rejected.sort(key=lambda rj: rj.path)
    if not result.images:
        result.warnings.append(f"{root}: no valid image found")
    return result
