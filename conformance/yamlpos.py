"""YAML with positions: data built from libyaml's node tree, each key's and item's line and column
recorded, so every error in a case file can name where it is. Refuses tags and aliases (case
files are data) and nesting deeper than any real case.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_DEPTH = 64  # YAML nesting, far above any real case (a 5-D tensor nests 5 deep)

Loc = tuple[str | int, ...]
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass(frozen=True)
class CaseError:
    path: Path
    line: int  # 1-based
    column: int
    field: str  # dotted path inside the case, "" for the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.path}:{self.line}:{self.column}: {where}{self.message}"


def dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def nearest_mark(marks: dict[Loc, tuple[int, int]], loc: Loc, default: tuple[int, int]):
    for n in range(len(loc), -1, -1):
        if loc[:n] in marks:
            return marks[loc[:n]]
    return default


# libyaml's C parser when PyYAML was built with it (10x faster); both give node positions
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_FLOAT_TAG = "tag:yaml.org,2002:float"


class Walker:
    """Builds Python data from a composed YAML node, recording each key's and item's position."""

    def __init__(self, path: Path):
        self.path = path
        self.marks: dict[Loc, tuple[int, int]] = {}
        self.errors: list[CaseError] = []
        self.seen: set[int] = set()
        self.constructor = yaml.SafeLoader("")

    def error(self, mark: yaml.Mark, loc: Loc, message: str) -> None:
        self.errors.append(CaseError(self.path, mark.line + 1, mark.column + 1, dotted(loc), message))

    def build(self, node: yaml.Node, loc: Loc = (), depth: int = 0) -> Any:
        self.marks.setdefault(loc, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.CollectionNode):
            # an alias makes the same node appear twice; expanding nested aliases is exponential
            # ("billion laughs"), and plain case data never needs them
            if id(node) in self.seen:
                self.error(node.start_mark, loc, "alias (*name) of the node anchored here: YAML aliases "
                                                 "are not supported in case files")
                return None
            self.seen.add(id(node))
        if depth > MAX_DEPTH:
            self.error(node.start_mark, loc, f"nested deeper than {MAX_DEPTH} levels")
            return None
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _PLAIN_TAGS:
            self.error(node.start_mark, loc, f"unsupported YAML tag {node.tag!r} (case files are data)")
            return None
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self.error(key_node.start_mark, loc, "a key must be a plain name")
                    continue
                key = self.scalar(key_node, loc)
                if key in out:
                    self.error(key_node.start_mark, (*loc, key), "duplicate key")
                    continue
                self.marks[(*loc, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                out[key] = self.build(value_node, (*loc, key), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            if depth < MAX_DEPTH and all(type(item) is yaml.ScalarNode for item in node.value):
                return self.scalars(node.value, loc)  # a list of numbers: most of a case file
            return [self.build(item, (*loc, i), depth + 1) for i, item in enumerate(node.value)]
        return self.scalar(node, loc)

    def scalars(self, items: list[yaml.ScalarNode], loc: Loc) -> list[Any]:
        """What `build` gives for each item, faster: a scalar the resolver tagged float is read
        with float(), which agrees with PyYAML wherever it succeeds (underscores only between
        digits); anything else (.inf, 1_.5, 1:30.5, ints, strings) goes through the constructor."""
        marks, out = self.marks, []
        for i, item in enumerate(items):
            mark = item.start_mark
            marks.setdefault((*loc, i), (mark.line + 1, mark.column + 1))
            if item.tag == _FLOAT_TAG:
                try:
                    out.append(float(item.value))
                    continue
                except ValueError:
                    pass
            out.append(self.scalar(item, (*loc, i)))
        return out

    def scalar(self, node: yaml.Node, loc: Loc) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # e.g. !!python/object: the safe loader refuses any tag
            self.error(node.start_mark, loc, f"unsupported YAML tag {node.tag!r} (case files are data)")
            del exc
            return None
        if isinstance(value, str) and not node.style and _EXPONENT_FLOAT.fullmatch(value):  # plain, unquoted
            return float(value)  # YAML 1.1 reads a plain 1e-5 as a string; YAML 1.2 and people, a number
        return value


def documents(path: Path, text: str) -> Iterator[tuple[yaml.Node | None, CaseError | None]]:
    try:
        for node in yaml.compose_all(text, Loader=SAFE_LOADER):
            yield node, None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        yield None, CaseError(path, line, col, "", f"YAML syntax: {exc.problem or exc}")
    except (yaml.YAMLError, RecursionError) as exc:
        yield None, CaseError(path, 1, 1, "", f"YAML: {type(exc).__name__}: {exc}")


