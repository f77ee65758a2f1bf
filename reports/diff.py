"""Two runs compared: which case x adapter x check changed status, error or explanation (a framework
upgrade, say).

Records are matched by (case, adapter id, check), never by results-file name, so an old run from one
machine compares with a new run from another. Error changes are judged on each output's max ULP. A
record that diverges (fail or known) in both runs, but is explained by other variants, is an explanation
change, listed on its own whether or not its status changed too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.results import NEEDS_ATTENTION, Record, Status
from reports.model import Report, load, number, status_rank

# Order of the kinds on the page: what needs attention first.
KINDS = ["regressed", "fixed", "status", "error-up", "error-down", "added", "removed"]
KIND_TEXT = {"regressed": "now fails or errors", "fixed": "no longer fails", "status": "other status change",
             "error-up": "error grew", "error-down": "error shrank", "added": "only in the new run",
             "removed": "only in the old run"}

Key = tuple[str, str, str]
DIVERGING = frozenset({Status.FAIL, Status.KNOWN})


@dataclass
class Change:
    case: str
    adapter: str
    check: str
    kind: str
    old: Record | None
    new: Record | None
    tags: list[str]
    outputs: list[dict[str, Any]] = field(default_factory=list)  # per output: old/new max ULP, ratio

    @property
    def old_status(self) -> str:
        return str(self.old.status) if self.old else "–"

    @property
    def new_status(self) -> str:
        return str(self.new.status) if self.new else "–"


@dataclass
class Diff:
    old: Report
    new: Report
    changes: list[Change]  # status and error changes, records only in one run
    explanations: list[Change]  # diverging in both runs, explained by other variants
    unchanged: int
    kinds: Counter
    versions: list[dict[str, Any]]  # per adapter: old and new framework versions
    probes: list[dict[str, Any]]  # probe values that differ


def index(report: Report) -> dict[Key, Record]:
    """(case, adapter, check) -> record; when several files hold one, the worst status wins."""
    out: dict[Key, Record] = {}
    for row in report.cases:
        for cell in row.cells.values():
            for record in cell.records:
                key = (row.id, str(record.adapter), str(record.check))
                held = out.get(key)
                if held is None or status_rank(record.status) < status_rank(held.status):
                    out[key] = record
    return out


def ulps(record: Record | None) -> dict[str, float]:
    """Output name -> max ULP (NaN as infinitely bad)."""
    out = {}
    for m in record.metrics if record else []:
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


def classify(old: Record | None, new: Record | None, factor: float, floor: float) -> str | None:
    if old is None:
        return "added"
    if new is None:
        return "removed"
    a, b = old.status, new.status
    if a != b:
        if b in NEEDS_ATTENTION and a not in NEEDS_ATTENTION:
            return "regressed"
        if a in NEEDS_ATTENTION and b not in NEEDS_ATTENTION:
            return "fixed"
        return "status"
    return error_change(ulps(old), ulps(new), factor, floor)


def explained_differently(old: Record | None, new: Record | None) -> bool:
    return (old is not None and new is not None and {old.status, new.status} <= DIVERGING
            and list(old.explained_by) != list(new.explained_by))


def diff_runs(old_paths: list[Path], new_paths: list[Path], factor: float = 2.0, floor: float = 1.0) -> Diff:
    old, new = load(old_paths), load(new_paths)
    a, b = index(old), index(new)
    tags = {row.id: row.tags for report in (old, new) for row in report.cases}
    changes, explanations, unchanged = [], [], 0
    for key in sorted(a.keys() | b.keys()):
        before, after = a.get(key), b.get(key)
        kind = classify(before, after, factor, floor)
        if explained_differently(before, after):
            explanations.append(Change(*key, "explanation", before, after, tags.get(key[0], [])))
        elif kind is None:
            unchanged += 1
        if kind is None:
            continue
        old_ulps, new_ulps = ulps(before), ulps(after)
        outputs = [{"name": n, "old": old_ulps.get(n), "new": new_ulps.get(n),
                    "ratio": _ratio(old_ulps.get(n), new_ulps.get(n))}
                   for n in sorted(old_ulps.keys() | new_ulps.keys())]
        changes.append(Change(*key, kind, before, after, tags.get(key[0], []), outputs))
    changes.sort(key=lambda c: (KINDS.index(c.kind), c.case, c.adapter, c.check))
    return Diff(old, new, changes, explanations, unchanged, Counter(c.kind for c in changes),
                versions(old, new), probe_changes(old, new))


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
