"""pytest plugin: YAML cases collected as items, one per case x adapter x check.

`pytest conformance --framework=torch` collects the case folders (not the `conformance` package's
Python files), runs each item through `conformance.runner`, and writes one results JSON file from
the xdist controller (or the only process). Loaded by `-p conformance.plugin` in pyproject.toml.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import adapters as registry
from adapters.base import Adapter
from conformance import cases as case_loader
from conformance import probes, xfails
from conformance.cases import CaseError, LoadedCase
from conformance.runner import Outcome, evaluate

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parent
DEFAULT_CASES = ROOT / "cases"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bnconform", "Batch Normalization conformance")
    group.addoption("--framework", default="all", metavar="NAMES",
                    help="families (tf, keras, torch, jax, onnx, all) or adapter ids, comma-separated")
    group.addoption("--cases", action="append", type=Path, metavar="DIR",
                    help="case folder or file (repeatable); replaces cases/ - name it too to keep it")
    group.addoption("--results", type=Path, metavar="PATH",
                    help="results JSON to write (default results/<framework>.json)")


class AdapterUnavailable(Exception):
    """The adapter's framework could not be imported or the adapter could not be built."""


class CaseMismatch(Exception):
    def __init__(self, outcome: Outcome):
        self.outcome = outcome
        super().__init__(outcome.reason or "outputs differ from the expected values")


@dataclass
class RunState:
    """What one pytest process knows about its run."""

    selection: str
    adapter_ids: list[str]
    case_dirs: list[Path]
    known_failures: dict
    active: bool  # the conformance suite is among the collected paths
    loaded: dict[str, Adapter | BaseException] = field(default_factory=dict)
    _documented: dict | None = None

    def documented(self) -> dict:
        if self._documented is None:
            self._documented = probes.documented()
        return self._documented

    def adapter(self, adapter_id: str) -> Adapter:
        if adapter_id not in self.loaded:
            try:
                self.loaded[adapter_id] = registry.load(adapter_id)
            except Exception as exc:
                self.loaded[adapter_id] = exc
        found = self.loaded[adapter_id]
        if isinstance(found, BaseException):
            raise AdapterUnavailable(
                f"adapter {adapter_id} could not be loaded: {type(found).__name__}: {found}")
        return found


STATE = pytest.StashKey[RunState]()


def pytest_configure(config: pytest.Config) -> None:
    selection = config.getoption("framework")
    try:
        ids = registry.resolve(selection)
        known = xfails.load()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    os.environ.update(registry.environment_for(ids))  # before any framework is imported
    active = any(PACKAGE_DIR.is_relative_to(Path(str(arg).split("::")[0]).resolve())
                 for arg in config.args)
    dirs = [p.resolve() for p in config.getoption("cases") or [DEFAULT_CASES]]
    config.stash[STATE] = RunState(selection, ids, dirs, known, active)
    config.addinivalue_line("markers", "xfail: known framework failure from adapters/xfails/<family>.yaml")
    if active and not hasattr(config, "workerinput"):
        config.pluginmanager.register(ResultsRecorder(config), "bnconform-results")


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[STATE]
    if not state.active:
        return []
    lines = [f"bnconform: cases from {', '.join(_shown(d) for d in state.case_dirs)}"]
    for adapter_id in state.adapter_ids:
        try:
            versions = state.adapter(adapter_id).versions()
            shown = ", ".join(f"{k} {v}" for k, v in versions.items())
        except AdapterUnavailable as exc:
            shown = f"UNAVAILABLE ({exc})"
        lines.append(f"bnconform: {adapter_id}: {shown}")
    return lines


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- collection


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path.resolve() == PACKAGE_DIR:
        return CaseSuite.from_parent(parent, path=path)
    return None


class CaseSuite(pytest.Directory):
    """Stands for the `conformance` folder: collects the case folders instead of Python files."""

    def collect(self):
        state = self.config.stash[STATE]
        loaded, errors = case_loader.load_folders(state.case_dirs)
        by_file: dict[Path, tuple[list[LoadedCase], list[CaseError]]] = {}
        for case in loaded:
            by_file.setdefault(case.path, ([], []))[0].append(case)
        for error in errors:
            by_file.setdefault(error.path, ([], []))[1].append(error)
        for path in sorted(by_file):
            try:
                name = str(path.relative_to(self.config.rootpath))
            except ValueError:
                name = str(path)
            node = CaseFile.from_parent(self, path=path, name=name)
            node.cases, node.errors = by_file[path]
            yield node
        families = sorted({registry.ADAPTERS[i].family for i in state.adapter_ids})
        for family in families:
            path = probes.SEMANTICS_DIR / f"{family}.yaml"
            yield ProbeFile.from_parent(self, path=path, name=f"adapters/semantics/{family}.yaml")


class CaseFile(pytest.File):
    cases: list[LoadedCase]
    errors: list[CaseError]

    def collect(self):
        state = self.config.stash[STATE]
        if self.errors:
            yield BrokenCaseFile.from_parent(self, name="invalid-case-file")
        for loaded in self.cases:
            case = loaded.case
            for adapter_id in state.adapter_ids:
                for check in case.checks:
                    item = CaseItem.from_parent(self, name=f"{case.id}[{adapter_id}-{check}]")
                    item.loaded, item.adapter_id, item.check = loaded, adapter_id, check
                    item.extra_keyword_matches.update(case.tags)
                    known = state.known_failures.get((adapter_id, case.id, check))
                    if known is not None:
                        item.add_marker(pytest.mark.xfail(
                            strict=True, raises=CaseMismatch, reason=f"{known.reason} ({known.link})"))
                        item.known_failure = known.model_dump()
                    yield item


class ProbeFile(pytest.File):
    """The documented semantics of one family: one item per adapter x probe, run by measuring."""

    def collect(self):
        state = self.config.stash[STATE]
        family = self.path.stem
        for adapter_id in (i for i in state.adapter_ids if registry.ADAPTERS[i].family == family):
            for name in probes.PROBES:
                item = ProbeItem.from_parent(self, name=f"{name}[{adapter_id}]")
                item.adapter_id, item.probe = adapter_id, name
                yield item


class ProbeMismatch(Exception):
    pass


class ProbeItem(pytest.Item):
    adapter_id: str
    probe: str

    def runtest(self) -> None:
        state = self.config.stash[STATE]
        documented = state.documented().get(self.adapter_id, {}).get(self.probe)
        self.record = record = {"adapter": self.adapter_id, "probe": self.probe}
        self.user_properties.append(("bnconform-probe", record))
        record.update(probes.measure(state.adapter(self.adapter_id), self.probe))
        if documented is None:
            record.update(documented=None, source="", agrees=None)
            pytest.skip(f"no documented value in {self.path.name} for {self.adapter_id}; "
                        f"measured {record['value']!r}")
        bounds = {k: documented[k] for k in ("min", "max") if k in documented}
        record.update(documented=documented.get("value", bounds or None),
                      source=documented.get("source", ""),
                      agrees=probes.agrees(record["value"], documented))
        if not record["agrees"]:
            raise ProbeMismatch()

    def repr_failure(self, excinfo, style=None) -> str:
        record = getattr(self, "record", {})
        if isinstance(excinfo.value, ProbeMismatch):
            return (f"probe {self.probe} on {self.adapter_id}: measured {record['value']!r}, documented "
                    f"{record['documented']!r}\n  how: {record['detail']}\n  source: {record['source']}")
        if isinstance(excinfo.value, AdapterUnavailable):
            return f"probe {self.probe}: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, self.name


class BrokenCaseFile(pytest.Item):
    """A case file that does not validate: fails with its path:line errors; the rest still runs."""

    def runtest(self) -> None:
        errors = self.parent.errors
        self.user_properties.append(("bnconform", {
            "case": None, "file": str(self.path), "adapter": None, "check": None,
            "status": "error", "reason": "\n".join(str(e) for e in errors),
        }))
        raise case_loader.CaseErrors(errors)

    def repr_failure(self, excinfo, style=None) -> str:
        if isinstance(excinfo.value, case_loader.CaseErrors):
            return "invalid case file:\n" + "\n".join(f"  {e}" for e in excinfo.value.errors)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, f"{self.path.name}: invalid case file"


class CaseItem(pytest.Item):
    loaded: LoadedCase
    adapter_id: str
    check: str
    known_failure: dict | None = None
    record: dict[str, Any] | None = None

    def runtest(self) -> None:
        case = self.loaded.case
        self.record = record = {
            "case": case.id,
            "file": str(self.path),
            "line": self.loaded.line,
            "adapter": self.adapter_id,
            "family": registry.ADAPTERS[self.adapter_id].family,
            "check": self.check,
            "case_info": case_summary(self.loaded),
            "known_failure": self.known_failure,
        }
        self.user_properties.append(("bnconform", record))
        adapter = self.config.stash[STATE].adapter(self.adapter_id)
        outcome = Outcome("error")
        started = time.perf_counter()
        try:
            evaluate(adapter, case, self.check, outcome)
        finally:
            record.update(outcome.as_dict())
            record["duration_s"] = round(time.perf_counter() - started, 6)
        if outcome.status == "not-expressible":
            pytest.skip(f"not expressible: {outcome.reason}")
        if outcome.status == "fail":
            raise CaseMismatch(outcome)

    def repr_failure(self, excinfo, style=None) -> str:
        case = self.loaded.case
        head = (f"case {case.id} ({self.path}:{self.loaded.line}) on {self.adapter_id}, {self.check}"
                f"\n  {case.title}")
        error = excinfo.value
        if isinstance(error, CaseMismatch):
            return head + "\n" + format_outcome(error.outcome)
        if isinstance(error, AdapterUnavailable):
            return f"{head}\n  {error}"
        # an exception from the adapter or the framework: its frames only, never the harness's
        frames = [f for f in traceback.extract_tb(excinfo.tb)
                  if not Path(f.filename).resolve().is_relative_to(PACKAGE_DIR)
                  and "_pytest" not in f.filename and "pluggy" not in f.filename]
        shown = "".join(traceback.format_list(frames[-10:]))
        return f"{head}\n  the adapter raised:\n{shown}{type(error).__name__}: {error}"

    def reportinfo(self):
        return self.path, self.loaded.line - 1, self.name


def format_outcome(outcome: Outcome) -> str:
    lines = []
    if outcome.reason:
        lines.append(f"  {outcome.reason}")
    if outcome.tolerance is not None:
        lines.append(f"  tolerance: rtol {outcome.tolerance.rtol:.3g}, atol "
                     f"{outcome.tolerance.atol:.3g} ({outcome.tolerance.rule})")
    for m in outcome.metrics:
        state = "ok  " if m.passed else "FAIL"
        derived = " (expected derived from the reference)" if m.derived else ""
        lines.append(
            f"  {state} {m.name:<26} max abs {m.max_abs:.3g}  max rel {m.max_rel:.3g}  "
            f"max ulp {m.max_ulp:.3g}{derived}")
        if not m.passed:
            lines.append(f"       worst at {m.worst_index}: expected {m.worst_expected!r}, "
                         f"got {m.worst_got!r}")
        if m.note:
            lines.append(f"       {m.note}")
    return "\n".join(lines)


def case_summary(loaded: LoadedCase) -> dict[str, Any]:
    case = loaded.case
    p = case.params
    return {
        "title": case.title,
        "tags": case.tags,
        "dtype": case.dtype,
        "shapes": [t.shape for t in case.tensors],
        "steps": case.steps if case.training is not None else None,
        "params": {"axis": p.axis, "momentum": p.momentum, "epsilon": p.epsilon,
                   "center": p.center, "scale": p.scale},
        "expect_error": case.expect_error,
        "tolerance_override": case.tolerance.model_dump() if case.tolerance else None,
    }


def conventions_of(adapter: Adapter) -> dict[str, Any]:
    c = adapter.conventions
    return {"moving_variance_estimator": c.moving_variance_estimator,
            "batch_variance_estimator": c.batch_variance_estimator, "notes": c.notes}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Decide each record's final status where the item ran (xdist ships it to the controller)."""
    report = yield
    record = getattr(item, "record", None)
    if call.when != "call" or record is None:
        return report
    if report.skipped and record.get("status") == "not-expressible":
        reason = f"not expressible: {record['reason']}"
        report.longrepr = (str(item.path), item.loaded.line_of(("id",)), reason)
    elif hasattr(report, "wasxfail"):
        record["status"] = "xfail" if report.skipped else "xpass"
        record["reason"] = record.get("reason") or report.wasxfail
    elif report.failed and call.excinfo is None:
        record["status"] = "fail"  # a strict xfail that passed: the framework was fixed
        record["reason"] = f"XPASS(strict): {report.longrepr}; remove its adapters/xfails/<family>.yaml entry"
    elif report.failed and not call.excinfo.errisinstance(CaseMismatch):
        record["status"] = "error"
        record["reason"] = f"{call.excinfo.typename}: {call.excinfo.value}"
    return report


# ---------------------------------------------------------------- results file


class ResultsRecorder:
    """Gathers the records on the controller and writes the results file once, atomically."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.records: list[dict[str, Any]] = []
        self.probes: dict[str, dict[str, Any]] = {}
        self.started = datetime.now(UTC)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == "bnconform":
                self.records.append(value)
            elif name == "bnconform-probe":
                entry = {k: v for k, v in value.items() if k not in ("adapter", "probe")}
                self.probes.setdefault(value["adapter"], {})[value["probe"]] = entry

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        state = self.config.stash[STATE]
        path = self.config.getoption("results") or ROOT / "results" / (
            re.sub(r"[^A-Za-z0-9_.-]+", "_", state.selection) + ".json")
        payload = {
            "format": "bnconform-results/1",
            "environment": environment(state, self.started),
            "records": self.records,
            "probes": self.probes,
        }
        write_atomically(Path(path), payload)
        self.config.stash[RESULTS_PATH] = Path(path)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        path = self.config.stash.get(RESULTS_PATH, None)
        if path is not None:
            counts: dict[str, int] = {}
            for r in self.records:
                counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
            shown = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            terminalreporter.write_line(f"bnconform: {len(self.records)} records ({shown}) -> {path}")


RESULTS_PATH = pytest.StashKey[Path]()


def environment(state: RunState, started: datetime) -> dict[str, Any]:
    adapters: dict[str, Any] = {}
    for adapter_id in state.adapter_ids:
        info: dict[str, Any] = {"family": registry.ADAPTERS[adapter_id].family}
        try:
            adapter = state.adapter(adapter_id)
            info.update(versions=adapter.versions(), conventions=conventions_of(adapter),
                        device=adapter.device())
        except AdapterUnavailable as exc:
            info["load_error"] = str(exc)
        adapters[adapter_id] = info
    return {
        "selection": state.selection,
        "adapters": adapters,
        "case_dirs": [str(d) for d in state.case_dirs],
        "keras_backend": os.environ.get("KERAS_BACKEND"),
        "python": platform.python_version(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "argv": sys.argv,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def json_safe(value: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf", "-inf"): strict JSON has no NaN."""
    if (isinstance(value, float) and value != value) or value in (float("inf"), float("-inf")):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_atomically(path: Path, payload: Any) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; results are for sharing
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(json_safe(payload), f, indent=1, allow_nan=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
