"""The parsed-case cache: a hit gives what parsing gives, and any change to the file reads it anew."""

from __future__ import annotations

from pathlib import Path

import pytest

from conformance import loader

CASE = """id: cache-probe
dtype: float32
input: {shape: [2, 2], values: [[1, 2], [3, 4]]}
params: {axis: 1, epsilon: 0.001}
inference: {expected: {output: [[0, 0], [0, 0]]}}
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(loader, "CASE_CACHE", tmp_path / "cache")
    return tmp_path / "cache"


def test_a_cached_file_loads_as_parsed(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "case.yaml"
    path.write_text(CASE)
    first, errors = loader.load_file(path)
    assert not errors and len(list(cache.rglob("*.pickle"))) == 1
    again, _ = loader.load_file(path)
    assert again[0].case == first[0].case and again[0].marks == first[0].marks
    assert again[0] is not first[0]  # a fresh object each time: nobody shares a mutable case


def test_an_edit_is_read_anew_and_errors_are_kept_too(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "case.yaml"
    path.write_text(CASE)
    loader.load_file(path)
    path.write_text(CASE.replace("epsilon: 0.001", "epsilon: -1"))
    cases, errors = loader.load_file(path)
    assert not cases and errors[0].field == "params.epsilon" and errors[0].line == 4
    assert loader.load_file(path)[1][0].line == 4


def test_an_unreadable_entry_is_parsed_again(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "case.yaml"
    path.write_text(CASE)
    loader.load_file(path)
    for entry in cache.rglob("*.pickle"):
        entry.write_bytes(b"truncated")
    assert loader.load_file(path)[0][0].case.id == "cache-probe"


def test_off_parses_every_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "CASE_CACHE", Path("off"))
    path = tmp_path / "case.yaml"
    path.write_text(CASE)
    assert loader.load_file(path)[0][0].case.id == "cache-probe"
    assert not Path("off").exists()
