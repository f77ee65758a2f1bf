"""pytest plugin: YAML cases collected as items, one per case x adapter x check.

Case files are collected the way pytest's "non-python tests" example collects YAML
(`pytest_collect_file`), so `pytest cases/hand`, `pytest cases/x.yaml` and any printed item id run
again as given, and `--lf`/`--ff` work. `pytest conformance --framework=torch` collects the case
folders (`--cases`, default cases/) instead of the `conformance` package's Python files, plus the
semantic probes. Each item runs through `conformance.evaluate`; the results file is written once,
from the xdist controller (or the only process), through `conformance.results`. Loaded by
`-p conformance.plugin` in pyproject.toml.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import re
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _pytest.nodeid import NodeId  # pytest 9 ids keep "[params]" apart: --lf compares them

import adapters as registry
from adapters.base import DEVICE_VARIABLE, DEVICES, PROCESS_COSTS, Adapter
from conformance import DEFAULT_CASES, RESULTS_DIR, probes
from conformance import problem as problems
from conformance.evaluate import Outcome, default_rules, evaluate
from conformance.known import runtime
from conformance.loader import (
    CaseErrors,
    LoadedCase,
    case_files,
    duplicate_id_errors,
    is_case_file,
    load_file,
)
from conformance.results import Record, Results, Status, status_from_pytest, write_atomically
from conformance.yamlpos import CaseError

PACKAGE_DIR = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bnconform", "Batch Normalization conformance")
    group.addoption("--framework", default="all", metavar="NAMES",
                    help="families (tf, keras, torch, jax, onnx, all) or adapter ids, comma-separated")
    group.addoption("--cases", action="append", type=Path, metavar="DIR",
                    help="case folder or file (repeatable); replaces cases/ - name it too to keep it")
    group.addoption("--results", type=Path, metavar="PATH",
                    help="results JSON to write (default results/<framework>.json)")
    group.addoption("--device", default="cpu", choices=DEVICES,
                    help="where the torch and JAX families compute: cpu (default), cuda or gpu (where "
                         "the framework sees one); recorded in every record")
    group.addoption("--progress", type=Path, metavar="PATH",
                    help="keep a small JSON file of items done / total / failed up to date while running "
                         "(python -m conformance run reads it)")


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
    named_files: list[Path]  # case files named on the command line, wherever they are
    active: bool  # the run collects cases or probes: it writes a results file
    loaded: dict[str, Adapter | BaseException] = field(default_factory=dict)
    first_seen: dict[str, LoadedCase] = field(default_factory=dict)  # case id -> where, across files
    _documented: dict | None = None

    def selects(self, path: Path) -> bool:
        """A case file is collected under a selected case folder, or when named on the command line."""
        path = path.resolve()
        return path in self.named_files or any(path.is_relative_to(d) for d in self.case_dirs)

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
            gc.freeze()  # the framework's modules live to the end: see pytest_collection
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
        default_rules()  # a malformed adapters/known/*.yaml stops the run here, naming file and line
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    os.environ.update(registry.environment_for(ids))  # before any framework is imported
    os.environ[DEVICE_VARIABLE] = config.getoption("device")
    dirs = [p.resolve() for p in config.getoption("cases") or [DEFAULT_CASES]]
    named = [Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    files = [p for p in named if is_case_file(p)]
    active = bool(files) or any(PACKAGE_DIR.is_relative_to(p) or any(p.is_relative_to(d) for d in dirs)
                                for p in named)
    config.stash[STATE] = RunState(selection, ids, dirs, files, active)
    if active and not hasattr(config, "workerinput"):
        config.pluginmanager.register(ResultsRecorder(config), "bnconform-results")


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[STATE]
    if not state.active:
        return []
    lines = [f"bnconform: cases from {', '.join(_shown(d) for d in state.case_dirs)}"]
    for adapter_id in state.adapter_ids:
        try:
            _, versions = runtime(state.adapter(adapter_id))
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


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """A case file under a selected case folder, or named on the command line, as pytest's own
    non-python example collects YAML: `pytest cases/hand` and `pytest cases/x.yaml::id[...]` work."""
    state = parent.config.stash[STATE]
    if is_case_file(file_path) and state.selects(file_path):
        return CaseFile.collector(parent, file_path)
    return None


def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path.resolve() == PACKAGE_DIR:
        return CaseSuite.from_parent(parent, path=path)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session):
    """Collection makes objects that live to the end of the run (cases, items), as do the framework
    modules an adapter imports: the cycle collector is kept from rescanning them, off while they
    are made and then frozen out of its sight (its full collections cost about 1 s per 1,000
    cases, and more with torch or TensorFlow loaded)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class CaseSuite(pytest.Directory):
    """Stands for the `conformance` folder: collects the case folders instead of Python files."""

    def collect(self):
        state = self.config.stash[STATE]
        for path in case_files(state.case_dirs):
            yield CaseFile.collector(self, path)
        for family in sorted({registry.ADAPTERS[i].family for i in state.adapter_ids}):
            path = probes.SEMANTICS_DIR / f"{family}.yaml"
            yield ProbeFile.from_parent(self, path=path, name=f"adapters/semantics/{family}.yaml")


class CaseFile(pytest.File):
    """One YAML file: an item per case x adapter x check, or one failing item if it is invalid."""

    errors: list[CaseError]

    @classmethod
    def collector(cls, parent: pytest.Collector, path: Path) -> CaseFile:
        """Outside the rootdir the node id is the absolute path, so the printed ids run again and
        `--lf` finds the file; inside it, pytest's own relative path."""
        path = path.resolve()
        if path.is_relative_to(parent.config.rootpath):
            return cls.from_parent(parent, path=path)
        return cls.from_parent(parent, path=path, nodeid=NodeId(path=path.as_posix()))

    def collect(self):
        state = self.config.stash[STATE]
        cases, self.errors = load_file(self.path)
        self.errors += duplicate_id_errors(cases, state.first_seen)
        if self.errors:
            yield BrokenCaseFile.from_parent(self, name="invalid-case-file")
        for loaded in cases:
            if state.first_seen[loaded.case.id] is not loaded:
                continue
            for adapter_id in state.adapter_ids:
                for check in loaded.case.checks:
                    item = CaseItem.from_parent(self, name=f"{loaded.case.id}[{adapter_id}-{check}]",
                                                nodeid=self.id.child(loaded.case.id).with_params(
                                                    f"{adapter_id}-{check}"))
                    item.loaded, item.adapter_id, item.check = loaded, adapter_id, check
                    item.extra_keyword_matches.update(loaded.case.tags)
                    yield item


class ProbeFile(pytest.File):
    """The documented semantics of one family: one item per adapter x probe, run by measuring."""

    def collect(self):
        state = self.config.stash[STATE]
        family = self.path.stem
        for adapter_id in (i for i in state.adapter_ids if registry.ADAPTERS[i].family == family):
            for name in probes.PROBES:
                item = ProbeItem.from_parent(self, name=f"{name}[{adapter_id}]",
                                             nodeid=self.id.child(name).with_params(adapter_id))
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
        self.measured = record = {"adapter": self.adapter_id, "probe": self.probe}
        self.user_properties.append(("bnconform-probe", record))
        adapter = state.adapter(self.adapter_id)
        record.update(probes.measure(adapter, self.probe))
        if documented is not None:
            documented = probes.on_device(documented, adapter.device())
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
        record = getattr(self, "measured", {})
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
        self.record = Record(case=None, file=str(self.path), reason="\n".join(str(e) for e in errors))
        raise CaseErrors(errors)

    def repr_failure(self, excinfo, style=None) -> str:
        if isinstance(excinfo.value, CaseErrors):
            return "invalid case file:\n" + "\n".join(f"  {e}" for e in excinfo.value.errors)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, f"{self.path.name}: invalid case file"


class CaseItem(pytest.Item):
    loaded: LoadedCase
    adapter_id: str
    check: str
    record: Record | None = None
    verdict: Status | None = None  # what the harness decided; None if something raised first

    def runtest(self) -> None:
        case = self.loaded.case
        self.record = record = Record(
            case=case.id, file=str(self.path), line=self.loaded.line, adapter=self.adapter_id,
            family=registry.ADAPTERS[self.adapter_id].family, check=self.check,
            case_info=case_summary(self.loaded))
        adapter = self.config.stash[STATE].adapter(self.adapter_id)
        outcome = Outcome()
        started = time.perf_counter()
        try:
            evaluate(adapter, case, self.check, outcome)
        finally:
            outcome.fill(record)
            record.device = runtime(adapter)[0]  # asked once per adapter (known.runtime)
            record.duration_s = round(time.perf_counter() - started, 6)
        self.verdict = outcome.status
        if outcome.status == Status.NOT_EXPRESSIBLE:
            pytest.skip(f"not expressible: {outcome.reason}")
        if outcome.status == Status.KNOWN:
            pytest.xfail(f"known: {', '.join(outcome.explained_by)}: {outcome.reason}")
        if outcome.status == Status.FAIL:
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
    """The diagnosis first, then the error figures of every output."""
    lines = []
    if outcome.explained_by:
        lines.append(f"  explained by: {', '.join(outcome.explained_by)}")
    elif outcome.closest:
        lines.append(f"  unexplained; closest variant: {outcome.closest['variant']} "
                     f"(off by {outcome.closest['badness']:.3g}x its tolerance)")
    if outcome.conventions:
        lines.append(f"  declared conventions: {', '.join(outcome.conventions)}")
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
    """What each record of a case says about it: made once per case, not per adapter x check (the
    conditioning builds a problem; a case whose build raises would otherwise raise every time)."""
    return dict(loaded.case.memo(("summary",), lambda: _summary(loaded.case)))


def _summary(case: Any) -> dict[str, Any]:
    p = case.params
    return {
        "title": case.title,
        "tags": case.tags,
        "dtype": case.dtype,
        "shapes": [t.shape for t in case.tensors],
        "steps": case.steps if case.training is not None else None,
        "params": {"axis": p.axis, "momentum": p.momentum, "epsilon": p.epsilon,
                   "center": p.center, "scale": p.scale,
                   **({"param_dtype": p.param_dtype} if p.param_dtype is not None else {}),
                   **({"replicas": p.replicas.model_dump()} if p.replicas else {})},
        "expect_error": case.expect_error,
        "tolerance_override": case.tolerance.model_dump() if case.tolerance else None,
        "conditioning": _conditioning(case),
    }


def _conditioning(case: Any) -> float | None:
    """The input's worst channel |mean| / sqrt(var + eps), which drives cancellation errors (the
    report plots sum-of-squares divergences against it); None where the case has no such number."""
    check = case.checks[0] if case.checks else None
    try:
        value = problems.conditioning(case, check, problems.build(case, check)) if check else None
    except Exception:  # an out-of-range axis, an empty batch: nothing to plot
        return None
    return round(value, 6) if value is not None and math.isfinite(value) else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """The record's final status, decided where the item ran (xdist ships it to the controller)."""
    report = yield
    record = getattr(item, "record", None)
    if call.when != "call" or record is None:
        return report
    outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
    record.status = status_from_pytest(outcome, getattr(item, "verdict", None))
    if record.status == Status.ERROR and call.excinfo is not None and not isinstance(item, BrokenCaseFile):
        record.reason = f"{call.excinfo.typename}: {call.excinfo.value}"
    if record.status == Status.NOT_EXPRESSIBLE and isinstance(item, CaseItem):
        report.longrepr = (str(item.path), item.loaded.line_of(("id",)),
                           f"not expressible: {record.reason}")
    report.user_properties.append(("bnconform", record.to_json()))
    return report


# ---------------------------------------------------------------- results file


class ResultsRecorder:
    """Gathers the records on the controller and writes the results file once, atomically."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.results = Results(environment={})
        self.started = datetime.now(UTC)
        self.path: Path | None = None
        self.progress = Progress(config.getoption("progress"))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.progress.total = len(session.items)
        self.progress.write(force=True)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.progress.seen(report)
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == "bnconform":
                self.results.records.append(Record.from_json(value))
            elif name == "bnconform-probe":
                entry = {k: v for k, v in value.items() if k not in ("adapter", "probe")}
                self.results.probes.setdefault(value["adapter"], {})[value["probe"]] = entry

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.progress.write(force=True)
        state = self.config.stash[STATE]
        self.path = self.config.getoption("results") or RESULTS_DIR / (
            re.sub(r"[^A-Za-z0-9_.-]+", "_", state.selection) + ".json")
        self.results.environment = environment(state, self.started)
        write_atomically(Path(self.path), self.results)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.path is not None:
            counts = ", ".join(f"{n} {s}" for s, n in self.results.counts().items() if n)
            terminalreporter.write_line(f"bnconform: {len(self.results.records)} records ({counts}) "
                                        f"-> {self.path}")


@dataclass
class Progress:
    """Items done of total and failures so far, rewritten at most twice a second for whoever
    watches the run (`python -m conformance run` prints it per family)."""

    path: Path | None
    total: int = 0
    done: int = 0
    failed: int = 0
    written_at: float = 0.0

    def seen(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.done += 1
            self.failed += report.failed
            self.write()

    def write(self, force: bool = False) -> None:
        if self.path is None or (not force and time.monotonic() - self.written_at < 0.5):
            return
        self.written_at = time.monotonic()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"done": self.done, "total": self.total, "failed": self.failed}))
        tmp.replace(self.path)  # a reader sees the old file or the new one, never half of one


def environment(state: RunState, started: datetime) -> dict[str, Any]:
    adapters: dict[str, Any] = {}
    for adapter_id in state.adapter_ids:
        info: dict[str, Any] = {"family": registry.ADAPTERS[adapter_id].family}
        try:
            adapter = state.adapter(adapter_id)
            device, versions = runtime(adapter)
            info.update(versions=versions, device=device,
                        conventions={"variants": list(adapter.conventions.variants),
                                     "notes": list(adapter.conventions.notes)},
                        capabilities=capabilities_of(adapter), names=dict(adapter.names))
        except AdapterUnavailable as exc:
            info["load_error"] = str(exc)
        adapters[adapter_id] = info
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "selection": state.selection,
        "adapters": adapters,
        "case_dirs": [str(d) for d in state.case_dirs],
        "keras_backend": os.environ.get("KERAS_BACKEND"),
        "device": os.environ.get(DEVICE_VARIABLE, "cpu"),  # as asked; each adapter's own is above
        "python": platform.python_version(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "argv": sys.argv,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        # this process's largest resident set so far (kilobytes on Linux): what a family costs
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        # CPU seconds, which on a shared machine say more than wall time, and framework costs
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "costs": {name: round(value, 3) for name, value in sorted(PROCESS_COSTS.items())},
    }


def capabilities_of(adapter: Adapter) -> dict[str, Any]:
    c = adapter.capabilities
    return {"dtypes": sorted(c.dtypes), "checks": sorted(c.checks), "min_rank": c.min_rank,
            "max_rank": c.max_rank, "features": sorted(c.features), "why": c.why}
