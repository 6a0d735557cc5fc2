"""Read and check an image-level (classification) dataset: every file is accepted or rejected with a reason.

Two layouts:
  - an image folder: `<root>/<class name>/<image files>` (nested folders below a class folder belong to it);
  - a CSV named by data.labels (columns `path,label[,subject]`, header required; paths relative to the
    dataset root): the label column names the class. Image files the CSV does not list are rejected.
Class order: data.class_names, else `classes.txt` at the root (one name per line; the phantom writes
one), else the class folders / CSV labels sorted by name.
Subjects: the CSV's `subject` column when it has one, else the same sources as detection
(data.subject_map, data.subject_regex, subjects.csv at the root; t2id.data.validate.subject_resolver).

Rejections (recorded in the quarantine with their reason, never a traceback): every reason of the
detection import for the file and the image itself (t2id.data.validate: unreadable, broken symlink,
unknown extension, too large, undecodable, unsupported pixels, no subject); a class folder or CSV label
that is not a class of data.class_names / classes.txt; an image directly under the root (no class
folder); a class with no image (the folder, or the class name, is recorded); a CSV row whose file is
missing; the same content under two classes (all copies: which label is right cannot be known);
the same content twice in one class (the first path wins, as in detection).

The manifest keeps the image schema (t2id.data.manifest.IMAGE_SCHEMA): an image-level label is
stored as ONE box covering the whole image, {class_id, x=0.5, y=0.5, w=1, h=1}. Every stage that
counts classes per image (stats, the stratified split, LoRA's rare-class selection, RFS/CAS) then
reads classification data unchanged; `image_label` reads the class back.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from t2id.data.validate import (IMAGE_EXTS, ImageRecord, Rejection, ScanResult, display_path, inspect_image,
                                subject_resolver, walk_files)
from t2id.errors import UserError

CLASSES_FILE = "classes.txt"
WHOLE_IMAGE = (0.5, 0.5, 1.0, 1.0)  # x, y, w, h of the box that carries an image-level label


def whole_image_box(class_id: int) -> tuple[int, float, float, float, float]:
    return (int(class_id), *WHOLE_IMAGE)


def image_label(boxes: list[dict] | None) -> int:
    """The class id of a classification manifest row (its one whole-image box)."""
    if not boxes or len(boxes) != 1:
        raise UserError(f"a classification manifest row needs exactly one whole-image box, got {boxes!r}; "
                        "re-import the dataset with run.task: classify")
    return int(boxes[0]["class_id"])


def load_csv_labels(path: Path) -> list[dict[str, str]]:
    """Rows of a labels CSV: path, label and (optional) subject, with their line numbers."""
    if not path.is_file():
        raise UserError(f"data.labels {path}: file not found; give a CSV with columns path,label[,subject]")
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "path" not in header or "label" not in header:
        raise UserError(f"data.labels {path}: the first line must be a header with columns 'path' and 'label' "
                        f"(and optionally 'subject'), got {header}")
    cols = {name: header.index(name) for name in ("path", "label", "subject") if name in header}
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < len(header):
            raise UserError(f"data.labels {path} line {line}: expected {len(header)} fields ({','.join(header)}), "
                            f"got {row}")
        out.append({"line": str(line), **{name: row[i].strip() for name, i in cols.items()}})
    return out


def class_order(root: Path, class_names: list[str] | None, found: list[str]) -> list[str]:
    if class_names:
        return list(class_names)
    listed = root / CLASSES_FILE
    if listed.is_file():
        names = [n.strip() for n in listed.read_text(encoding="utf-8").splitlines() if n.strip()]
        if names:
            return names
    return sorted(found)


def scan_classification(root: str | os.PathLike[str], labels: str | None = None, subject_map: str | None = None,
                        subject_regex: str | None = None, class_names: list[str] | None = None, workers: int = 8,
                        progress: Callable[[int], None] | None = None, max_pixels: int | None = None,
                        require_subjects: bool = True) -> ScanResult:
    """Check every file of a local classification dataset (image folder, or CSV `labels`)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"{root}: dataset folder not found")
    rejected: list[Rejection] = []
    files, problems = walk_files(root)
    rel_of = {path: Path(os.path.relpath(path, root)).as_posix() for path in files}
    for path, reason in problems.items():
        rejected.append(Rejection(display_path(os.path.relpath(path, root)), reason))
    skip = {CLASSES_FILE, "subjects.csv", "phantom.json"}  # the dataset's own metadata at its root
    csv_path = None
    if labels:
        csv_path = Path(labels).expanduser()
        if not csv_path.is_absolute() and not csv_path.is_file():
            csv_path = root / labels
        skip.add(os.path.relpath(csv_path.resolve(), root).replace(os.sep, "/"))
    if subject_map:
        skip.add(Path(subject_map).name)

    # 1. Which class each image file claims (folder name or CSV label).
    claimed: dict[str, str] = {}  # rel path -> class name
    csv_subject: dict[str, str] = {}
    csv_has_subjects = False
    if csv_path is not None:
        on_disk = {rel: path for path, rel in rel_of.items()}
        csv_rows = load_csv_labels(csv_path)
        csv_has_subjects = any("subject" in row for row in csv_rows)
        for row in csv_rows:
            rel = row["path"].replace("\\", "/").removeprefix("./")
            if rel not in on_disk:
                rejected.append(Rejection(rel, f"listed in {csv_path.name} line {row['line']} but the file does not exist"))
                continue
            if claimed.setdefault(rel, row["label"]) != row["label"]:
                rejected.append(Rejection(rel, f"{csv_path.name} gives it two labels ('{claimed[rel]}', "
                                               f"'{row['label']}'); give each image one label"))
                claimed[rel] = ""
            if row.get("subject"):
                csv_subject[rel] = row["subject"]
        for rel in sorted(set(on_disk) - set(claimed) - skip):
            rejected.append(Rejection(rel, f"not listed in {csv_path.name}; add a row 'path,label' for it"))
        claimed = {rel: name for rel, name in claimed.items() if name}
    else:
        for rel in sorted(rel_of.values()):
            if rel in skip:
                continue
            if "/" not in rel:
                rejected.append(Rejection(rel, "not in a class folder; put images under <root>/<class name>/"))
                continue
            claimed[rel] = rel.split("/", 1)[0]
    found = sorted(set(claimed.values()))
    names = class_order(root, class_names, found)
    result = ScanResult(root=root, names=names)
    if not names:
        raise UserError(f"{root}: no class found; put images under <root>/<class name>/ or set data.labels")

    # 2. Class names: unknown ones are rejected, known ones without any file recorded.
    unknown = sorted(set(found) - set(names))
    where = "data.class_names" if class_names else f"{CLASSES_FILE}" if (root / CLASSES_FILE).is_file() else None
    for rel in sorted(r for r, n in claimed.items() if n in unknown):
        rejected.append(Rejection(rel, f"unknown class '{claimed[rel]}' (not in {where}: {names}); "
                                       f"add it there or move the file"))
    claimed = {rel: n for rel, n in claimed.items() if n in names}
    candidates = [rel for rel in sorted(claimed) if os.path.splitext(rel)[1].lower() in IMAGE_EXTS]
    for rel in sorted(set(claimed) - set(candidates)):
        rejected.append(Rejection(rel, f"unknown extension '{os.path.splitext(rel)[1]}' (images: {' '.join(IMAGE_EXTS)})"))

    # 3. Subjects: the CSV's column, else the detection import's sources.
    if csv_has_subjects:
        subject_of = csv_subject.get
        no_subject_why = f"its row in {csv_path.name} has an empty subject"
    else:
        try:
            subjects_for, no_subject_why = subject_resolver(root, subject_map, subject_regex)
            mapped = subjects_for(candidates)
            subject_of = lambda rel: csv_subject.get(rel) or mapped(rel)  # noqa: E731
        except UserError as exc:
            if require_subjects:
                raise
            result.findings.append(str(exc))
            subject_of, no_subject_why = (lambda rel: "unknown"), ""

    # 4. Per image (threads): read once, hash, decode once, subject.
    def check(rel: str) -> ImageRecord | Rejection:
        try:
            with open(root / rel, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            return Rejection(rel, f"cannot read the file ({exc.strerror})")
        info = inspect_image(data, os.path.splitext(rel)[1].lower(), max_pixels)
        if isinstance(info, str):
            return Rejection(rel, info)
        group = subject_of(rel)
        if not group:
            return Rejection(rel, f"no subject: {no_subject_why}")
        sha256 = info.stored_sha256 or hashlib.sha256(data).hexdigest()
        box = whole_image_box(names.index(claimed[rel]))
        return ImageRecord(rel, sha256, info.width, info.height, group, [box], None, info.conversion)

    checked: list[ImageRecord | Rejection] = []
    batches = [candidates[i:i + 32] for i in range(0, len(candidates), 32)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in pool.map(lambda rels: [check(r) for r in rels], batches):
            checked.extend(batch)
            if progress is not None:
                progress(len(batch))

    # 5. Duplicates: the same content under two classes rejects every copy (a label conflict); within one
    #    class the first path wins.
    by_hash: dict[str, list[ImageRecord]] = {}
    for item in checked:
        if isinstance(item, Rejection):
            rejected.append(item)
        else:
            by_hash.setdefault(item.sha256, []).append(item)
    for copies in by_hash.values():
        labels_of = {names[c.boxes[0][0]] for c in copies}
        if len(labels_of) > 1:
            listing = ", ".join(f"{c.path} ({names[c.boxes[0][0]]})" for c in copies)
            for c in copies:
                rejected.append(Rejection(c.path, f"duplicate image with conflicting labels: same content as {listing}; "
                                                  "keep one copy in the right class"))
            continue
        result.images.append(copies[0])
        for c in copies[1:]:
            rejected.append(Rejection(c.path, f"duplicate image: same content as {copies[0].path}"))

    # 6. Classes left without images: recorded, so a class that silently vanished is visible in the quarantine.
    kept = {r.boxes[0][0] for r in result.images}
    for cid, name in enumerate(names):
        if cid not in kept:
            path = f"{name}/" if csv_path is None else f"{csv_path.name}: {name}"
            rejected.append(Rejection(path, f"class '{name}' has no valid image; add images of it or remove it "
                                            "from the class list"))
    result.images.sort(key=lambda r: r.path)
    result.rejected = sorted(rejected, key=lambda r: r.path)
    result.files_seen = len(files) + len(problems)
    if not result.images:
        result.warnings.append(f"{root}: no valid image found")
    return result
