"""Render the report's blocks to Markdown (figures linked beside it) and to one self-contained HTML file.

The HTML page embeds every figure as a base64 data URI and carries its own CSS and a few lines of
script (click a column header to sort): no external src or href, so it can be mailed, attached to a
ticket or opened from an S3 console as a single object. A table may mark the best value of each row
(bold in Markdown, highlighted in HTML), e.g. the best strategy per class in Table II. Wide tables
scroll inside their own box, so the page never overflows a laptop screen.
"""

from __future__ import annotations

import base64
import html
import math
import posixpath
import re
from dataclasses import dataclass
from typing import Literal

import pandas as pd

from t2id import layout


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    caption: str
    frame: pd.DataFrame
    csv_name: str | None = None  # the CSV of this table beside the report (tables/<name>)
    best: Literal["max", "min"] | None = None  # mark each row's best cell (by the number it starts with)


@dataclass(frozen=True)
class Figure:
    caption: str
    name: str  # file name under figures/
    png: bytes


Block = Heading | Para | Table | Figure

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
thead th{background:#f3f3f3}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
figure{margin:1em 0 2em}figcaption{font-size:.9em;color:#555}
img{max-width:100%;border:1px solid #eee}
code{background:#f5f5f5;padding:0 .2em}
.scroll{max-width:100%;overflow-x:auto}
td.best{background:#e3f2e1;font-weight:700}
th.sortable{cursor:pointer;text-decoration:underline dotted #999}
"""

# Click a header to sort its table by that column (numbers by the value they start with; again to reverse).
SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th) {
    th.classList.add("sortable");
    th.title = "click to sort";
    th.addEventListener("click", function () {
      var body = table.tBodies[0], col = th.cellIndex, asc = th.dataset.order !== "asc";
      var key = function (row) {
        var text = row.cells[col].textContent.trim(), num = parseFloat(text.replace(/^\+/, ""));
        return isNaN(num) ? text : num;
      };
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
        return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
      th.dataset.order = asc ? "asc" : "desc";
    });
  });
});
"""

_LEADING_NUMBER = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?)", re.IGNORECASE)


def leading_number(text: str) -> float:
    """The number a cell starts with ('39.7 ± 9.1' -> 39.7, '+7.5 [..] p=0.5' -> 7.5); NaN when none."""
    match = _LEADING_NUMBER.match(text)
    return float(match.group(1)) if match else math.nan


def best_columns(rows: list[list[str]], best: str | None, skip: int) -> list[set[int]]:
    """Per row, the column indices (>= skip) holding its best number (ties all marked; none without numbers)."""
    marks: list[set[int]] = []
    for row in rows:
        values = {i: leading_number(c) for i, c in enumerate(row) if i >= skip}
        values = {i: v for i, v in values.items() if not math.isnan(v)}
        if best is None or len(values) < 2:
            marks.append(set())
            continue
        top = max(values.values()) if best == "max" else min(values.values())
        marks.append({i for i, v in values.items() if v == top})
    return marks



def _cell(value) -> str:
    if isinstance(value, float):
        return "—" if pd.isna(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def _frame_rows(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    index_name = frame.index.name
    if index_name is not None:
        header = [str(index_name), *[str(c) for c in frame.columns]]
        rows = [[_cell(i), *[_cell(v) for v in row]] for i, row in zip(frame.index, frame.itertuples(index=False))]
    else:
        header = [str(c) for c in frame.columns]
        rows = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    return header, rows


def _beside(key: str) -> str:
    """A report file's link from report.md, which sits in the report folder."""
    return posixpath.relpath(key, posixpath.dirname(layout.report.report_md))


def to_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}", ""]
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Para):
            out += [block.text, ""]
        elif isinstance(block, Table):
            header, rows = _frame_rows(block.frame)
            marks = best_columns(rows, block.best, skip=1)
            out += [f"**{block.caption}**", "", "| " + " | ".join(header) + " |",
                    "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
            out += ["| " + " | ".join(f"**{c}**" if i in mark else c for i, c in
                                      enumerate(c.replace("|", "\\|") for c in row)) + " |"
                    for row, mark in zip(rows, marks)]
            if block.csv_name:
                out += ["", f"CSV: `{_beside(layout.report.table(block.csv_name))}`"]
            out.append("")
        elif isinstance(block, Figure):
            out += [f"![{block.caption}]({_beside(layout.report.figure(block.name))})", "", f"*{block.caption}*", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code> (the only markup the paragraphs use)."""
    parts = html.escape(text, quote=False).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(title: str, blocks: list[Block]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            header, rows = _frame_rows(block.frame)
            marks = best_columns(rows, block.best, skip=1)
            out.append(f'<div class="scroll"><table class="sortable"><caption>{html.escape(block.caption)}'
                       "</caption><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f'<td class="best">{html.escape(c)}</td>' if i in mark
                                     else f"<td>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                    for row, mark in zip(rows, marks)]
            out.append("</tbody></table></div>")
        elif isinstance(block, Figure):
            data = base64.b64encode(block.png).decode("ascii")
            out.append(f'<figure id="{html.escape(block.name)}"><img alt="{html.escape(block.caption)}" '
                       f'src="data:image/png;base64,{data}"><figcaption>{html.escape(block.caption)}'
                       "</figcaption></figure>")
    out.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(out)
