"""Results files in, one merged view out: columns (adapter runs), cases, cells, probes.

Reads only the JSON the pytest plugin writes; never imports `adapters` or a framework, so a report
can be made from results produced on other machines and other framework versions.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "bnconform-results/1"
# worst first: a cell shows the worst status over its checks (training / inference / gradients)
STATUS_ORDER = ["error", "fail", "xpass", "xfail", "not-expressible", "pass", "skipped"]
KNOWN_STATUSES = frozenset(STATUS_ORDER)
# statuses that ask for someone's attention (used by the comparison to tell regressions from fixes)
BAD_STATUSES = frozenset({"error", "fail", "xpass"})


def status_rank(status: str) -> int:
    """Unknown statuses (a newer harness, a hand-edited file) rank with errors: never hidden as passes."""
    return STATUS_ORDER.index(status) if status in KNOWN_STATUSES else 0


def status_class(status: str) -> str:
    """A CSS class token for a status taken from a results file (the file's text never becomes a class)."""
    return status if status in KNOWN_STATUSES else "unknown"


def number(value: Any) -> float:
    """A metric value as a float: results files write non-finite floats as "inf"/"-inf" and NaN as null."""
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, int | float):
        return float(value)
    return {"inf": math.inf, "-inf": -math.inf, "Infinity": math.inf}.get(str(value), math.nan)


def anchor(prefix: str, text: str) -> str:
    """A fragment id that survives any case id: readable when the id is plain, hashed otherwise."""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", text):
        return f"{prefix}-{text}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text)[:40].strip("-")
    return f"{prefix}-{slug}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def worst_ulp(records: list[dict[str, Any]]) -> float | None:
    """Largest max-ULP error over the records' outputs; NaN (null) counts as infinitely bad."""
    values = [m.get("max_ulp", None) for r in records for m in r.get("metrics") or []]
    if not values:
        return None
    numbers = [number(v) for v in values]
    return max(math.inf if math.isnan(v) else v for v in numbers)


@dataclass
class Column:
    """One adapter as run in one results file (the same adapter from two files = two columns)."""

    key: str
    adapter: str
    family: str
    source: str
    info: dict[str, Any]
    environment: dict[str, Any]
    index: int = 0

    @property
    def backend(self) -> str:
        versions = self.info.get("versions") or {}
        if "backend" in versions:
            return str(versions["backend"])
        if self.family == "keras":
            return str(self.environment.get("keras_backend") or "tensorflow")
        return ""


@dataclass
class Cell:
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        statuses = [str(r.get("status", "error")) for r in self.records]
        return min(statuses, key=status_rank) if statuses else "absent"

    @property
    def statuses(self) -> list[str]:
        return sorted({str(r.get("status", "error")) for r in self.records}, key=status_rank)

    @property
    def worst_ulp(self) -> float | None:
        return worst_ulp(self.records)


@dataclass
class CaseRow:
    id: str
    anchor: str
    info: dict[str, Any]
    file: str
    line: int | None
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def tags(self) -> list[str]:
        return [str(t) for t in self.info.get("tags") or []]


@dataclass
class Source:
    """One results file as read: its environment, or why it could not be read."""

    path: str
    environment: dict[str, Any] = field(default_factory=dict)
    format: str = ""
    records: int = 0
    error: str = ""


@dataclass
class Report:
    columns: list[Column]
    cases: list[CaseRow]
    sources: list[Source]
    broken_records: list[dict[str, Any]]
    probe_names: list[str]
    probe_columns: list[Column]
    probes: dict[tuple[str, str], dict[str, Any]]  # (probe name, column key) -> probe entry

    def counts(self) -> Counter:
        return Counter(str(r.get("status")) for row in self.cases for c in row.cells.values()
                       for r in c.records)

    @property
    def record_count(self) -> int:
        return sum(len(c.records) for row in self.cases for c in row.cells.values())


def read(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The parsed file, or None and a one-line reason: one bad file must not lose the others."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not isinstance(data, dict) or not isinstance(data.get("records", []), list):
        return None, "not a bnconform results file (no top-level object with a records list)"
    return data, ""


def load(paths: list[Path]) -> Report:
    columns: dict[str, Column] = {}
    cases: dict[str, CaseRow] = {}
    sources: list[Source] = []
    broken: list[dict[str, Any]] = []
    probe_names: dict[str, None] = {}
    probe_columns: dict[str, Column] = {}
    probes: dict[tuple[str, str], dict[str, Any]] = {}
    seen: Counter = Counter()

    def column_for(adapter_id: str, path: Path, info: dict[str, Any], env: dict[str, Any]) -> Column:
        seen[adapter_id] += 1
        key = adapter_id if seen[adapter_id] == 1 else f"{adapter_id} @ {Path(path).stem}"
        while key in columns:
            key += "'"
        column = Column(key, adapter_id, str(info.get("family", "")), str(path), info, env, len(columns))
        columns[key] = column
        return column

    for path in paths:
        data, error = read(path)
        if data is None:
            sources.append(Source(str(path), error=error))
            continue
        env = data.get("environment") if isinstance(data.get("environment"), dict) else {}
        records = data.get("records") or []
        sources.append(Source(str(path), env, str(data.get("format", "")), len(records)))
        keys: dict[str, str] = {}
        adapters = env.get("adapters") if isinstance(env.get("adapters"), dict) else {}
        for adapter_id, info in adapters.items():
            keys[adapter_id] = column_for(adapter_id, path, info if isinstance(info, dict) else {}, env).key
        for record in records:
            if not isinstance(record, dict):
                continue
            if record.get("case") is None or record.get("adapter") is None:
                broken.append({"source": str(path), **record})
                continue
            adapter_id = str(record["adapter"])
            if adapter_id not in keys:  # a record whose adapter the environment does not list
                keys[adapter_id] = column_for(adapter_id, path, {"family": record.get("family", "")}, env).key
            case_id = str(record["case"])
            row = cases.get(case_id)
            if row is None:
                info = record.get("case_info") if isinstance(record.get("case_info"), dict) else {}
                row = cases[case_id] = CaseRow(case_id, anchor("case", case_id), info,
                                               str(record.get("file", "")), record.get("line"))
            row.cells.setdefault(keys[adapter_id], Cell()).records.append(record)
        raw_probes = data.get("probes") if isinstance(data.get("probes"), dict) else {}
        for adapter_id, entries in raw_probes.items():
            if adapter_id not in keys:
                keys[adapter_id] = column_for(adapter_id, path, {}, env).key
            column = columns[keys[adapter_id]]
            probe_columns[column.key] = column
            for name, entry in (entries or {}).items():
                probe_names.setdefault(str(name), None)
                probes[(str(name), column.key)] = entry if isinstance(entry, dict) else {"value": entry}
    ordered = sorted(cases.values(), key=lambda r: (r.file, r.id))
    return Report(list(columns.values()), ordered, sources, broken, list(probe_names),
                  sorted(probe_columns.values(), key=lambda c: c.index), probes)
