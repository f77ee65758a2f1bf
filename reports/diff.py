"""Two runs compared: which case x adapter x check changed status or error (a framework upgrade, say).

Records are matched by (case, adapter id, check), never by results-file name, so an old run from one
machine compares with a new run from another. Error changes are judged on each output's max ULP.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reports.model import BAD_STATUSES, Report, load, number, status_rank

# Order of the kinds on the page: what needs attention first.
KINDS = ["regressed", "fixed", "status", "error-up", "error-down", "added", "removed"]
KIND_TEXT = {"regressed": "now fails or errors", "fixed": "no longer fails", "status": "other status change",
             "error-up": "error grew", "error-down": "error shrank", "added": "only in the new run",
             "removed": "only in the old run"}

Key = tuple[str, str, str]


@dataclass
class Change:
    case: str
    adapter: str
    check: str
    kind: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    tags: list[str]
    outputs: list[dict[str, Any]] = field(default_factory=list)  # per output: old/new max ULP, ratio

    @property
    def old_status(self) -> str:
        return str(self.old.get("status")) if self.old else "–"

    @property
    def new_status(self) -> str:
        return str(self.new.get("status")) if self.new else "–"


@dataclass
class Diff:
    old: Report
    new: Report
    changes: list[Change]
    unchanged: int
    kinds: Counter
    versions: list[dict[str, Any]]  # per adapter: old and new framework versions
    probes: list[dict[str, Any]]  # probe values that differ


def index(report: Report) -> dict[Key, dict[str, Any]]:
    """(case, adapter, check) -> record; when several files hold one, the worst status wins."""
    out: dict[Key, dict[str, Any]] = {}
    for row in report.cases:
        for cell in row.cells.values():
            for record in cell.records:
                key = (row.id, str(record.get("adapter")), str(record.get("check")))
                held = out.get(key)
                rank = status_rank(str(record.get("status")))
                if held is None or rank < status_rank(str(held.get("status"))):
                    out[key] = record
    return out


def ulps(record: dict[str, Any] | None) -> dict[str, float]:
    """Output name -> max ULP (NaN as infinitely bad)."""
    out = {}
    for m in (record or {}).get("metrics") or []:
        value = number(m.get("max_ulp"))
        out[str(m.get("name"))] = math.inf if math.isnan(value) else value
    return out


def error_change(old: dict[str, float], new: dict[str, float], factor: float, floor: float) -> str | None:
    """error-up / error-down when some output's max ULP moved by `factor` and by more than `floor` ULPs."""
    up = down = False
    for name in old.keys() & new.keys():
        a, b = old[name], new[name]
        if a == b or abs(b - a) <= floor:
            continue
        if math.isinf(a) or math.isinf(b):
            up, down = up or b > a, down or b < a
        elif b > a * factor:
            up = True
        elif a > b * factor:
            down = True
    return "error-up" if up else "error-down" if down else None


def classify(old: dict[str, Any] | None, new: dict[str, Any] | None, factor: float,
             floor: float) -> str | None:
    if old is None:
        return "added"
    if new is None:
        return "removed"
    a, b = str(old.get("status")), str(new.get("status"))
    if a != b:
        if b in BAD_STATUSES and a not in BAD_STATUSES:
            return "regressed"
        if a in BAD_STATUSES and b not in BAD_STATUSES:
            return "fixed"
        return "status"
    return error_change(ulps(old), ulps(new), factor, floor)


def compare(old_paths: list[Path], new_paths: list[Path], factor: float = 2.0, floor: float = 1.0) -> Diff:
    old, new = load(old_paths), load(new_paths)
    a, b = index(old), index(new)
    tags = {row.id: row.tags for report in (old, new) for row in report.cases}
    changes, unchanged = [], 0
    for key in sorted(a.keys() | b.keys()):
        kind = classify(a.get(key), b.get(key), factor, floor)
        if kind is None:
            unchanged += 1
            continue
        before, after = ulps(a.get(key)), ulps(b.get(key))
        outputs = [{"name": n, "old": before.get(n), "new": after.get(n),
                    "ratio": _ratio(before.get(n), after.get(n))}
                   for n in sorted(before.keys() | after.keys())]
        changes.append(Change(*key, kind, a.get(key), b.get(key), tags.get(key[0], []), outputs))
    changes.sort(key=lambda c: (KINDS.index(c.kind), c.case, c.adapter, c.check))
    return Diff(old, new, changes, unchanged, Counter(c.kind for c in changes), versions(old, new),
                probe_changes(old, new))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isinf(a) or math.isinf(b):
        return None
    return (b + 1.0) / (a + 1.0)  # +1: a change from 0 to 0.5 ULP is no news


def versions(old: Report, new: Report) -> list[dict[str, Any]]:
    """Per adapter id, the framework versions (and device, backend) each run used."""
    def by_adapter(report: Report) -> dict[str, str]:
        out: dict[str, set[str]] = {}
        for c in report.columns:
            shown = ", ".join(f"{k} {v}" for k, v in (c.info.get("versions") or {}).items())
            if c.info.get("device"):
                shown += f" on {c.info['device']}"
            out.setdefault(c.adapter, set()).add(shown or "?")
        return {k: " | ".join(sorted(v)) for k, v in out.items()}

    a, b = by_adapter(old), by_adapter(new)
    return [{"adapter": k, "old": a.get(k, "–"), "new": b.get(k, "–"), "changed": a.get(k) != b.get(k)}
            for k in sorted(a.keys() | b.keys())]


def probe_changes(old: Report, new: Report) -> list[dict[str, Any]]:
    def flat(report: Report) -> dict[tuple[str, str], dict[str, Any]]:
        adapter_of = {c.key: c.adapter for c in report.probe_columns}
        return {(name, adapter_of[key]): entry for (name, key), entry in report.probes.items()}

    a, b = flat(old), flat(new)
    out = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key), b.get(key)
        if x is None or y is None or x.get("value") != y.get("value") or x.get("agrees") != y.get("agrees"):
            out.append({"probe": key[0], "adapter": key[1], "old": x, "new": y})
    return out
