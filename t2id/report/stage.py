"""Stage `report`: Table II, sign-flip p-values, image-level bootstrap intervals, figures, report.md, index.html.

The content comes from t2id.report.build; this writes it under report/: index.html, report.md,
figures/*.png, tables/*.csv.
"""

from __future__ import annotations

from typing import Any

from t2id import layout
from t2id.report.build import build_report
from t2id.report.html import Figure, Table, to_html, to_markdown
from t2id.report.settings import ReportSettings, settings
from t2id.runner import Stage, StageContext, StageResult
from t2id.tracking import log_report, start as start_tracking

TABLE_II_CSV = "table_ii.csv"  # t2id.report.build names Table II's block after its CSV


def run(ctx: StageContext, s: ReportSettings) -> StageResult:
    store, title = ctx.store, s.report.title
    start_tracking(ctx.tracking)  # an unusable MLflow URI fails here, before the report is built
    if s.task == "classify":
        from t2id.classify.report import build_classify_report
        blocks, csvs = build_classify_report(store, s)
    else:
        blocks, csvs = build_report(store, s)
    for block in blocks:  # the headline numbers on the console too: a strategy per row, means only
        if isinstance(block, Table) and block.csv_name == TABLE_II_CSV:
            frame = block.frame  # index: classes; columns: strategies; cells "mean ± std"
            rows = [[strategy, *(str(v).split(" ± ")[0] for v in frame[strategy])] for strategy in frame.columns]
            ctx.events.table(f"{block.caption.split(',')[0]}, mean over folds (std and tests in the report)",
                             ["strategy", *(str(c) for c in frame.index)], rows)
    outputs: dict[str, str] = {}
    for block in blocks:
        if isinstance(block, Figure):
            key = layout.report.figure(block.name)
            outputs[key] = store.write_bytes(key, block.png)
    for name, frame in csvs.items():
        key = layout.report.table(name)
        outputs[key] = store.write_text(key, frame.to_csv(index=False))
    outputs[layout.report.report_md] = store.write_text(layout.report.report_md, to_markdown(title, blocks))
    outputs[layout.report.index_html] = store.write_text(layout.report.index_html, to_html(title, blocks))
    metric = s.report.metric
    if s.task == "classify":
        from t2id.classify.report import lead_metric
        metric = lead_metric(s)
    log_report(ctx.tracking, store, csvs["table_ii_stats.csv"], metric, sorted(outputs))  # MLflow run "report"
    summary: dict[str, Any] = {"index_html": store.uri(layout.report.index_html),
                               "figures": sum(isinstance(b, Figure) for b in blocks), "tables": len(csvs)}
    return StageResult(outputs=outputs, summary=summary)


def external_inputs(ctx: StageContext, s: ReportSettings) -> dict[str, str]:
    """The other runs whose synthetic sets the grid trained on (synthetic_from): their evaluate and label
    markers, so new FID/KID or another generator there re-render the generator comparison."""
    from t2id.grid.sources import open_source
    from t2id.runner import outputs_digest, read_marker

    found = {}
    for uri in dict.fromkeys(v for v in s.synthetic_sources.values() if v):
        other = open_source(ctx.store, uri)
        for stage in ("generate", "label", "evaluate"):
            marker = read_marker(other, stage)
            found[f"synthetic_from:{uri}:{stage}"] = outputs_digest(marker) if marker is not None else "missing"
    return found


STAGE = Stage(name="report", settings=settings,
              depends_on=("data", "split", "lora", "generate", "label", "evaluate", "grid"), run=run,
              external_inputs=external_inputs)
