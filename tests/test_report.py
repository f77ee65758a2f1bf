"""The report generator: records in the harness's format, content, escaping, self-containment, diff."""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conformance.results import FORMAT, RECORD_FIELDS, Record, Status
from reports import synthetic
from reports.__main__ import main
from reports.diff import diff_runs
from reports.model import load
from reports.render import divergences, render

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ["torch", "torch-functional", "flax-linen", "onnxruntime"]
# the keys conformance.plugin.case_summary puts in a record's case_info
CASE_INFO_KEYS = {"title", "tags", "dtype", "shapes", "steps", "params", "expect_error", "tolerance_override",
                  "conditioning"}


class Tables(HTMLParser):
    """Rows and header cells of each table with an id; every src/href; the scripts; element ids."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, int]] = {}
        self.current: list[str | None] = []
        self.section = ""
        self.urls: list[tuple[str, str, str]] = []
        self.ids: list[str] = []
        self.scripts = 0
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        for name in ("src", "href", "srcset", "action", "data", "poster", "xlink:href"):
            if name in a:
                self.urls.append((tag, name, str(a[name])))
        if tag == "script":
            self.scripts += 1
        if tag == "table":
            self.current.append(a.get("id"))
            if a.get("id"):
                self.tables[str(a["id"])] = {"head_cells": 0, "body_rows": 0}
        table = self.current[-1] if self.current else None
        if tag in ("thead", "tbody"):
            self.section = tag
        if table and self.section == "thead" and tag == "th":
            self.tables[table]["head_cells"] += 1
        if table and self.section == "tbody" and tag == "tr":
            self.tables[table]["body_rows"] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self.current:
            self.current.pop()
        if tag in ("thead", "tbody"):
            self.section = ""


def parse(text: str) -> Tables:
    parser = Tables()
    parser.feed(text)
    return parser


def data_of(text: str) -> dict:
    """The JSON the page's script draws the matrix and the per-case detail from."""
    block = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S).group(1)
    assert "<" not in block and ">" not in block  # escaped as \u003c / \u003e: nothing can close the element
    return json.loads(block)


def strings_of(data: dict) -> set[str]:
    return set(data["strings"])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("results")
    return {
        "a": synthetic.write(folder / "a.json", synthetic.results(200, ADAPTERS, seed=3, hostile=True)),
        # the same adapters again, from another machine, without probes
        "b": synthetic.write(folder / "b.json", synthetic.results(60, ADAPTERS[:2], seed=4, with_probes=False,
                                                                  hostname="gpu-host")),
    }


@pytest.fixture(scope="module")
def page(files: dict[str, Path]) -> str:
    return render(load([files["a"], files["b"]]))


def test_synthetic_records_have_the_harness_format() -> None:
    from conformance.compare import Metric

    payload = synthetic.results(400, ADAPTERS, seed=1)
    assert payload["format"] == FORMAT
    metric_keys = {f.name for f in dataclasses.fields(Metric)}
    for record in payload["records"]:
        assert set(record) == {f.name for f in RECORD_FIELDS}
        assert set(record["case_info"]) == CASE_INFO_KEYS
        for metric in record["metrics"]:
            assert set(metric) == metric_keys
    records = [Record.from_json(r) for r in payload["records"]]
    assert {r.status for r in records} == set(Status)
    known = [r for r in records if r.status is Status.KNOWN]
    assert known and all(r.rule and r.rule["explained_by"] in r.explained_by for r in known)
    failing = [r for r in records if r.status is Status.FAIL]
    assert any(r.explained_by and not r.closest for r in failing)  # a failure no rule expected
    assert any(not r.explained_by and r.closest for r in failing)  # unexplained, with the nearest variant
    for env in payload["environment"]["adapters"].values():
        assert set(env["conventions"]) == {"variants", "notes"}
        assert set(env["capabilities"]) == {"dtypes", "checks", "min_rank", "max_rank", "features", "why"}
    json.dumps(payload, allow_nan=False)  # strict JSON, as write_atomically writes it


def test_matrix_and_semantic_table_shapes(files: dict[str, Path], page: str) -> None:
    report = load([files["a"], files["b"]])
    assert [c.key for c in report.columns] == [*ADAPTERS, "torch @ b", "torch-functional @ b"]
    tables = parse(page).tables
    data = data_of(page)
    assert data["columns"] == [c.key for c in report.columns]
    assert sorted(c[0] for c in data["cases"]) == sorted(row.id for row in report.cases)
    assert all(len(c[8]) == len(report.columns) for c in data["cases"])
    assert sum(len(c[9]) for c in data["cases"]) == report.record_count
    probes = synthetic.probes(ADAPTERS, hostile=True)
    names = {n for entries in probes.values() for n in entries}
    assert tables["semantic-table"] == {"head_cells": 1 + len(ADAPTERS), "body_rows": len(names)}
    # disagreements are marked: tf-layers-like updates flag is absent here, the estimator one is not
    disagreeing = sum(1 for e in probes.values() for p in e.values() if p["agrees"] is False)
    assert page.count('class="probe disagree"') == disagreeing


def test_every_internal_link_has_a_target_and_ids_are_unique(page: str) -> None:
    parsed = parse(page)
    assert len(parsed.ids) == len(set(parsed.ids))
    targets = {url[1:] for tag, name, url in parsed.urls if name == "href" and url.startswith("#")}
    filters = {t for t in targets if t.startswith("filter:")}
    cases = {c[1] for c in data_of(page)["cases"]}  # the script draws a case's detail on demand
    assert filters and targets - filters and targets - filters <= set(parsed.ids) | cases | {""}
    assert any(t.startswith("recipe-") for t in targets) and any(t.startswith("case-") for t in targets)


def test_self_contained(page: str) -> None:
    parsed = parse(page)
    assert parsed.scripts == 2  # the page's script, and the JSON it reads (not executable)
    assert len(re.findall(r"<script>", page)) == 1 and page.count('<script type="application/json"') == 1
    assert not {"link", "img", "iframe", "object", "embed", "audio", "video", "source"} & set(parsed.tags)
    for tag, name, url in parsed.urls:
        assert (tag, name) == ("a", "href"), (tag, name, url)
        assert url.startswith(("#", "https://", "http://")), url
    assert "url(" not in page and "@import" not in page
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1))
    assert "default-src 'none'" in csp
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp


def test_hostile_strings_are_text(page: str) -> None:
    assert synthetic.HOSTILE not in page and synthetic.HOSTILE_IMG not in page
    assert "&lt;script&gt;document.documentElement" in page
    assert "&lt;img src=x onerror=" in page
    assert "javascript:alert(1)" in page and 'href="javascript' not in page  # a source shown as text only
    # data-f attributes are single-quoted JSON with <, >, & and ' escaped by tojson
    for attr in re.findall(r"data-f='([^']*)'", page):
        json.loads(attr.replace("&#39;", "'"))


def test_case_detail_has_parameters_and_figures(files: dict[str, Path], page: str) -> None:
    """Per-case detail is data the script draws on demand: every failing output's figures, the
    diagnosis, the rule, the parameters; a passing record keeps its worst ULP error."""
    report = load([files["a"]])
    record = next(r for row in report.cases for c in row.cells.values() for r in c.records
                  if r.status is Status.FAIL and r.metrics and not r.case.startswith("xss"))
    data = data_of(page)
    strings = data["strings"]
    case = next(c for c in data["cases"] if c[0] == record.case)
    worst = max(record.metrics, key=lambda m: synthetic_ulp(m["max_ulp"]))
    shown = [m for r in case[9] if isinstance(r[11], list) for m in r[11]]
    assert any(strings[m[7]].startswith(f"{worst['worst_index']}: ") for m in shown)
    assert "momentum=" in strings[case[6]]
    texts = strings_of(data)
    assert any(t.startswith("unexplained; closest variant: ") for t in texts)
    assert any(t.startswith("explained by: ") for t in texts)
    assert any(t.startswith("https://github.com/example/") for t in texts)  # a rule's link
    passing = [r for c in data["cases"] for r in c[9] if data["statuses"][r[2]] == "pass"]
    assert passing and all(not isinstance(r[11], list) for r in passing)


def test_adapter_section_shows_variants_and_capabilities(page: str) -> None:
    assert "Declared conventions: <code>moving-variance-unbiased</code>" in page
    assert "rank 2 – 5" in page and "features momentum-null" in page
    assert "<td>multi-axis</td><td>torch normalizes over one channel axis</td>" in page


def synthetic_ulp(value: object) -> float:
    return float("inf") if value == "inf" else float(value)  # type: ignore[arg-type]


def test_no_probes_no_semantic_table(files: dict[str, Path]) -> None:
    text = render(load([files["b"]]))
    assert 'id="semantic-table"' not in text and "carry no <code>probes</code> key" in text


def test_real_results_files_render(tmp_path: Path) -> None:
    """A results file from a real (small) run on torch, with its probes."""
    results = tmp_path / "real.json"
    subprocess.run([sys.executable, "-m", "pytest", "conformance", "-q", "-p", "no:cacheprovider",
                    "--framework=torch-functional", "--cases", str(ROOT / "cases" / "hand"),
                    f"--results={results}"], cwd=ROOT, capture_output=True, timeout=600, check=True)
    report = load([results])
    assert report.cases and len(report.columns) == 1
    # each case says how ill-conditioned its input is (the plots' x for sum-of-squares groups)
    assert all(isinstance(row.info.get("conditioning"), float) for row in report.cases)
    assert report.columns[0].info["names"]["moving_variance"] == "running_var"  # declared by the adapter
    text = render(report)
    assert len(data_of(text)["cases"]) == len(report.cases)
    assert 'id="porting"' in text


def test_cli_unreadable_and_missing_files(files: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    out = tmp_path / "r.html"
    assert main([str(files["a"]), str(bad), "-o", str(out)]) == 1
    assert "could not be read" in out.read_text(encoding="utf-8")
    assert "could not read" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.json"), "-o", str(out)]) == 2
    with pytest.raises(SystemExit):
        main(["--compare", str(files["a"]), "-o", str(out)])


def test_compare_runs(files: dict[str, Path], tmp_path: Path) -> None:
    old = json.loads(files["a"].read_text(encoding="utf-8"))
    new = copy.deepcopy(old)
    records = new["records"]
    passing = [r for r in records if r["status"] == "pass" and r["metrics"]]
    regressed, grew = passing[0], passing[1]
    fixed = next(r for r in records if r["status"] == "fail")
    regressed["status"] = "fail"
    grew["metrics"][0]["max_ulp"] = synthetic_ulp(grew["metrics"][0]["max_ulp"]) * 10 + 5
    fixed["status"] = "pass"
    removed = records.pop(records.index(next(r for r in records if r["status"] == "not-expressible")))
    new["environment"]["adapters"]["torch"]["versions"]["torch"] = "2.14.0+cpu"
    new["probes"]["torch"]["default_momentum"]["value"] = 0.8
    old_path, new_path = tmp_path / "old.json", tmp_path / "new.json"
    synthetic.write(old_path, old)
    synthetic.write(new_path, new)
    diff = diff_runs([old_path], [new_path])
    found = {(c.case, c.adapter, c.check): c.kind for c in diff.changes}
    key = lambda r: (r["case"], r["adapter"], r["check"])  # noqa: E731
    assert found == {key(regressed): "regressed", key(grew): "error-up", key(fixed): "fixed",
                     key(removed): "removed"}
    assert [v["adapter"] for v in diff.versions if v["changed"]] == ["torch"]
    assert [(p["probe"], p["adapter"]) for p in diff.probes] == [("default_momentum", "torch")]
    out = tmp_path / "diff.html"
    assert main(["--compare", str(old_path), "--against", str(new_path), "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert parse(text).tables["changes-table"]["body_rows"] == 4
    assert "2.14.0+cpu" in text and synthetic.HOSTILE not in text


def test_reports_imports_no_framework_and_no_adapters() -> None:
    code = ("import sys, reports.__main__, reports.render, reports.diff, reports.synthetic\n"
            "from reports.model import Report\n"  # rendering too: the porting recipes use conformance.port
            "reports.render.render(Report([], [], [], [], [], [], {}))\n"
            "bad = {'adapters', 'torch', 'tensorflow', 'jax', 'flax', 'keras', 'onnxruntime', 'numpy'}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def failing(case: str, adapter: str, status: Status, explained_by: tuple[str, ...] = (),
            max_rel: float = 0.01, check: str = "training", **extra: object) -> dict:
    """A record whose one output is `max_rel` off (within tolerance when it passes)."""
    passed = status is Status.PASS
    metric = {**synthetic.metric(synthetic.random.Random(0), "output", "float32", passed, [2, 3]),
              "max_rel": max_rel}
    return Record(case=case, file=f"cases/{case}.yaml", adapter=adapter, family="torch", check=check,
                  status=status, case_info={"title": case, "tags": [], "dtype": "float32"}, metrics=[metric],
                  explained_by=list(explained_by), **extra).to_json()


def run_file(path: Path, records: list[dict], adapters: tuple[str, ...] = ("torch", "flax-linen")) -> Path:
    env = {"adapters": {a: {"family": "torch", "conventions": synthetic.conventions(a),
                            "capabilities": synthetic.capabilities(a)} for a in adapters}}
    return synthetic.write(path, {"format": FORMAT, "environment": env, "records": records})


def test_divergences_grouped_unexplained_first(tmp_path: Path) -> None:
    rule = synthetic.rule("torch", "training", "moving-variance-unbiased")
    records = [
        *(failing(f"k{i}", "torch", Status.KNOWN, ("moving-variance-unbiased",), 0.2, rule=rule)
          for i in range(4)),
        failing("e0", "torch", Status.FAIL, ("epsilon-outside-sqrt",), 0.03),
        failing("e1", "torch", Status.FAIL, ("epsilon-outside-sqrt",), 0.05, check="inference"),
        failing("u0", "torch", Status.FAIL, (), 0.5, closest={"variant": "stats-frozen", "badness": 12.0}),
        *(failing(f"u{i}", "flax-linen", Status.FAIL, (), rel,
                  closest={"variant": "compute-float32", "badness": bad})
          for i, rel, bad in ((1, 0.7, 3.0), (2, 2.5, 2.0))),
        failing("p0", "torch", Status.PASS),
        failing("n0", "flax-linen", Status.NOT_EXPRESSIBLE, reason="cannot"),
    ]
    report = load([run_file(tmp_path / "run.json", records)])
    groups = [(d["column"], d["explanation"], str(d["status"]), d["count"]) for d in divergences(report)]
    assert groups == [("flax-linen", "unexplained", "fail", 2), ("torch", "unexplained", "fail", 1),
                      ("torch", "epsilon-outside-sqrt", "fail", 2),
                      ("torch", "moving-variance-unbiased", "known", 4)]
    first, _, explained, known = divergences(report)
    assert first["effect"] == 2.5 and explained["effect"] == 0.05
    assert first["closest"] == [{"variant": "compute-float32", "badness": 2.0, "count": 2}]
    assert [(row.id, c) for row, c in explained["examples"]] == [("e0", "training"), ("e1", "inference")]
    assert known["rules"] == [{"reason": rule["reason"], "link": rule["link"], "source": rule["source"]}]

    text = render(report)
    assert text.index('id="summary"') < text.index('id="divergences"') < text.index('id="matrix-section"')
    assert parse(text).tables["divergence-table"]["body_rows"] == 4
    start = text.index('id="divergence-table"')
    table = text[start:text.index("</table>", start)]
    assert table.index("flax-linen") < table.index("epsilon-outside-sqrt") < table.index(rule["link"])
    assert 'href="#filter:status=fail&amp;adapter=flax-linen">2</a>' in table
    assert "closest: compute-float32 ×2 <small>(2 records)</small>" in table
    # the matrix cell names what explains it, "?" when nothing does; failing cases come first
    data = data_of(text)
    cells = {(c[0], data["columns"][i]): (data["statuses"][cell[0]], data["strings"][cell[2]])
             for c in data["cases"] for i, cell in enumerate(c[8]) if cell}
    assert cells[("u0", "torch")] == ("fail", "?")
    assert cells[("e0", "torch")] == ("fail", "epsilon-outside-sqrt")
    assert cells[("k0", "torch")] == ("known", "moving-variance-unbiased")
    order = [c[0] for c in data["cases"]]
    assert order.index("u0") < order.index("k0") < order.index("p0")
    # the first screen: counts by status, unexplained failures, the groups
    summary = text[text.index('id="summary"'):text.index("</section>")]
    assert "3 unexplained failures" in summary and 'id="group-summary"' in summary


def test_format_1_file_with_xfail_renders_as_known(files: dict[str, Path], tmp_path: Path) -> None:
    """An old results file: status xfail / xpass, conventions as estimators, known_failure."""
    data = json.loads(files["a"].read_text(encoding="utf-8"))
    data["format"] = "bnconform-results/1"
    for env in data["environment"]["adapters"].values():
        env["conventions"] = {"moving_variance_estimator": "unbiased", "batch_variance_estimator": "biased",
                              "notes": ["an old note"]}
        del env["capabilities"]
    for r in data["records"]:
        for key in ("explained_by", "closest", "rule"):
            del r[key]
        r["conventions"] = {"moving_variance_estimator": "unbiased", "batch_variance_estimator": "biased"}
        if r["status"] == "known":
            r["status"], r["known_failure"] = "xfail", {"reason": "old reason", "link": "https://example.org/1"}
    xpass = next(r for r in data["records"] if r["status"] == "pass")
    xpass["status"] = "xpass"
    old = synthetic.write(tmp_path / "old.json", data)
    report = load([old])
    assert not [s for s in report.sources if s.error]
    counts = report.counts()
    assert counts[Status.KNOWN] == sum(1 for r in data["records"] if r["status"] == "xfail") > 0
    text = render(report)
    assert not re.search(r"\bx(fail|pass)\b", text.replace(str(tmp_path), ""))
    data = data_of(text)
    assert any(cell and data["statuses"][cell[0]] == "known" for c in data["cases"] for cell in c[8])
    assert "bnconform-results/1</td>" not in text and "(older; read as" in text
    assert "<code>moving_variance_estimator = unbiased</code>" in text
    assert "No capabilities recorded" in text
    groups = {(d["explanation"], str(d["status"])) for d in divergences(report)}
    assert ("no variant named", "known") in groups and ("unexplained", "fail") in groups


def test_compare_reports_an_explanation_change(tmp_path: Path) -> None:
    old = [failing("a", "torch", Status.FAIL, ("epsilon-outside-sqrt",)),
           failing("b", "torch", Status.FAIL, ()),
           failing("c", "torch", Status.KNOWN, ("stats-frozen",)),
           failing("d", "torch", Status.PASS),
           failing("e", "torch", Status.PASS)]
    new = copy.deepcopy(old)
    new[0]["explained_by"] = ["epsilon-1e-3"]  # same status, other variant
    new[1]["status"], new[1]["explained_by"] = "known", ["compute-float32"]  # and a status change
    new[4]["status"], new[4]["explained_by"] = "known", ["stats-frozen"]  # a status change only
    old_path, new_path = run_file(tmp_path / "old.json", old), run_file(tmp_path / "new.json", new)
    diff = diff_runs([old_path], [new_path])
    assert [(c.case, c.old.explained_by, c.new.explained_by) for c in diff.explanations] == [
        ("a", ["epsilon-outside-sqrt"], ["epsilon-1e-3"]), ("b", [], ["compute-float32"])]
    assert [(c.case, c.kind) for c in diff.changes] == [("b", "fixed"), ("e", "status")]
    assert diff.unchanged == 2
    out = tmp_path / "diff.html"
    assert main(["--compare", str(old_path), "--against", str(new_path), "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert parse(text).tables["explanation-table"]["body_rows"] == 2
    assert "<td>epsilon-outside-sqrt</td><td>epsilon-1e-3</td>" in text
    assert "<td>none</td><td>compute-float32</td>" in text
