"""The HTML: Jinja2 templates with autoescape, inline CSS, inline SVG, one small plain script.

Everything that comes from a results file reaches the page through autoescaped template
expressions (text and quoted attributes), `tojson` in single-quoted attributes, or the one embedded
JSON block (`embedded`: `<`, `>` and `&` escaped) that the page's script reads through
`textContent` and writes with `textContent` only; the only `|safe` strings are this package's own
script and stylesheet. A Content-Security-Policy admits that
one script by its hash and forbids every network fetch, so even a missed escape could not run code
or load anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections import Counter, defaultdict
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
    Report,
    effect,
    explanation,
    number,
    status_rank,
    worst_ulp,
)

COLOURS = {Status.PASS: "#2e7d32", Status.FAIL: "#c62828", Status.ERROR: "#6a1b9a", Status.KNOWN: "#ef6c00",
           Status.NOT_EXPRESSIBLE: "#78909c", "absent": "#eceff1"}
EXAMPLES = 5  # cases (and closest variants) named per divergence group
# decades of max ULP error, for the histograms
ULP_EDGES = [1, 10, 1e2, 1e3, 1e4, 1e5, 1e6]
ULP_LABELS = ["≤1", "≤10", "≤1e2", "≤1e3", "≤1e4", "≤1e5", "≤1e6", ">1e6"]


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
    env.globals.update(colours=COLOURS, severity=SEVERITY,
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
                    "order": (category, -len(items), index.get(key, 0), why),
                    "plot": group_plot(items, driving_variant(records))})
    return sorted(out, key=lambda d: d["order"])


# ------------------------------------------------------------------ divergence plots

# What drives each variant's error, read from a record's case_info: (axis label, function, kind).
# The sharpest named variant of a group decides; an unexplained group takes its closest variant.
DTYPE_ORDER = ["float64", "float32", "bfloat16", "float16"]


def values_per_channel(info: dict[str, Any]) -> float | None:
    """Elements each channel's statistics average over: the batch size times the other dims."""
    shapes, params = info.get("shapes") or [], info.get("params") or {}
    if not shapes or not isinstance(shapes[0], list):
        return None
    shape = shapes[0]
    axes = params.get("axis")
    axes = axes if isinstance(axes, list) else [axes]
    try:
        channel = {a % len(shape) for a in axes if isinstance(a, int)}
    except ZeroDivisionError:
        return None
    n = 1
    for i, size in enumerate(shape):
        if i not in channel:
            n *= size
    return float(n) if n > 0 else None


DRIVERS: dict[str, tuple[str, Any, str]] = {
    "moving-variance": ("values per channel (batch size x spatial)", values_per_channel, "log"),
    "variance-sum-of-squares": ("channel |mean| / std of the input",
                                lambda info: number(info.get("conditioning")), "log"),
    "epsilon": ("epsilon", lambda info: number((info.get("params") or {}).get("epsilon")), "log"),
    "momentum": ("momentum (decay form)", lambda info: number((info.get("params") or {}).get("momentum")),
                 "linear"),
    "dtype": ("dtype", lambda info: info.get("dtype"), "category"),
}


def driving_variant(records: list[Record]) -> str:
    """The variant a group's plot is drawn for: its first named variant, or the closest one."""
    for r in records:
        if r.explained_by:
            return str(r.explained_by[0]).split("+")[0]
        if isinstance(r.closest, dict) and r.closest.get("variant"):
            return str(r.closest["variant"])
    return ""


def driver(variant: str) -> tuple[str, Any, str]:
    for prefix, spec in DRIVERS.items():
        if variant.startswith(prefix):
            return spec
    return DRIVERS["dtype"]  # precision effects (compute-*, *-float32) and anything else: by dtype


def group_plot(items: list[tuple[Any, Record]], variant: str, limit: int = 150) -> dict[str, Any] | None:
    """A small scatter of each record's error (largest max relative error of its failing outputs,
    log scale) against the quantity that drives the group's variant, as inline SVG geometry."""
    label, quantity, kind = driver(variant)
    points = []
    for row, r in items:
        y = effect([r])
        x = quantity(row.info if isinstance(row.info, dict) else {})
        if y is None or not math.isfinite(y) or y <= 0 or x is None:
            continue
        numeric = isinstance(x, float) and math.isfinite(x) and (kind != "log" or x > 0)
        if kind != "category" and not numeric:
            continue
        points.append((x, y, f"{row.id} ({r.check})"))
    if not points:
        return None
    points = points[:: max(1, len(points) // limit)][:limit]
    width, height, left, bottom, top = 240, 120, 40, 24, 6
    ys = [math.log10(p[1]) for p in points]
    y0, y1 = math.floor(min(ys)), math.ceil(max(ys))
    y1 = y1 if y1 > y0 else y0 + 1

    def py(v: float) -> float:
        return top + (height - top - bottom) * (1 - (math.log10(v) - y0) / (y1 - y0))

    if kind == "category":
        names = [d for d in DTYPE_ORDER if any(p[0] == d for p in points)] + sorted(
            {str(p[0]) for p in points} - set(DTYPE_ORDER))
        step = (width - left - 10) / max(1, len(names))
        ticks = [{"x": left + step * (i + 0.5), "label": n} for i, n in enumerate(names)]
        position = {n: left + step * (i + 0.5) for i, n in enumerate(names)}

        def px(v: Any) -> float:
            return position[str(v)]
    else:
        xs = [math.log10(p[0]) if kind == "log" else p[0] for p in points]
        x0, x1 = min(xs), max(xs)
        x1 = x1 if x1 > x0 else x0 + 1

        def px(v: Any) -> float:
            t = math.log10(v) if kind == "log" else v
            return left + (width - left - 10) * (t - x0) / (x1 - x0)
        ticks = [{"x": left, "label": f"{10 ** x0 if kind == 'log' else x0:.3g}"},
                 {"x": width - 10, "label": f"{10 ** x1 if kind == 'log' else x1:.3g}"}]
    return {"width": width, "height": height, "left": left, "axis_y": height - bottom, "label": label,
            "variant": variant, "ticks": ticks,
            "yticks": [{"y": py(10.0 ** e), "label": f"1e{e}"}
                       for e in range(y0, y1 + 1, max(1, -(-(y1 - y0) // 4)))],
            "points": [{"x": round(px(x), 1), "y": round(py(y), 1), "title": f"{t}: {fmt(x)}, {fmt(y)}"}
                       for x, y, t in points]}


# ------------------------------------------------------------------ porting recipes


def porting(report: Report) -> dict[str, Any]:
    """Every ordered pair of adapters with probes or declared names, its recipe built by
    conformance.port from this run's probes, declarations and divergence groups."""
    from conformance.port import Side, recipe

    sides = []
    for column in report.columns:
        probes = {name: report.probes[(name, column.key)] for name in report.probe_names
                  if (name, column.key) in report.probes}
        names = column.info.get("names") if isinstance(column.info.get("names"), dict) else {}
        if not probes and not names:
            continue
        conventions = column.info.get("conventions")
        conventions = conventions if isinstance(conventions, dict) else {}
        records = [r for row in report.cases for r in (row.cells[column.key].records
                                                        if column.key in row.cells else [])]
        sides.append(Side(column.key, {str(k): str(v) for k, v in names.items()}, probes,
                          [str(v) for v in conventions.get("variants") or []], records))
    origin = "from this report's results files: their probes, declared names and conventions"
    pairs = [{"i": i, "j": j, "recipe": recipe(a, b, origin)}
             for i, a in enumerate(sides) for j, b in enumerate(sides) if i != j]
    keys = [s.adapter for s in sides]
    first = next((p for p in pairs if (p["recipe"].source, p["recipe"].target) == ("torch", "keras")),
                 pairs[0] if pairs else None)
    grid = {(p["i"], p["j"]): p["recipe"].differences for p in pairs}
    return {"adapters": keys, "pairs": pairs, "first": first, "grid": grid}


# ------------------------------------------------------------------ the data the page's script reads


def _round(value: Any) -> float | str | None:
    """A metric in 4 significant digits (JSON has no inf/NaN: those stay strings)."""
    x = number(value)
    if math.isnan(x):
        return None if value is None else str(value)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.4g}")


def page_data(report: Report) -> dict[str, Any]:
    """Everything the matrix and the per-case detail need, once: cases in matrix order (worst
    first), each with its cells and records. Repeated text (translations, reasons, variant names,
    output names) is stored once in `strings` and referred to by index. Passing records keep
    their worst ULP only; failing and known ones every output's figures."""
    strings: dict[str, int] = {}

    def ref(text: Any) -> int:
        return strings.setdefault(str(text or ""), len(strings))

    ref("")
    status_index = {s: i for i, s in enumerate(SEVERITY)}
    attention = (Status.FAIL, Status.KNOWN)
    rows = []
    for row in report.cases:
        cells, records, worst = [], [], (len(SEVERITY), 0.0)
        for column in report.columns:
            cell = row.cells.get(column.key)
            if cell is None:
                cells.append(0)
                continue
            ulps = [worst_ulp([r]) for r in cell.records]
            known_ulps = [u for u in ulps if u is not None]
            ulp = max(known_ulps) if known_ulps else None
            statuses = sorted({status_index[r.status] for r in cell.records})
            status = SEVERITY[statuses[0]]
            why = dict.fromkeys(short_explanation(r) for r in cell.records if r.status in attention)
            cells.append([statuses[0], _round(ulp), ref(" / ".join(w for w in why if w)), statuses])
            worst = min(worst, (statuses[0], -badness(status, ulp)))
            for r, u in zip(cell.records, ulps, strict=True):
                rule = r.rule if isinstance(r.rule, dict) else {}
                head = [column.index, ref(r.check), status_index.get(r.status, 0), ref(r.reason),
                        ref(diagnosis(r)), ref(rule.get("reason")), ref(link(rule.get("link")) or ""),
                        ref(rule.get("source")), ref(", ".join(map(str, r.conventions or []))),
                        ref("; ".join(map(str, r.translations or []))), ref(r.tolerance_rule)]
                if r.status is Status.PASS:
                    head.append(_round(u))
                else:
                    head.append([[ref(m.get("name")), int(bool(m.get("passed"))), _round(m.get("max_abs")),
                                  _round(m.get("max_rel")), _round(m.get("max_ulp")), _round(m.get("rtol")),
                                  _round(m.get("atol")), ref(f"{m.get('worst_index')}: "
                                                             f"{fmt(m.get('worst_expected'), 9)} / "
                                                             f"{fmt(m.get('worst_got'), 9)}"),
                                  ref(m.get("note")), int(bool(m.get("derived")))] for m in r.metrics or []])
                records.append(head)
        info = row.info if isinstance(row.info, dict) else {}
        params = " ".join(f"{k}={fmt_value(v)}" for k, v in (info.get("params") or {}).items())
        steps = f" · steps {info.get('steps')}" if info.get("steps") else ""
        error = " · expect_error" if info.get("expect_error") else ""
        override = info.get("tolerance_override") if isinstance(info.get("tolerance_override"), dict) else {}
        rows.append((worst, [row.id, row.anchor, str(info.get("dtype") or ""), row.tags,
                             ref(f"{row.file}{f':{row.line}' if row.line else ''}"), ref(info.get("title")),
                             ref(f"shapes {fmt_value(info.get('shapes'))}{steps} · params {params}{error}"),
                             ref(f"tolerance override rtol {fmt(override.get('rtol'))} atol "
                                 f"{fmt(override.get('atol'))}: {override.get('reason')}" if override
                                 else ""),
                             cells, records]))
    rows.sort(key=lambda r: r[0])
    return {"columns": [c.key for c in report.columns], "statuses": [str(s) for s in SEVERITY],
            "strings": list(strings), "cases": [r[1] for r in rows]}


def embedded(data: dict[str, Any]) -> Markup:
    """JSON for a <script type="application/json"> block: <, > and & as \\u escapes, so no text
    from a results file can close the element or start markup."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return Markup(text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
                  .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def diagnosis(record: Record) -> str:
    if record.explained_by:
        return f"explained by: {', '.join(map(str, record.explained_by))}"
    if isinstance(record.closest, dict) and record.status is Status.FAIL:
        return (f"unexplained; closest variant: {record.closest.get('variant')} "
                f"({fmt(record.closest.get('badness'))}× its tolerance)")
    return ""


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
    """Per column: declared conventions and capabilities, translations made (with counts), and what
    it cannot state, its known divergences and other failures, each grouped by reason or
    explanation with a count and one example (a 1,000-case run has thousands of such records)."""
    out = []
    for column in report.columns:
        translations: Counter = Counter()
        example: dict[str, str] = {}
        grouped: dict[str, dict[tuple[str, str], list]] = {"not_expressible": {}, "known": {}, "failures": {}}
        held: Counter = Counter()  # variants each record was held to (they may depend on the case)
        for row in report.cases:
            cell = row.cells.get(column.key)
            for record in cell.records if cell else []:
                if record.status not in (Status.NOT_EXPRESSIBLE, Status.ERROR):
                    held[", ".join(map(str, record.conventions or [])) or "none (canonical)"] += 1
                for t in record.translations or []:
                    translations[str(t)] += 1
                    example.setdefault(str(t), row.id)
                rule = record.rule if isinstance(record.rule, dict) else {}
                if record.status is Status.NOT_EXPRESSIBLE:
                    key, kind = (str(record.reason or ""), ""), "not_expressible"
                elif record.status is Status.KNOWN:
                    key, kind = (explanation(record), str(rule.get("reason") or record.reason or "")), "known"
                elif record.status in NEEDS_ATTENTION:
                    why = explanation(record) if record.status is not Status.ERROR else ""
                    key, kind = (f"{record.status}: {why}" if why else str(record.status),
                                 str(record.reason or "").split("\n")[0][:300]), "failures"
                else:
                    continue
                group = grouped[kind].setdefault(key, [0, row, record.check, rule])
                group[0] += 1
        conventions = column.info.get("conventions")
        conventions = conventions if isinstance(conventions, dict) else {}
        out.append({"column": column, "translations": translations.most_common(), "example": example,
                    "variants": [str(v) for v in conventions.get("variants") or []],
                    "legacy": {k: v for k, v in conventions.items() if k not in ("variants", "notes")},
                    "notes": conventions.get("notes") or [], "held": held.most_common(),
                    "capabilities": capabilities(column.info),
                    **{kind: sorted(({"what": k[0], "reason": k[1], "count": g[0], "case": g[1].id,
                                      "anchor": g[1].anchor, "check": g[2], "rule": g[3]}
                                     for k, g in groups.items()), key=lambda d: -d["count"])
                       for kind, groups in grouped.items()},
                    "counts": {kind: sum(g[0] for g in groups.values()) for kind, groups in grouped.items()}})
    return out


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
    groups = divergences(report)
    counts = report.counts()
    statuses = sorted((s for s, n in counts.items() if n), key=status_rank)
    return page("report.html.j2", title=title, report=report, counts=counts, tags=tags,
                statuses=statuses, divergences=groups, histograms=ulp_histograms(report),
                adapters=adapter_summaries(report), env=environments(report), porting=porting(report),
                unexplained=sum(d["count"] for d in groups if d["explanation"] == UNEXPLAINED),
                attention_cases=sum(1 for row in report.cases
                                    if any(c.status in NEEDS_ATTENTION for c in row.cells.values())),
                replicas=replica_readings(report), data=embedded(page_data(report)))


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
