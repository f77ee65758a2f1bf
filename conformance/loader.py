"""Loading case files: one YAML file holds one case (or several `---`-separated ones).

Loading never raises for a bad file: it returns the good cases and a list of `CaseError`s naming
file, line, column and field, so one broken file stops nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from conformance import RESULTS_DIR
from conformance.schema import Case
from conformance.validate import pydantic_errors, semantic_errors
from conformance.yamlpos import CaseError, Loc, Walker, documents, dotted, nearest_mark

MAX_FILE_BYTES = 32 * 1024 * 1024
CASE_SUFFIXES = (".yaml", ".yml")
NOT_CASES = {"schema.yaml"}


@dataclass
class LoadedCase:
    case: Case
    path: Path
    line: int  # where the document starts
    marks: dict[Loc, tuple[int, int]] = field(repr=False, default_factory=dict)

    def line_of(self, loc: Loc) -> int:
        return nearest_mark(self.marks, loc, (self.line, 1))[0]


class CaseErrors(Exception):
    """Raised by `load_one` for callers that want an exception; carries every error."""

    def __init__(self, errors: list[CaseError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def load_text(path: Path, text: str) -> tuple[list[LoadedCase], list[CaseError]]:
    cases: list[LoadedCase] = []
    errors: list[CaseError] = []
    for node, syntax_error in documents(path, text):
        if syntax_error is not None:
            errors.append(syntax_error)
            break
        if node is None:
            continue
        walker = Walker(path)
        data = walker.build(node)
        start = (node.start_mark.line + 1, node.start_mark.column + 1)
        if walker.errors:
            errors.extend(walker.errors)
            continue
        if not isinstance(data, dict):
            errors.append(CaseError(path, *start, "", "a case is a mapping of keys (id, params, ...)"))
            continue
        problems: list[tuple[Loc, str]]
        try:
            case = Case.model_validate(data)
            problems = semantic_errors(case)
        except ValidationError as exc:
            problems = pydantic_errors(exc)
        except RecursionError:
            problems = [((), "document nested too deeply")]
        if problems:
            for loc, message in problems:
                line, col = nearest_mark(walker.marks, loc, start)
                errors.append(CaseError(path, line, col, dotted(loc), message))
            continue
        cases.append(LoadedCase(case, path, start[0], walker.marks))
    return cases, errors


def load_file(path: Path) -> tuple[list[LoadedCase], list[CaseError]]:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return [], [CaseError(path, 1, 1, "", f"file larger than {MAX_FILE_BYTES} bytes")]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [CaseError(path, 1, 1, "", f"cannot read: {exc}")]
    return cached(path, text)


# Every family's process loads the same case files, and parsing plus validation is most of what a
# case costs the harness (YAML is read in Python, node by node, to keep each value's line). The
# result is kept per file, keyed by the file's path and text and by the source of the modules that
# read it, so an edit to either reads the file anew. BNCONFORM_CASE_CACHE=off turns it off.
CASE_CACHE = Path(os.environ.get("BNCONFORM_CASE_CACHE") or RESULTS_DIR / ".case-cache")
_READERS = ("loader.py", "schema.py", "validate.py", "yamlpos.py", "outputs.py")


@functools.cache
def _readers_digest() -> bytes:
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / name).read_bytes() for name in _READERS)).digest()


def cached(path: Path, text: str) -> tuple[list[LoadedCase], list[CaseError]]:
    """`load_text`, through the cache (a missing or unreadable entry is simply parsed again)."""
    if str(CASE_CACHE) == "off":
        return load_text(path, text)
    key = hashlib.sha256(_readers_digest() + str(path).encode() + b"\0" + text.encode()).hexdigest()
    entry = CASE_CACHE / key[:2] / f"{key}.pickle"
    try:
        return pickle.loads(entry.read_bytes())
    except Exception:  # absent, truncated, or from another version of a dependency: read anew
        pass
    loaded = load_text(path, text)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pickle.dumps(loaded, protocol=pickle.HIGHEST_PROTOCOL))
        tmp.replace(entry)  # processes loading the same file at once: each write is whole
    except OSError:
        pass  # a read-only checkout still runs, only slower
    return loaded


def is_case_file(path: Path) -> bool:
    return path.suffix in CASE_SUFFIXES and path.name not in NOT_CASES


def case_files(folders: Iterable[Path]) -> list[Path]:
    """The case files given, and those below the folders given, each folder's in sorted order."""
    files: list[Path] = []
    for folder in folders:
        if folder.is_file():
            files.append(folder)
        else:
            files.extend(sorted(p for p in folder.rglob("*") if is_case_file(p) and p.is_file()))
    return files


def load_folders(folders: Iterable[Path]) -> tuple[list[LoadedCase], list[CaseError]]:
    """Every case below the folders; duplicate ids across all of them are errors."""
    cases: list[LoadedCase] = []
    errors: list[CaseError] = []
    for path in case_files(folders):
        good, bad = load_file(path)
        cases.extend(good)
        errors.extend(bad)
    first: dict[str, LoadedCase] = {}
    errors.extend(duplicate_id_errors(cases, first))
    return [c for c in cases if first[c.case.id] is c], errors


def load_one(path: Path) -> list[LoadedCase]:
    cases, errors = load_file(path)
    if errors:
        raise CaseErrors(errors)
    return cases


def duplicate_id_errors(cases: Iterable[LoadedCase], first: dict[str, LoadedCase]) -> list[CaseError]:
    """Errors for ids already in `first` (id -> where it was first seen), which is updated."""
    errors = []
    for loaded in cases:
        other = first.setdefault(loaded.case.id, loaded)
        if other is not loaded:
            errors.append(CaseError(loaded.path, loaded.line_of(("id",)), 1, "id",
                                    f"duplicate id {loaded.case.id!r}, first used at "
                                    f"{other.path}:{other.line_of(('id',))}"))
    return errors
