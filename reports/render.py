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

from conformance.results import FORMAT, NEEDS_ATTENTION, SEVERITY, Record, Status
from reports.model import (
    UNEXPLAINED,
    UNNAMED,
    Cell,
    Column,
    Report,
    effect,
    explanation,
    number,
    status_rank,
    worst_ulp,
)

COLOURS = {Status.PASS: "#2e7d32", Status.FAIL: "#c62828", Status.ERROR: "#6a1b9a", Status.KNOWN: "#ef6c00",
           Status.NOT_EXPRESSIBLE: "#78909c", "absent": "#eceff1"}
SHORT = {Status.NOT_EXPRESSIBLE: "n/e"}
EXAMPLES = 5  # cases (and closest variants) named per divergence group
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


def badness(status: Status | str, ulp: float | None) -> float:
    """Sort key of a matrix cell: worse status first, then larger error."""
    if status == "absent":
        return -1.0
    spread = 0.0 if ulp is None else min(math.log10(1.0 + ulp), 999.0) if not math.isnan(ulp) else 999.0
    return (len(SEVERITY) - status_rank(Status(status))) * 1000.0 + spread


def status_class(status: Any) -> str:
    """A CSS class token: a status's own name, never other text from a results file."""
    return str(status) if status in COLOURS else "other"


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
    env.globals.update(colours=COLOURS, ulp_labels=ULP_LABELS, ulp_palette=ULP_PALETTE, severity=SEVERITY,
                       attention=[s for s in SEVERITY if s in NEEDS_ATTENTION], current_format=FORMAT)
    return env


def page(template: str, **context: Any) -> str:
    script, script_hash, style = _assets()
    return environment().get_template(template).render(
        script=script, script_hash=script_hash, style=style,
        generated=datetime.now(UTC).isoformat(timespec="seconds"), **context)


# ------------------------------------------------------------------ views of the report



def short_explanation(record: Record) -> str:
    """A matrix cell's note for a failing or known record: its variants, "?" when unexplained."""
    why = explanation(record)
    return {UNEXPLAINED: "?", UNNAMED: ""}.get(why, why)


def record_title(record: Record) -> str:
    """One line per check in a matrix cell's tooltip."""
    text = f"{record.check}: {record.status}"
    if record.status in (Status.FAIL, Status.KNOWN):
        text += f" [{explanation(record)}]"
    return text + (f" ({record.reason})" if record.reason else "")


def matrix_rows(report: Report) -> list[dict[str, Any]]:
    """Per case: one entry per column with status, worst ULP, explanation and the row's filter data."""
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
            why = dict.fromkeys(short_explanation(r) for r in cell.records
                                if r.status in (Status.FAIL, Status.KNOWN))
            cells.append({"status": status, "ulp": ulp, "sort": f"{badness(status, ulp):.3f}",
                          "title": "\n".join(map(record_title, cell.records)),
                          "text": " / ".join(SHORT.get(s, s) for s in cell.statuses),
                          "why": " / ".join(w for w in why if w)})
        rows.append({"row": row, "cells": cells,
                     "filter": {"tag": row.tags, "status": sorted(statuses, key=status_rank),
                                "adapter": [c.key for c in report.columns if c.key in row.cells],
                                "pair": pairs}})
    return rows


READINGS = {"replica-0-stats": "replica 0's", "replica-mean-stats": "mean over replicas"}


def replica_readings(report: Report) -> dict[str, Any]:
    """Cases with params.replicas x the adapters that ran any of them: what each adapter's moving
    statistics read back as after training, as measured. Held to the canonical values they are
    the whole batch's (synchronized) or the mean over replicas (unsynchronized); otherwise the
    replica variant that explains them, or "unexplained"."""
    rows = [row for row in report.cases if (row.info.get("params") or {}).get("replicas")]
    ran = [c for c in report.columns if any(
        r.status != Status.NOT_EXPRESSIBLE for row in rows for r in row.cells.get(c.key, Cell()).records)]
    table = []
    for row in rows:
        replicas = row.info["params"]["replicas"]
        canonical = "whole batch" if replicas.get("synchronized") else "mean over replicas"
        cells = []
        for column in ran:
            records = row.cells.get(column.key, Cell()).records
            record = next((r for r in records if r.check == "training"), None)
            if record is None:
                cells.append(None)
                continue
            moving = [m for m in record.metrics or [] if str(m.get("name", "")).startswith("moving_")]
            if record.status == Status.NOT_EXPRESSIBLE:
                text = "n/e"
            elif moving and all(m.get("passed") for m in moving):
                text = canonical
            else:
                named = [READINGS[v] for v in record.explained_by if v in READINGS]
                # e.g. variance-sum-of-squares alone: its wide tolerance cannot tell the readings apart
                text = named[0] if named else ("unexplained" if not record.explained_by else
                                               "undetermined (explained by " + ", ".join(
                                                   record.explained_by) + ")")
            cells.append({"status": record.status, "text": text, "title": record_title(record)})
        table.append({"row": row, "replicas": replicas, "cells": cells})
    return {"columns": ran, "rows": table}


def divergences(report: Report) -> list[dict[str, Any]]:
    """Failing and known records grouped by adapter x explanation (x status): unexplained failures
    first, then failures a variant explains but no rule expected, then known; larger groups first."""
    groups: dict[tuple[str, str, Status], list[tuple[Any, Record]]] = defaultdict(list)
    for row in report.cases:
        for key, cell in row.cells.items():
            for r in cell.records:
                if r.status in (Status.FAIL, Status.KNOWN):
                    groups[(key, explanation(r), r.status)].append((row, r))
    index = {c.key: c.index for c in report.columns}
    out = []
    for (key, why, status), items in groups.items():
        records = [r for _, r in items]
        rules = {tuple(str(r.rule.get(k) or "") for k in ("reason", "link", "source")): None
                 for r in records if isinstance(r.rule, dict)}
        closest: dict[str, list[float]] = defaultdict(list)
        for r in records:
            if isinstance(r.closest, dict):
                closest[str(r.closest.get("variant"))].append(number(r.closest.get("badness")))
        category = 2 if status is Status.KNOWN else 0 if why == UNEXPLAINED else 1
        out.append({"column": key, "explanation": why, "status": status, "count": len(items),
                    "examples": [(row, r.check) for row, r in items[:EXAMPLES]],
                    "more": max(0, len(items) - EXAMPLES), "effect": effect(records),
                    "rules": [{"reason": a, "link": b, "source": c} for a, b, c in rules],
                    "closest": sorted(({"variant": v, "badness": min(b), "count": len(b)}
                                       for v, b in closest.items()),
                                      key=lambda c: (-c["count"], c["badness"]))[:EXAMPLES],
                    "order": (category, -len(items), index.get(key, 0), why)})
    return sorted(out, key=lambda d: d["order"])


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
                colour = COLOURS[status]
                shown = "no error figures"
            cells.append({"x": left + x * size, "y": top + y * size, "colour": colour,
                          "outline": status in NEEDS_ATTENTION,
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
                for metric in record.metrics or []:
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


def capabilities(info: dict[str, Any]) -> dict[str, Any] | None:
    """An adapter's declared capabilities as lists of text (None when the file has none: format /1)."""
    cap = info.get("capabilities")
    if not isinstance(cap, dict):
        return None
    low, high = cap.get("min_rank"), cap.get("max_rank")
    ranks = (f"{low} – {high}" if low is not None and high is not None else f"≥ {low}" if low is not None
             else f"≤ {high}" if high is not None else "any")
    why = cap.get("why") if isinstance(cap.get("why"), dict) else {}
    return {key: [str(v) for v in cap.get(key) or []] for key in ("dtypes", "checks", "features")} | {
        "ranks": ranks, "why": sorted((str(k), str(v)) for k, v in why.items())}


def adapter_summaries(report: Report) -> list[dict[str, Any]]:
    """Per column: declared conventions and capabilities, translations made (with counts), what it
    cannot state, known divergences and other failures."""
    out = []
    for column in report.columns:
        translations: Counter = Counter()
        example: dict[str, str] = {}
        not_expressible, known, failures = [], [], []
        held: Counter = Counter()  # variants each record was held to (they may depend on the case)
        for row in report.cases:
            cell = row.cells.get(column.key)
            for record in cell.records if cell else []:
                if record.status not in (Status.NOT_EXPRESSIBLE, Status.ERROR):
                    held[", ".join(map(str, record.conventions or [])) or "none (canonical)"] += 1
                for t in record.translations or []:
                    translations[str(t)] += 1
                    example.setdefault(str(t), row.id)
                item = {"case": row.id, "anchor": row.anchor, "check": record.check, "status": record.status,
                        "reason": record.reason or "",
                        "explanation": explanation(record) if record.status is not Status.ERROR else "",
                        "rule": record.rule if isinstance(record.rule, dict) else {}}
                if record.status is Status.NOT_EXPRESSIBLE:
                    not_expressible.append(item)
                elif record.status is Status.KNOWN:
                    known.append(item)
                elif record.status in NEEDS_ATTENTION:
                    failures.append(item)
        conventions = column.info.get("conventions")
        conventions = conventions if isinstance(conventions, dict) else {}
        out.append({"column": column, "translations": translations.most_common(), "example": example,
                    "variants": [str(v) for v in conventions.get("variants") or []],
                    "legacy": {k: v for k, v in conventions.items() if k not in ("variants", "notes")},
                    "notes": conventions.get("notes") or [], "held": held.most_common(),
                    "capabilities": capabilities(column.info),
                    "not_expressible": not_expressible, "known": known, "failures": failures})
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
    diagnosis: str = ""  # explained by / closest variant
    rule_reason: str = ""
    rule_link: str = ""
    rule_source: str = ""
    conventions: str = ""
    translations: str = ""
    rule: str = ""


def diagnosis(record: Record) -> str:
    if record.explained_by:
        return f"explained by: {', '.join(map(str, record.explained_by))}"
    if isinstance(record.closest, dict) and record.status is Status.FAIL:
        return (f"unexplained; closest variant: {record.closest.get('variant')} "
                f"({fmt(record.closest.get('badness'))}× its tolerance)")
    return ""


def case_details(report: Report) -> list[tuple[Any, Markup]]:
    """Per case: one table row per record x output, in column order."""
    out = []
    order = {c.key: c.index for c in report.columns}
    for row in report.cases:
        lines: list[Line] = []
        for key in sorted(row.cells, key=lambda k: order.get(k, 0)):
            for record in row.cells[key].records:
                rule = record.rule if isinstance(record.rule, dict) else {}
                metrics = record.metrics or []
                head = Line(key, str(record.check), str(record.status), True, max(1, len(metrics)),
                            reason=str(record.reason or ""), diagnosis=diagnosis(record),
                            rule_reason=str(rule.get("reason") or ""), rule_link=str(rule.get("link") or ""),
                            rule_source=str(rule.get("source") or ""),
                            conventions=", ".join(map(str, record.conventions or [])),
                            translations="; ".join(map(str, record.translations or [])),
                            rule=str(record.tolerance_rule or ""))
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
        if line.diagnosis:
            notes.append(f"<b>{e(line.diagnosis)}</b>")
        if line.reason:
            notes.append(f"<pre>{e(line.reason)}</pre>")
        if line.rule_reason or line.rule_link:
            url = link(line.rule_link)
            text = e(line.rule_reason or line.rule_link)
            shown = f'<a href="{e(url)}" rel="noreferrer">{text}</a>' if url else text
            if line.rule_link and not url:
                shown += f" ({e(line.rule_link)})"
            if line.rule_source:
                shown += f" <small>{e(line.rule_source)}</small>"
            notes.append(f"known divergence: {shown}")
        if line.conventions:
            notes.append(f"<small>declared: {e(line.conventions)}</small>")
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
                per_column[key][r.status] += 1
    devices = sorted({str(a.get("device")).split()[0] for s in report.sources
                      for a in (s.environment.get("adapters") or {}).values()
                      if isinstance(a, dict) and a.get("device")})
    return {"python": distinct("python"), "os": distinct("os"), "hosts": distinct("hostname"),
            "devices": devices,
            "started": min(distinct("started"), default=""),
            "finished": max(distinct("finished"), default=""),
            "per_column": per_column}


def render(report: Report, title: str = "bnconform report") -> str:
    tags = sorted({t for row in report.cases for t in row.tags})
    statuses = sorted({s for row in report.cases for c in row.cells.values() for s in c.statuses},
                      key=status_rank)
    return page("report.html.j2", title=title, report=report, counts=report.counts(), tags=tags,
                statuses=statuses, divergences=divergences(report), matrix=matrix_rows(report),
                heatmap=heatmap_svg(report), histograms=ulp_histograms(report),
                adapters=adapter_summaries(report), details=case_details(report), env=environments(report),
                replicas=replica_readings(report),
                column_of=_columns(report))


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
    explanations = [{"change": c, "old": ", ".join(c.old.explained_by) or "none",
                     "new": ", ".join(c.new.explained_by) or "none"} for c in diff.explanations]
    adapters = sorted({c.adapter for c in diff.changes})
    tags = sorted({t for c in diff.changes for t in c.tags})
    statuses = [s for s in SEVERITY if any(s in r["filter"]["status"] for r in rows)]
    return page("diff.html.j2", title=title, diff=diff, rows=rows, explanations=explanations, kinds=KINDS,
                kind_text=KIND_TEXT, adapters=adapters, tags=tags, statuses=statuses)
