"""Results files in, one merged view out: columns (adapter runs), cases, cells, probes.

Reads results through `conformance.results` (the one owner of the format, standard library only);
never imports `adapters` or a framework, so a report can be made from results produced on other
machines and other framework versions.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.results import SEVERITY, Record, Status, read

UNEXPLAINED = "unexplained"  # a failure no variant matches
UNNAMED = "no variant named"  # a known failure from a format /1 file, which named no variant


def status_rank(status: Status) -> int:
    """Position in SEVERITY, worst first."""
    return SEVERITY.index(status)


def explanation(record: Record) -> str:
    """What a failing or known record's measurement matches: its variants, or why there are none."""
    names = ", ".join(map(str, record.explained_by or []))
    return names or (UNNAMED if record.status is Status.KNOWN else UNEXPLAINED)


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


def worst_ulp(records: list[Record]) -> float | None:
    """Largest max-ULP error over the records' outputs; NaN (null) counts as infinitely bad."""
    values = [number(m.get("max_ulp")) for r in records for m in r.metrics or []]
    if not values:
        return None
    return max(math.inf if math.isnan(v) else v for v in values)


def effect(records: list[Record]) -> float | None:
    """How far off a failure is: the largest max relative error over the outputs that failed."""
    values = [number(m.get("max_rel")) for r in records for m in r.metrics or [] if not m.get("passed")]
    if not values:
        return None
    return max(math.inf if math.isnan(v) else v for v in values)


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
    records: list[Record] = field(default_factory=list)

    @property
    def status(self) -> Status:
        return min((r.status for r in self.records), key=status_rank)

    @property
    def statuses(self) -> list[Status]:
        return sorted({r.status for r in self.records}, key=status_rank)

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
    broken_records: list[tuple[str, Record]]  # (results file, record of a case file that did not validate)
    probe_names: list[str]
    probe_columns: list[Column]
    probes: dict[tuple[str, str], dict[str, Any]]  # (probe name, column key) -> probe entry

    def counts(self) -> Counter:
        return Counter(r.status for row in self.cases for c in row.cells.values() for r in c.records)

    @property
    def record_count(self) -> int:
        return sum(len(c.records) for row in self.cases for c in row.cells.values())


def load(paths: list[Path]) -> Report:
    columns: dict[str, Column] = {}
    cases: dict[str, CaseRow] = {}
    sources: list[Source] = []
    broken: list[tuple[str, Record]] = []
    probe_names: dict[str, None] = {}
    probe_columns: dict[str, Column] = {}
    probes: dict[tuple[str, str], dict[str, Any]] = {}
    seen: Counter = Counter()

    def column_for(adapter_id: str, path: Path, info: dict[str, Any], env: dict[str, Any]) -> Column:
        # a device other than the CPU names the column, so GPU and CPU runs of one adapter sit side by side
        device = str(info.get("device") or "cpu")  # e.g. "cuda", "gpu", "cpu (CPUExecutionProvider)"
        label = adapter_id if device.split()[0] == "cpu" else f"{adapter_id} @ {device}"
        seen[label] += 1
        key = label if seen[label] == 1 else f"{label} @ {Path(path).stem}"
        while key in columns:
            key += "'"
        column = Column(key, adapter_id, str(info.get("family", "")), str(path), info, env, len(columns))
        columns[key] = column
        return column

    for path in paths:
        try:  # one bad file must not lose the others
            data = read(path)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            sources.append(Source(str(path), error=f"{type(exc).__name__}: {exc}"))
            continue
        env = data.environment if isinstance(data.environment, dict) else {}
        sources.append(Source(str(path), env, data.format, len(data.records)))
        keys: dict[str, str] = {}
        adapters = env.get("adapters") if isinstance(env.get("adapters"), dict) else {}
        for adapter_id, info in adapters.items():
            keys[adapter_id] = column_for(adapter_id, path, info if isinstance(info, dict) else {}, env).key
        for record in data.records:
            if record.case is None or record.adapter is None:
                broken.append((str(path), record))
                continue
            adapter_id = str(record.adapter)
            if adapter_id not in keys:  # a record whose adapter the environment does not list
                keys[adapter_id] = column_for(adapter_id, path, {"family": record.family or ""}, env).key
            case_id = str(record.case)
            row = cases.get(case_id)
            if row is None:
                info = record.case_info if isinstance(record.case_info, dict) else {}
                row = cases[case_id] = CaseRow(case_id, anchor("case", case_id), info, str(record.file),
                                               record.line)
            row.cells.setdefault(keys[adapter_id], Cell()).records.append(record)
        for adapter_id, entries in (data.probes if isinstance(data.probes, dict) else {}).items():
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
