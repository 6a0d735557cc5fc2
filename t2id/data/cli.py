"""`t2id data ...` commands: write the phantom, check a dataset without importing it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from t2id.data.config import PhantomConfig

app = typer.Typer(help="Phantom data, dataset checks.", no_args_is_help=True)

_DEFAULT = PhantomConfig()


@app.command("phantom")
def phantom(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset to.")],
    subjects: Annotated[int, typer.Option(min=1, help="Number of subjects.")] = _DEFAULT.subjects,
    seed: Annotated[int, typer.Option(min=0, help="Seed; same arguments give identical files.")] = _DEFAULT.seed,
    frames: Annotated[int, typer.Option(min=1, help="Cine-loop frames per subject.")] = _DEFAULT.frames_per_subject,
    size: Annotated[int, typer.Option(min=32, help="Image side in pixels.")] = _DEFAULT.size,
    task: Annotated[str, typer.Option(help="detect: YOLO boxes; classify: image-level scan planes (image folders).")
                    ] = "detect",
) -> None:
    """Write the phantom neck-ultrasound YOLO dataset (images/, labels/, data.yaml, subjects.csv), or with
    --task classify its image-level variant (<plane>/*.png, classes.txt, subjects.csv)."""
    from t2id.data.config import PAPER_CLASSES
    from t2id.data.phantom import write_phantom

    if task not in ("detect", "classify"):
        raise typer.BadParameter(f"--task {task!r}: use detect or classify")
    if task == "classify":
        from collections import Counter

        from t2id.classify.phantom import PLANE_NAMES, write_classify_phantom

        root = write_classify_phantom(out, subjects=subjects, frames_per_subject=frames, size=size, seed=seed)
        per_class = Counter(p.parent.name for p in root.glob("*/*.png"))
        typer.echo(f"wrote {subjects * frames} images of {subjects} subjects to {root}")
        typer.echo("images: " + ", ".join(f"{per_class[n]} {n}" for n in PLANE_NAMES))
        return

    root = write_phantom(out, subjects=subjects, frames_per_subject=frames, size=size, seed=seed)
    counts = [0] * len(PAPER_CLASSES)
    for label in (root / "labels").glob("*.txt"):
        for line in label.read_text().splitlines():
            if line.strip():
                counts[int(line.split()[0])] += 1
    typer.echo(f"wrote {subjects * frames} images of {subjects} subjects to {root}")
    typer.echo("instances: " + ", ".join(f"{n} {c}" for n, c in zip(PAPER_CLASSES, counts)))


@app.command("check")
def check(
    src: Annotated[str, typer.Argument(help="YOLO dataset: a local folder or an s3:// prefix.")],
    subject_map: Annotated[str | None, typer.Option(help="CSV/YAML image -> subject map.")] = None,
    subject_regex: Annotated[str | None, typer.Option(help="Regex with a named group 'subject' on the file name.")] = None,
    max_pixels: Annotated[int | None, typer.Option(
        help="Largest image accepted, in pixels (default: data.max_pixels' default).")] = None,
    strict: Annotated[bool, typer.Option(help="Also fail on warnings (e.g. a class without instances).")] = False,
    task: Annotated[str, typer.Option(help="detect: a YOLO dataset; classify: an image-folder or CSV dataset.")
                    ] = "detect",
    labels: Annotated[str | None, typer.Option(help="classify: CSV path,label[,subject] (default: class folders).")
                      ] = None,
) -> None:
    """Validate a dataset without importing it: print (file: reason) per rejected file, and dataset-level
    findings (e.g. subjects unknown) the same way; every check runs; exit 1 if anything was found."""
    from t2id.data.config import DataConfig
    from t2id.data.importer import resolve_source
    from t2id.data.manifest import IMAGE_SCHEMA
    from t2id.data.stats import class_stats, format_table
    from t2id.data.validate import scan_dataset
    from t2id.errors import UserError

    import pyarrow as pa
    from pydantic import ValidationError

    fields = {"max_pixels": max_pixels} if max_pixels is not None else {}
    try:
        cfg = DataConfig(source=src, subject_map=subject_map, subject_regex=subject_regex, **fields)
    except ValidationError as exc:
        raise UserError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    if task not in ("detect", "classify"):
        raise UserError(f"--task {task!r}: use detect or classify")
    with tempfile.TemporaryDirectory(prefix="t2id-check-") as cache:
        root = resolve_source(cfg, Path(cache), task=task)
        if task == "classify":
            from t2id.classify.importer import scan_classification
            scan = scan_classification(root, labels=labels, subject_map=cfg.subject_map,
                                       subject_regex=cfg.subject_regex, workers=cfg.workers,
                                       max_pixels=cfg.max_pixels, require_subjects=False)
        else:
            scan = scan_dataset(root, subject_map=cfg.subject_map, subject_regex=cfg.subject_regex,
                                tolerance=cfg.box_tolerance, workers=cfg.workers, max_pixels=cfg.max_pixels,
                                require_subjects=False)
    rows = {"boxes": [[{"class_id": c, "x": x, "y": y, "w": w, "h": h} for c, x, y, w, h in r.boxes]
                      for r in scan.images]}
    boxes_only = pa.table(rows, schema=pa.schema([IMAGE_SCHEMA.field("boxes")]))
    stats = class_stats(boxes_only, scan.names)
    typer.echo(format_table(stats, len(scan.images)))
    missing = [n for n, i in zip(scan.names, stats["instances"].to_pylist()) if i == 0]
    warnings = scan.warnings + [f"class '{n}' has no instance" for n in missing]
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    converted = [r for r in scan.images if r.conversion]
    if converted:
        typer.echo(f"note: {len(converted)} image(s) will be stored as 8-bit, e.g. {converted[0].path}: "
                   f"{converted[0].conversion}", err=True)
    for finding in scan.findings:  # dataset-level: the message names the dataset or the map file
        typer.echo(finding)
    for rejection in scan.rejected:
        typer.echo(f"{rejection.path}: {rejection.reason}")
    summary = f"{len(scan.images)} image(s) accepted, {len(scan.rejected)} file(s) rejected"
    if scan.findings:
        summary += f", {len(scan.findings)} dataset finding(s)"
    typer.echo(summary, err=True)
    if scan.rejected or scan.findings or (strict and warnings):
        raise typer.Exit(1)
