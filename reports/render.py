"""The HTML: Jinja2 templates with autoescape, inline CSS, inline SVG, one small plain script.

Everything that comes from a results file reaches the page through autoescaped template
expressions (text and quoted attributes), `tojson` in single-quoted attributes, or, for the per-case
table rows only (the hot loop), `html.escape` on every field in `line_html`; the only `|safe`
strings are this package's own script and stylesheet. A Content-Security-Policy admits that
one script by its hash and forbids every network fetch, so even a missed escape could not run code
or load anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from reports.model import (
    STATUS_ORDER,
    Column,
    Report,
    number,
    status_class,
    status_rank,
    worst_ulp,
)

COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "error": "#6a1b9a", "xfail": "#ef6c00",
           "xpass": "#ad1457", "not-expressible": "#78909c", "skipped": "#b0bec5", "unknown": "#37474f",
           "absent": "#eceff1"}
SHORT = {"not-expressible": "n/e"}
# decades of max ULP error, shared by the heatmap and the histograms
ULP_EDGES = [1, 10, 1e2, 1e3, 1e4, 1e5, 1e6]
ULP_LABELS = ["≤1", "≤10", "≤1e2", "≤1e3", "≤1e4", "≤1e5", "≤1e6", ">1e6"]
ULP_PALETTE = ["#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#b10026"]


def fmt(value: Any, digits: int = 3) -> str:
    """A metric for a table cell: short, with ∞ and – for the values JSON cannot hold."""
    if value is None:
        return "–"
    x = number(value)
    if math.isnan(x):
        return str(value)
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}g}"


def fmt_value(value: Any) -> str:
    """A probe value as its JSON spelling, so true/null/0.1 read the same as in the results file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.8g}"
    if isinstance(value, dict) and value and set(value) <= {"min", "max"}:  # documented bounds
        low, high = value.get("min"), value.get("max")
        if low is not None and high is not None:
            return f"{fmt_value(low)} … {fmt_value(high)}"
        return f"≥ {fmt_value(low)}" if low is not None else f"≤ {fmt_value(high)}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def link(url: Any) -> str | None:
    """An href only for http(s) URLs; anything else (javascript:, file paths) stays plain text."""
    text = str(url or "").strip()
    return text if text.lower().startswith(("https://", "http://")) and " " not in text else None


def ulp_bin(value: float) -> int:
    return next((i for i, edge in enumerate(ULP_EDGES) if value <= edge), len(ULP_EDGES))


def badness(status: str, ulp: float | None) -> float:
    """Sort key of a matrix cell: worse status first, then larger error."""
    if status == "absent":
        return -1.0
    spread = 0.0 if ulp is None else min(math.log10(1.0 + ulp), 999.0) if not math.isnan(ulp) else 999.0
    return (len(STATUS_ORDER) - status_rank(status)) * 1000.0 + spread


@cache
def _assets() -> tuple[str, str, str]:
    """The script, its sha256 (base64) for the CSP, and the stylesheet; named .j2 so that
    pyproject's package-data ships them."""
    files = resources.files("reports")
    script = files.joinpath("script.js.j2").read_text("utf-8")
    style = files.joinpath("style.css.j2").read_text("utf-8")
    if "</" in script:
        raise ValueError("script.js.j2 must not contain '</'")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return script, digest, style


@cache
def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(Path(__file__).resolve().parent)),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, value=fmt_value, link=link, sclass=status_class)
    env.globals.update(colours=COLOURS, ulp_labels=ULP_LABELS, ulp_palette=ULP_PALETTE)
    return env


def page(template: str, **context: Any) -> str:
    script, script_hash, style = _assets()
    return environment().get_template(template).render(
        script=script, script_hash=script_hash, style=style,
        generated=datetime.now(UTC).isoformat(timespec="seconds"), **context)


# ------------------------------------------------------------------ views of the report


def matrix_rows(report: Report) -> list[dict[str, Any]]:
    """Per case: one entry per column with status, worst ULP and the filter data of the row."""
    rows = []
    for row in report.cases:
        cells, pairs, statuses = [], [], set()
        for column in report.columns:
            cell = row.cells.get(column.key)
            if cell is None:
                cells.append(None)
                continue
            status, ulp = cell.status, cell.worst_ulp
            for s in cell.statuses:
                pairs.append(f"{column.key}\n{s}")
                statuses.add(s)
            checks = [f"{r.get('check')}: {r.get('status')}"
                      + (f" ({r['reason']})" if r.get("reason") else "") for r in cell.records]
            text = " / ".join(SHORT.get(s, s) for s in cell.statuses)
            cells.append({"status": status, "ulp": ulp, "sort": f"{badness(status, ulp):.3f}",
                          "title": "\n".join(checks), "text": text})
        rows.append({"row": row, "cells": cells,
                     "filter": {"tag": row.tags, "status": sorted(statuses),
                                "adapter": [c.key for c in report.columns if c.key in row.cells],
                                "pair": pairs}})
    return rows


def heatmap_svg(report: Report) -> dict[str, Any]:
    """Case x adapter heatmap of the worst ULP error; cells without figures take their status colour."""
    size = 14
    left = 8 + 6 * min(48, max((len(r.id) for r in report.cases), default=4))
    top = 12 + 6 * min(40, max((len(c.key) for c in report.columns), default=4))
    cells = []
    for y, row in enumerate(report.cases):
        for x, column in enumerate(report.columns):
            cell = row.cells.get(column.key)
            status = cell.status if cell else "absent"
            ulp = cell.worst_ulp if cell else None
            if ulp is not None:
                colour = ULP_PALETTE[ulp_bin(ulp)]
                shown = f"{fmt(ulp, 3)} ulp"
            else:
                colour = COLOURS[status_class(status)] if status != "absent" else COLOURS["absent"]
                shown = "no error figures"
            cells.append({"x": left + x * size, "y": top + y * size, "colour": colour,
                          "outline": status in ("fail", "error", "xpass") or status not in COLOURS,
                          "title": f"{row.id} / {column.key}: {status}, {shown}"})
    return {"size": size, "left": left, "top": top, "cells": cells,
            "width": left + size * len(report.columns) + 20, "height": top + size * len(report.cases) + 10,
            "rows": [{"y": top + i * size + size - 2, "label": r.id[:48]}
                     for i, r in enumerate(report.cases)],
            "cols": [{"x": left + i * size + size - 4, "label": c.key[:40]}
                     for i, c in enumerate(report.columns)]}


def ulp_histograms(report: Report) -> list[dict[str, Any]]:
    """Per column: compared outputs per decade of max ULP error, passed and failed stacked."""
    out = []
    for column in report.columns:
        passed, failed = [0] * len(ULP_LABELS), [0] * len(ULP_LABELS)
        for row in report.cases:
            cell = row.cells.get(column.key)
            for record in cell.records if cell else []:
                for metric in record.get("metrics") or []:
                    value = number(metric.get("max_ulp"))
                    index = ulp_bin(math.inf if math.isnan(value) else value)
                    (passed if metric.get("passed") else failed)[index] += 1
        peak = max((p + f for p, f in zip(passed, failed, strict=True)), default=0) or 1
        bars = []
        for i, (p, f) in enumerate(zip(passed, failed, strict=True)):
            hp, hf = 60 * p / peak, 60 * f / peak
            bars.append({"label": ULP_LABELS[i], "passed": p, "failed": f, "x": 8 + i * 34,
                         "hp": hp, "hf": hf, "y_pass": 70 - hp, "y_fail": 70 - hp - hf})
        out.append({"column": column, "bars": bars, "total": sum(passed) + sum(failed),
                    "failed": sum(failed)})
    return out


def adapter_summaries(report: Report) -> list[dict[str, Any]]:
    """Per column: translations made (with counts), what it cannot state, known and other failures."""
    out = []
    for column in report.columns:
        translations: Counter = Counter()
        example: dict[str, str] = {}
        not_expressible, xfails, failures = [], [], []
        counts: Counter = Counter()
        held: Counter = Counter()  # conventions each record was held to (they may depend on the case)
        for row in report.cases:
            cell = row.cells.get(column.key)
            for record in cell.records if cell else []:
                status = str(record.get("status"))
                counts[status] += 1
                for k, v in (record.get("conventions") or {}).items():
                    if k != "notes":
                        held[(str(k), fmt_value(v))] += 1
                for t in record.get("translations") or []:
                    translations[str(t)] += 1
                    example.setdefault(str(t), row.id)
                item = {"case": row.id, "anchor": row.anchor, "check": record.get("check"),
                        "reason": record.get("reason") or "", "status": status}
                if status == "not-expressible":
                    not_expressible.append(item)
                elif status in ("xfail", "xpass") or record.get("known_failure"):
                    known = record.get("known_failure") or {}
                    xfails.append({**item, "reason": known.get("reason") or item["reason"],
                                   "link": known.get("link", "")})
                if status in ("fail", "error", "xpass") or status_class(status) == "unknown":
                    failures.append(item)
        conventions = column.info.get("conventions") or {}
        out.append({"column": column, "translations": translations.most_common(), "example": example,
                    "conventions": {k: v for k, v in conventions.items() if k != "notes"},
                    "notes": conventions.get("notes") or [], "counts": counts, "held": sorted(held.items()),
                    "not_expressible": not_expressible, "xfails": xfails, "failures": failures})
    return out


@dataclass(slots=True)
class Line:
    """One row of a case's table, pre-formatted: the per-case tables are most of a big report's
    rendering time, and plain attributes of a slotted object are the cheapest lookups for Jinja."""

    adapter: str
    check: str
    status: str
    first: bool
    span: int
    output: str | None = None  # None: the record compared no outputs
    failed: bool = False
    derived: bool = False
    abs: str = ""
    rel: str = ""
    ulp: str = ""
    tol: str = ""
    worst: str = ""
    note: str = ""
    reason: str = ""
    known_reason: str = ""
    known_link: str = ""
    translations: str = ""
    rule: str = ""


def case_details(report: Report) -> list[tuple[Any, Markup]]:
    """Per case: one table row per record x output, in column order."""
    out = []
    order = {c.key: c.index for c in report.columns}
    for row in report.cases:
        lines: list[Line] = []
        for key in sorted(row.cells, key=lambda k: order.get(k, 0)):
            for record in row.cells[key].records:
                known = record.get("known_failure") or {}
                metrics = record.get("metrics") or []
                head = Line(key, str(record.get("check")), str(record.get("status")), True,
                            max(1, len(metrics)),
                            reason=str(record.get("reason") or ""),
                            known_reason=str(known.get("reason") or "") if known else "",
                            known_link=str(known.get("link") or "") if known else "",
                            translations="; ".join(map(str, record.get("translations") or [])),
                            rule=str(record.get("tolerance_rule") or ""))
                if not metrics:
                    lines.append(head)
                for i, m in enumerate(metrics):
                    line = head if i == 0 else Line(key, head.check, head.status, False, head.span)
                    line.output = str(m.get("name"))
                    line.failed = not m.get("passed")
                    line.derived = bool(m.get("derived"))
                    line.abs, line.rel = fmt(m.get("max_abs")), fmt(m.get("max_rel"))
                    line.ulp = fmt(m.get("max_ulp"))
                    line.tol = f"{fmt(m.get('rtol'), 2)} / {fmt(m.get('atol'), 2)}"
                    line.worst = (f"{m.get('worst_index')}: {fmt(m.get('worst_expected'), 9)} / "
                                  f"{fmt(m.get('worst_got'), 9)}")
                    line.note = str(m.get("note") or "")
                    lines.append(line)
        out.append((row, Markup("\n".join(map(line_html, lines)))))
    return out


def line_html(line: Line) -> str:
    """A case-table row as HTML, every field through html.escape: the one hot loop built outside
    Jinja (a 10,000-record report has ~30,000 of these rows; Jinja's per-value Markup costs ~1 s)."""
    e = html.escape
    parts = ["<tr>"]
    if line.first:
        span = f' rowspan="{line.span}"' if line.span > 1 else ""
        parts.append(f"<td{span}>{e(line.adapter)}</td><td{span}>{e(line.check)}</td>"
                     f'<td{span} class="t-{status_class(line.status)}">{e(line.status)}</td>')
    if line.output is None:
        parts.append('<td colspan="6" class="muted">no outputs compared</td>')
    else:
        derived = " <small>(derived)</small>" if line.derived else ""
        failed = ' class="t-fail"' if line.failed else ""
        parts.append(f"<td{failed}>{e(line.output)}{derived}</td>"
                     f'<td class="num">{e(line.abs)}</td><td class="num">{e(line.rel)}</td>'
                     f'<td class="num">{e(line.ulp)}</td><td class="num">{e(line.tol)}</td>'
                     f"<td>{e(line.worst)}</td>")
    parts.append(f"<td>{e(line.note)}</td>")
    if line.first:
        notes = []
        if line.reason:
            notes.append(f"<pre>{e(line.reason)}</pre>")
        if line.known_reason:
            url = link(line.known_link)
            text = e(line.known_reason)
            shown = f'<a href="{e(url)}" rel="noreferrer">{text}</a>' if url else text
            if line.known_link and not url:
                shown += f" ({e(line.known_link)})"
            notes.append(f"known failure: {shown}")
        if line.translations:
            notes.append(f"<small>{e(line.translations)}</small>")
        if line.rule:
            notes.append(f"<small>tolerance: {e(line.rule)}</small>")
        span = f' rowspan="{line.span}"' if line.span > 1 else ""
        parts.append(f"<td{span}>{'<br>'.join(notes)}</td>")
    parts.append("</tr>")
    return "".join(parts)


def environments(report: Report) -> dict[str, Any]:
    """The header's facts, merged over files: what ran where, with which versions."""
    def distinct(key: str) -> list[str]:
        return sorted({str(s.environment.get(key)) for s in report.sources if s.environment.get(key)})

    per_column: dict[str, Counter] = defaultdict(Counter)
    for row in report.cases:
        for key, cell in row.cells.items():
            for r in cell.records:
                per_column[key][str(r.get("status"))] += 1
    return {"python": distinct("python"), "os": distinct("os"), "hosts": distinct("hostname"),
            "started": min(distinct("started"), default=""),
            "finished": max(distinct("finished"), default=""),
            "per_column": per_column}


def render(report: Report, title: str = "bnconform report") -> str:
    tags = sorted({t for row in report.cases for t in row.tags})
    statuses = sorted({s for row in report.cases for c in row.cells.values() for s in c.statuses},
                      key=status_rank)
    return page("report.html.j2", title=title, report=report, counts=report.counts(), tags=tags,
                statuses=statuses, matrix=matrix_rows(report), heatmap=heatmap_svg(report),
                histograms=ulp_histograms(report), adapters=adapter_summaries(report),
                details=case_details(report), env=environments(report), column_of=_columns(report))


def _columns(report: Report) -> dict[str, Column]:
    return {c.key: c for c in report.columns}


def render_diff(diff: Any, title: str = "bnconform comparison") -> str:
    """The comparison page (`diff` is a reports.diff.Diff)."""
    from reports.diff import KIND_TEXT, KINDS

    rows = []
    for c in diff.changes:
        old_ulp, new_ulp = worst_ulp([c.old] if c.old else []), worst_ulp([c.new] if c.new else [])
        rows.append({"change": c, "old_ulp": old_ulp, "new_ulp": new_ulp,
                     "filter": {"kind": [c.kind], "adapter": [c.adapter], "tag": c.tags,
                                "status": sorted({c.old_status, c.new_status} - {"–"})}})
    adapters = sorted({c.adapter for c in diff.changes})
    tags = sorted({t for c in diff.changes for t in c.tags})
    statuses = sorted({s for r in rows for s in r["filter"]["status"]}, key=status_rank)
    return page("diff.html.j2", title=title, diff=diff, rows=rows, kinds=KINDS, kind_text=KIND_TEXT,
                adapters=adapters, tags=tags, statuses=statuses)
