"""Stage `data`: import a YOLO dataset into the run, with validation, quarantine and class stats.

Steps: 1. resolve data.source to a local folder (phantom: generate; s3: sync into the cache);
2. check every file (t2id.data.validate); 3. strict mode fails on any rejection; 4. copy the
accepted images to layout.data.image(image_id, ext) (present ones are skipped, so a killed import
resumes); 5. write manifest, quarantine (always, maybe empty), sources, classes, stats and the chart.
"""

from __future__ import annotations

import json

from t2id import layout
from t2id.data.importer import copy_images, fingerprint_source, quarantine_table, resolve_source, sources_table
from t2id.data.settings import DataSettings, settings
from t2id.data.stats import STATS_COLUMNS, class_distribution_png, class_stats, imbalance_ratio, stats_notes, stats_rows
from t2id.data.validate import scan_dataset
from t2id.errors import UserError
from t2id.runner import Stage, StageContext, StageResult


def rejection_report(rejected, limit: int = 20) -> str:
    lines = [f"  {r.path}: {r.reason}" for r in rejected[:limit]]
    if len(rejected) > limit:
        lines.append(f"  ... and {len(rejected) - limit} more")
    return "\n".join(lines)


def run(ctx: StageContext, s: DataSettings) -> StageResult:
    cfg = s.data
    store = ctx.store
    root = resolve_source(cfg, ctx.cache_dir, ctx.endpoint_url, s.task)

    with ctx.events.progress("checking files", total=None) as advance:
        if s.task == "classify":  # image-level labels: one whole-image box per image (t2id.classify.importer)
            from t2id.classify.importer import scan_classification
            scan = scan_classification(root, labels=cfg.labels, subject_map=cfg.subject_map,
                                       subject_regex=cfg.subject_regex, class_names=cfg.class_names,
                                       workers=cfg.workers, progress=advance, max_pixels=cfg.max_pixels)
        else:
            scan = scan_dataset(root, subject_map=cfg.subject_map, subject_regex=cfg.subject_regex,
                                class_names=cfg.class_names, tolerance=cfg.box_tolerance, workers=cfg.workers,
                                progress=advance, max_pixels=cfg.max_pixels)
    for warning in scan.warnings:
        ctx.events.warning(warning)
    if converted := [r for r in scan.images if r.conversion]:
        ctx.events.info(f"{len(converted)} image(s) stored as 8-bit (e.g. {converted[0].path}: {converted[0].conversion}); "
                        f"see {store.uri(layout.data.sources)}")
    if scan.rejected:
        if cfg.strict:
            raise UserError(f"data.strict is on and {len(scan.rejected)} file(s) of {root} were rejected; fix "
                            f"them or set data.strict: false to quarantine them:\n{rejection_report(scan.rejected)}")
        ctx.events.warning(f"{len(scan.rejected)} file(s) quarantined (see {store.uri(layout.data.quarantine)}):\n"
                           f"{rejection_report(scan.rejected)}")
    if not scan.images:
        raise UserError(f"data.source {cfg.source}: no valid image to import ({len(scan.rejected)} rejected); "
                        f"run `t2id data check {root}` to see why")

    with ctx.events.progress("copying images", total=len(scan.images)) as advance:
        manifest = copy_images(scan, store, workers=cfg.workers, progress=advance)

    stats = class_stats(manifest, scan.names)
    ctx.events.table("instances and images per class", STATS_COLUMNS, stats_rows(stats))
    for note in stats_notes(stats, manifest.num_rows):
        ctx.events.info(note)
    outputs = {
        layout.data.manifest: store.write_table(layout.data.manifest, manifest),
        layout.data.quarantine: store.write_table(layout.data.quarantine, quarantine_table(scan.rejected)),
        layout.data.sources: store.write_table(layout.data.sources, sources_table(scan)),
        layout.data.classes: store.write_text(layout.data.classes, json.dumps({"names": scan.names}, indent=2)),
        layout.data.stats: store.write_table(layout.data.stats, stats),
        layout.data.class_distribution: store.write_bytes(layout.data.class_distribution,
                                                          class_distribution_png(stats)),
    }
    # The imported images are outputs too, so the runner checks them before skipping the stage: a
    # deleted or truncated copy is caught and copied again, not found by a later stage.
    outputs.update({layout.data.image(r.image_id, r.ext): r.sha256 for r in scan.images})
    ratio = imbalance_ratio(stats)
    summary = {
        "images": manifest.num_rows,
        "subjects": len(set(manifest["group"].to_pylist())),
        "rejected": len(scan.rejected),
        "instances": dict(zip(scan.names, stats["instances"].to_pylist())),
        "imbalance_ratio": round(ratio, 3) if ratio is not None else None,
    }
    return StageResult(outputs=outputs, summary=summary)


def external_inputs(ctx: StageContext, s: DataSettings) -> dict[str, str]:
    """The source dataset's content (file listing with sizes and mtimes, or S3 ETags): not config."""
    return fingerprint_source(s.data, ctx.endpoint_url, s.task)


STAGE = Stage(name="data", settings=settings, depends_on=(), run=run, external_inputs=external_inputs)
