"""Stage `data`: import a YOLO dataset into the run, with validation, quarantine and class stats.

Steps: 1. resolve data.source to a local folder (phantom: generate; s3: sync into the cache);
2. check every file (t2id.data.validate); 3. strict mode fails on any rejection; 4. copy the
accepted images to data/images/<image_id><ext> (present ones are skipped, so a killed import
resumes); 5. write manifest, quarantine (always, maybe empty), classes, stats and the chart.
"""

from __future__ import annotations

import json

from rich.progress import Progress

from t2id.data.importer import (copy_images, fingerprint_source, quarantine_table, resolve_source,
                                sources_table)
from t2id.data.manifest import (CLASSES_KEY, FIGURE_KEY, MANIFEST_KEY, QUARANTINE_KEY, SOURCES_KEY,
                                STATS_KEY)
from t2id.data.stats import class_distribution_png, class_stats, format_table, imbalance_ratio
from t2id.data.validate import scan_dataset
from t2id.errors import UserError
from t2id.runner import Stage, StageContext, StageResult, console


def rejection_report(rejected, limit: int = 20) -> str:
    lines = [f"  {r.path}: {r.reason}" for r in rejected[:limit]]
    if len(rejected) > limit:
        lines.append(f"  ... and {len(rejected) - limit} more")
    return "\n".join(lines)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.data
    endpoint = ctx.config.store.endpoint_url
    root = resolve_source(cfg, ctx.cache_dir, endpoint)

    subject_map = cfg.subject_map
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("checking files", total=None)
        scan = scan_dataset(root, subject_map=subject_map, subject_regex=cfg.subject_regex,
                            class_names=cfg.class_names, tolerance=cfg.box_tolerance, workers=cfg.workers,
                            progress=lambda n: progress.advance(task, n))
    for warning in scan.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    if scan.rejected:
        if cfg.strict:
            raise UserError(f"data.strict is on and {len(scan.rejected)} file(s) of {root} were rejected; fix "
                            f"them or set data.strict: false to quarantine them:\n{rejection_report(scan.rejected)}")
        console.print(f"[yellow]{len(scan.rejected)} file(s) quarantined[/] (see data/quarantine.parquet):\n"
                      f"{rejection_report(scan.rejected)}")
    if not scan.images:
        raise UserError(f"data.source {cfg.source}: no valid image to import ({len(scan.rejected)} rejected); "
                        f"run `t2id data check {root}` to see why")

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("copying images", total=len(scan.images))
        manifest = copy_images(scan, ctx.store, workers=cfg.workers, progress=lambda n: progress.advance(task, n))

    stats = class_stats(manifest, scan.names)
    console.print(format_table(stats, manifest.num_rows))
    outputs = {
        MANIFEST_KEY: ctx.store.write_table(MANIFEST_KEY, manifest),
        QUARANTINE_KEY: ctx.store.write_table(QUARANTINE_KEY, quarantine_table(scan.rejected)),
        SOURCES_KEY: ctx.store.write_table(SOURCES_KEY, sources_table(scan)),
        CLASSES_KEY: ctx.store.write_text(CLASSES_KEY, json.dumps({"names": scan.names}, indent=2)),
        STATS_KEY: ctx.store.write_table(STATS_KEY, stats),
        FIGURE_KEY: ctx.store.write_bytes(FIGURE_KEY, class_distribution_png(stats)),
    }
    ratio = imbalance_ratio(stats)
    summary = {
        "images": manifest.num_rows,
        "subjects": len(set(manifest["group"].to_pylist())),
        "rejected": len(scan.rejected),
        "instances": dict(zip(scan.names, stats["instances"].to_pylist())),
        "imbalance_ratio": round(ratio, 3) if ratio is not None else None,
    }
    return StageResult(outputs=outputs, summary=summary)


def fingerprint(ctx: StageContext) -> dict[str, str]:
    return fingerprint_source(ctx.config.data, ctx.config.store.endpoint_url)


STAGE = Stage(name="data", sections=("data",), depends_on=(), run=run, fingerprint=fingerprint)
