"""The HTML: one Jinja2 template with autoescape, inline CSS, inline SVG, a few lines of plain JS."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from jinja2 import Environment, select_autoescape

from reports.model import Report, _number

COLOURS = {"pass": "#2e7d32", "fail": "#c62828", "error": "#6a1b9a", "xfail": "#ef6c00",
           "xpass": "#ad1457", "not-expressible": "#78909c", "skipped": "#b0bec5", "absent": "#eceff1"}


def fmt(value: Any, digits: int = 3) -> str:
    number = _number(value) if not isinstance(value, bool) else math.nan
    if math.isnan(number):
        return "–" if value is None else str(value)
    if math.isinf(number):
        return "∞" if number > 0 else "-∞"
    return f"{number:.{digits}g}"


def heatmap_svg(report: Report) -> dict[str, Any]:
    """Geometry of the case x adapter heatmap: the template draws one rect per cell."""
    size, left, top = 12, 230, 110
    cells = []
    for y, row in enumerate(report.cases):
        for x, column in enumerate(report.columns):
            cell = row.cells.get(column.key)
            status = cell.status if cell else "absent"
            cells.append({"x": left + x * size, "y": top + y * size, "colour": COLOURS[status],
                          "title": f"{row.id} / {column.key}: {status}"})
    return {"size": size, "left": left, "top": top, "cells": cells,
            "width": left + size * len(report.columns) + 10, "height": top + size * len(report.cases) + 10,
            "rows": [{"y": top + i * size + size - 2, "label": r.id} for i, r in enumerate(report.cases)],
            "cols": [{"x": left + i * size + size - 3, "label": c.key} for i, c in enumerate(report.columns)]}


def ulp_histograms(report: Report) -> list[dict[str, Any]]:
    """Per adapter: how many compared outputs fell in each decade of max ULP error."""
    edges = [0, 1, 10, 100, 1e3, 1e4, 1e5, 1e6, math.inf]
    labels = ["≤1", "≤10", "≤1e2", "≤1e3", "≤1e4", "≤1e5", "≤1e6", ">1e6"]
    out = []
    for column in report.columns:
        counts = [0] * len(labels)
        for row in report.cases:
            cell = row.cells.get(column.key)
            for record in cell.records if cell else []:
                for metric in record.get("metrics", []):
                    value = _number(metric.get("max_ulp"))
                    if math.isnan(value):
                        value = math.inf
                    index = next(i for i in range(len(labels)) if value <= edges[i + 1])
                    counts[index] += 1
        peak = max(counts) or 1
        bars = [{"label": label, "count": c, "height": 60 * c / peak, "x": 8 + i * 34}
                for i, (label, c) in enumerate(zip(labels, counts, strict=True))]
        out.append({"adapter": column.key, "bars": bars, "total": sum(counts)})
    return out


def adapter_summaries(report: Report) -> list[dict[str, Any]]:
    out = []
    for column in report.columns:
        translations: dict[str, int] = defaultdict(int)
        not_expressible, xfails, failures = [], [], []
        for row in report.cases:
            cell = row.cells.get(column.key)
            for record in cell.records if cell else []:
                for t in record.get("translations", []):
                    translations[t] += 1
                item = {"case": row.id, "check": record.get("check"), "reason": record.get("reason", "")}
                status = record.get("status")
                if status == "not-expressible":
                    not_expressible.append(item)
                elif status in ("xfail", "xpass"):
                    known = record.get("known_failure") or {}
                    xfails.append({**item, "reason": known.get("reason", item["reason"]),
                                   "link": known.get("link", "")})
                elif status in ("fail", "error"):
                    failures.append(item)
        out.append({"column": column, "translations": sorted(translations.items()),
                    "not_expressible": not_expressible, "xfails": xfails, "failures": failures})
    return out


def render(report: Report) -> str:
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    template = env.from_string(resources.files("reports").joinpath("report.html.j2").read_text("utf-8"))
    tags = sorted({t for row in report.cases for t in row.info.get("tags", [])})
    return template.render(
        report=report, colours=COLOURS, counts=report.counts(), tags=tags,
        heatmap=heatmap_svg(report), histograms=ulp_histograms(report),
        adapters=adapter_summaries(report),
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
    )
