"""Property-based: random YAML and mutations of the real cases never crash the loader.

The only outcome allowed besides a valid case is the loader's own CaseError, naming the file and
a line inside it. Counts of what was tried are printed with -s (pytest -s tests/test_fuzz.py).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.loader import load_text

ROOT = Path(__file__).resolve().parent.parent
REAL = sorted((ROOT / "cases").rglob("*.yaml"))
SEEN: dict[str, set[str]] = {"tried": set(), "messages": set()}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.sampled_from(
        ["id", "title", "input", "params", "axis", "shape", "values", "random", "seed", "training",
         "inference", "expected", "output", "momentum", "epsilon", "tolerance", "batches", "gamma",
         "steps", "expect_error", "dtype", "tags", "x"]), inner, max_size=6)), max_leaves=40)


def check(text: str) -> None:
    path = Path("fuzz.yaml")
    cases, errors = load_text(path, text)
    SEEN["tried"].add(text)
    lines = max(1, text.count("\n") + 1)
    for error in errors:
        assert error.path == path
        assert 1 <= error.line <= lines + 1, (error, text)
        assert str(error).startswith(f"fuzz.yaml:{error.line}:")
        SEEN["messages"].add(error.message.split("(got")[0][:60])
    for loaded in cases:
        assert loaded.case.id


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(documents)
def test_random_documents(document):
    check(yaml.safe_dump(document, default_flow_style=False, allow_unicode=True))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(REAL), st.data())
def test_mutations_of_real_cases(path, data):
    text = path.read_text(encoding="utf-8")
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["delete", "insert", "duplicate-line", "swap-line"]))
        if action == "delete":
            text = text[:position] + text[position + data.draw(st.integers(1, 20)):]
        elif action == "insert":
            inserted = data.draw(st.sampled_from(
                [":", "- ", "[", "]", "{", "}", "\n", "  ", "!!python/object:os.system ", "&a ", "*a",
                 ".nan", "nan", "1e999", "-", "'", '"', "#", "\t", "null", "@", "%YAML 1.1\n"]))
            text = text[:position] + inserted + text[position:]
        else:
            lines = text.splitlines(keepends=True)
            if len(lines) > 2:
                i = data.draw(st.integers(0, len(lines) - 2))
                pair = [lines[i], lines[i]] if action == "duplicate-line" else [lines[i + 1], lines[i]]
                lines[i:i + 2] = pair
                text = "".join(lines)
    check(text)


def test_report_counts():
    print(f"\nfuzz: {len(SEEN['tried'])} distinct inputs, {len(SEEN['messages'])} distinct error messages")
