"""Results files in, one merged view out: columns (adapter runs), cases, cells.

Reads only the JSON the pytest plugin writes; never imports `adapters` or a framework, so a report
can be made from results produced on other machines.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUS_ORDER = ["error", "fail", "xpass", "xfail", "not-expressible", "pass", "skipped"]


@dataclass
class Column:
    """One adapter as run in one results file (the same adapter from two machines = two columns)."""

    key: str
    adapter: str
    family: str
    source: str
    info: dict[str, Any]
    environment: dict[str, Any]


@dataclass
class Cell:
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        statuses = [r.get("status", "error") for r in self.records]
        return min(statuses, key=STATUS_ORDER.index) if statuses else "absent"

    @property
    def worst_ulp(self) -> float | None:
        values = [m.get("max_ulp") for r in self.records for m in r.get("metrics", [])]
        numbers = [_number(v) for v in values if v is not None]
        return max(numbers) if numbers else None


@dataclass
class CaseRow:
    id: str
    info: dict[str, Any]
    file: str
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class Report:
    columns: list[Column]
    cases: list[CaseRow]
    environments: list[dict[str, Any]]
    broken_files: list[dict[str, Any]]
    sources: list[str]

    def counts(self) -> Counter:
        return Counter(r.get("status") for row in self.cases for c in row.cells.values() for r in c.records)


def _number(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return {"inf": math.inf, "-inf": -math.inf}.get(str(value), math.nan)


def load(paths: list[Path]) -> Report:
    columns: dict[str, Column] = {}
    cases: dict[str, CaseRow] = {}
    environments: list[dict[str, Any]] = []
    broken: list[dict[str, Any]] = []
    seen_adapters: Counter = Counter()
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        env = data.get("environment", {})
        environments.append({"source": str(path), **env})
        keys: dict[str, str] = {}
        for adapter_id, info in env.get("adapters", {}).items():
            seen_adapters[adapter_id] += 1
            key = adapter_id if seen_adapters[adapter_id] == 1 else f"{adapter_id} ({Path(path).stem})"
            keys[adapter_id] = key
            columns[key] = Column(key, adapter_id, info.get("family", ""), str(path), info, env)
        for record in data.get("records", []):
            if record.get("case") is None:
                broken.append(record)
                continue
            key = keys.get(record["adapter"], record["adapter"])
            row = cases.setdefault(record["case"], CaseRow(record["case"], record.get("case_info", {}),
                                                           record.get("file", "")))
            row.cells.setdefault(key, Cell()).records.append(record)
    ordered = sorted(cases.values(), key=lambda r: (r.file, r.id))
    return Report(list(columns.values()), ordered, environments, broken, [str(p) for p in paths])
