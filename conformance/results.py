"""The results file: one record per case x adapter x check, the statuses, the one atomic writer.

Standard library only: the pytest plugin, `python -m conformance run`, the probes, `reports` and the
tests all read and write results through this module, and `reports` must run where no framework
(not even NumPy) is installed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

FORMAT = "bnconform-results/2"
READABLE_FORMATS = ("bnconform-results/1", FORMAT)  # /1 wrote known failures as "xfail"


class Status(StrEnum):
    """Every record ends in exactly one of these."""

    PASS = "pass"  # every expected output within tolerance
    FAIL = "fail"  # unexplained, or not the way a known-divergence rule says
    KNOWN = "known"  # a known-divergence rule's variant explains the failure (pytest: xfail)
    NOT_EXPRESSIBLE = "not-expressible"  # the API cannot state the case (pytest: skip)
    ERROR = "error"  # the adapter, its framework or the harness broke; or the case file is invalid

    @classmethod
    def parse(cls, text: str) -> Status:
        """A status from any readable results file; what a newer harness wrote ranks as an error."""
        legacy = {"xfail": cls.KNOWN, "xpass": cls.FAIL}
        try:
            return legacy.get(text) or cls(text)
        except ValueError:
            return cls.ERROR


# worst first: a matrix cell shows its checks' worst status
SEVERITY = (Status.ERROR, Status.FAIL, Status.KNOWN, Status.NOT_EXPRESSIBLE, Status.PASS)
NEEDS_ATTENTION = frozenset({Status.ERROR, Status.FAIL})


def pytest_outcome(status: Status) -> str:
    """How pytest shows a record: the one mapping between the two vocabularies."""
    return {Status.PASS: "passed", Status.FAIL: "failed", Status.ERROR: "failed",
            Status.KNOWN: "xfailed", Status.NOT_EXPRESSIBLE: "skipped"}[status]


def status_from_pytest(outcome: str, verdict: Status | None) -> Status:
    """The record's status once pytest has run the item. `verdict` is what the harness decided
    (None when the item raised before deciding): a raise that is not the harness's own verdict is
    an error, whatever pytest calls it."""
    if verdict is not None and pytest_outcome(verdict) == outcome:
        return verdict
    return Status.ERROR


@dataclass
class Record:
    """One case x adapter x check. Metrics are plain dicts (see `conformance.compare.Metric`)."""

    case: str | None  # None for an invalid case file
    file: str
    adapter: str | None = None
    check: str | None = None
    status: Status = Status.ERROR
    line: int = 0
    family: str | None = None
    case_info: dict[str, Any] = field(default_factory=dict)
    reason: str = ""  # not expressible: why; error: what raised; known: the rule's reason
    metrics: list[dict[str, Any]] = field(default_factory=list)
    translations: list[str] = field(default_factory=list)
    tolerance_rule: str = ""
    conventions: list[str] = field(default_factory=list)  # variant names the adapter declared here
    explained_by: list[str] = field(default_factory=list)  # variants the measurement matches
    closest: dict[str, Any] | None = None  # unexplained: {"variant", "badness"} nearest to a match
    rule: dict[str, Any] | None = None  # known: the rule that matched
    duration_s: float = 0.0
    device: str | None = None  # where the adapter ran the check (cpu, cuda, ...): runs merge across hosts

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in RECORD_FIELDS}
        out["status"] = str(self.status)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        known = {f.name for f in RECORD_FIELDS}
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.status = Status.parse(str(data.get("status", "error")))
        if isinstance(record.conventions, dict):  # format /1 declared estimators, not variants
            record.conventions = [f"{what}-variance-unbiased" for what in ("moving", "batch")
                                  if record.conventions.get(f"{what}_variance_estimator") == "unbiased"]
        legacy = data.get("known_failure")  # format /1: a per-case xfail entry
        if record.rule is None and isinstance(legacy, dict):
            record.rule = {"adapters": [legacy.get("adapter")], "reason": legacy.get("reason", ""),
                           "link": legacy.get("link", ""), "source": "adapters/xfails (format /1)"}
        return record


RECORD_FIELDS = fields(Record)


@dataclass
class Results:
    """What one pytest process (or one fuzz run) writes."""

    environment: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)  # adapter -> probe -> measurement
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "environment": self.environment,
                "records": [r.to_json() for r in self.records], "probes": self.probes}

    def counts(self) -> dict[Status, int]:
        out = dict.fromkeys(Status, 0)
        for r in self.records:
            out[r.status] += 1
        return out


def read(path: Path) -> Results:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: not a bnconform results file (format {data.get('format')!r})")
    return Results(data.get("environment") or {}, [Record.from_json(r) for r in data.get("records") or []],
                   data.get("probes") or {}, data["format"])


def merge(parts: list[Results]) -> Results:
    """The shards of one run (pytest-split's --splits/--group, one results file each) as one results
    file: records in order, probes united, the environment of the first part with every part's
    adapters, the earliest start, the latest finish and what was merged."""
    if not parts:
        raise ValueError("nothing to merge")
    environment = dict(parts[0].environment)
    environment["adapters"] = {k: v for p in parts for k, v in (p.environment.get("adapters") or {}).items()}
    times = [p.environment for p in parts]
    environment["started"] = min(str(e.get("started", "")) for e in times)
    environment["finished"] = max(str(e.get("finished", "")) for e in times)
    environment["merged_from"] = [{"argv": e.get("argv"), "hostname": e.get("hostname")} for e in times]
    probes: dict[str, dict[str, Any]] = {}
    for part in parts:
        for adapter, measured in part.probes.items():
            probes.setdefault(adapter, {}).update(measured)
    return Results(environment, [r for p in parts for r in p.records], probes)


def json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf", "-inf"): strict JSON has no NaN."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_atomically(path: Path, payload: Any) -> None:
    """JSON to a temporary file beside `path`, then rename: a reader never sees half a file."""
    if isinstance(payload, Results):
        payload = payload.to_json()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; results are for sharing
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # one write: json.dump would make one call per token (~300,000 for 1,500 records)
            f.write(json.dumps(json_safe(payload), indent=1, allow_nan=False, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

