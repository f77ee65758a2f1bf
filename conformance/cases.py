"""The case format (pydantic models) and a loader whose errors name file, line, column and field.

One YAML file holds one case (or several `---`-separated ones). Loading never raises for a bad
file: it returns the good cases and a list of `CaseError`s, so one broken file stops nothing else.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from conformance.dtypes import DTYPES, round_to

MAX_ELEMENTS = 1_000_000  # per tensor; larger shapes are rejected before anything is allocated
MAX_FILE_BYTES = 32 * 1024 * 1024
MAX_DEPTH = 64  # YAML nesting, far above any real case (a 5-D tensor nests 5 deep)

Loc = tuple[str | int, ...]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class RandomSpec(Strict):
    """Values drawn with numpy.random.default_rng(seed), then rounded to the case dtype."""

    seed: int
    distribution: Literal["normal", "uniform"] = "normal"
    mean: float = 0.0  # normal
    std: float = 1.0
    low: float = -1.0  # uniform
    high: float = 1.0


class Values(Strict):
    """Values given inline or drawn at random; the shape comes from the tensor or the input."""

    values: list[Any] | None = None  # nested lists, or a flat list in C order
    random: RandomSpec | None = None


class Tensor(Values):
    shape: list[Annotated[int, Field(ge=0)]]


class Params(Strict):
    """The canonical convention. Defaults: momentum 0.9 and epsilon 1e-5 (torch's and ONNX's)."""

    axis: int | list[int]
    momentum: float | None = Field(0.9, ge=0.0, le=1.0)  # decay form; null = cumulative average
    epsilon: float = Field(1e-5, ge=0.0)
    center: bool = True
    scale: bool = True
    gamma: list[Any] | None = None
    beta: list[Any] | None = None
    moving_mean: list[Any] | None = None
    moving_variance: list[Any] | None = None


class TrainingExpected(Strict):
    output: list[Any] | None = None
    batch_mean: list[Any] | None = None
    batch_variance: list[Any] | None = None
    moving_mean: list[Any] | None = None
    moving_variance: list[Any] | None = None
    moving_variance_unbiased: list[Any] | None = None
    inference_output: list[Any] | None = None


class GradientExpected(Strict):
    input: list[Any] | None = None
    gamma: list[Any] | None = None
    beta: list[Any] | None = None


class GradientSpec(Strict):
    upstream: Values  # dL/dy, shaped like the (last) input
    expected: GradientExpected = GradientExpected()


class Training(Strict):
    steps: int | None = Field(None, ge=1, le=1000)  # default: one step per batch
    expected: TrainingExpected = TrainingExpected()
    gradients: GradientSpec | None = None


class InferenceExpected(Strict):
    output: list[Any] | None = None


class Inference(Strict):
    expected: InferenceExpected = InferenceExpected()


class Tolerance(Strict):
    rtol: float | None = Field(None, ge=0.0)
    atol: float | None = Field(None, ge=0.0)
    reason: str = Field(min_length=1)


class Case(Strict):
    _memo: dict[Any, Any] = PrivateAttr(default_factory=dict)  # arrays derived from this case

    id: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9.]+)*$", max_length=120)
    title: str = ""
    tags: list[str] = []
    dtype: Literal["float16", "bfloat16", "float32", "float64"] = "float32"
    input: Tensor | None = None
    batches: list[Tensor] | None = None
    params: Params
    training: Training | None = None
    inference: Inference | None = None
    tolerance: Tolerance | None = None
    expect_error: bool = False

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """Compute something derived from this (immutable once loaded) case once per process."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @property
    def tensors(self) -> list[Tensor]:
        """The batches fed, in order (one for `input`)."""
        return self.batches if self.batches is not None else [self.input]  # type: ignore[list-item]

    @property
    def steps(self) -> int:
        """Training steps; batches are fed in order and cycled when there are more steps."""
        given = self.training.steps if self.training is not None else None
        return given if given is not None else len(self.tensors)

    @property
    def checks(self) -> list[str]:
        out = []
        if self.training is not None:
            out.append("training")
            if self.training.gradients is not None:
                out.append("gradients")
        if self.inference is not None:
            out.append("inference")
        return out


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


@dataclass
class LoadedCase:
    case: Case
    path: Path
    line: int  # where the document starts
    marks: dict[Loc, tuple[int, int]] = field(repr=False, default_factory=dict)

    def line_of(self, loc: Loc) -> int:
        return _nearest_mark(self.marks, loc, (self.line, 1))[0]


class CaseErrors(Exception):
    """Raised by `load_one` for callers that want an exception; carries every error."""

    def __init__(self, errors: list[CaseError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


# ---------------------------------------------------------------- YAML with positions


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _nearest_mark(marks: dict[Loc, tuple[int, int]], loc: Loc, default: tuple[int, int]):
    for n in range(len(loc), -1, -1):
        if loc[:n] in marks:
            return marks[loc[:n]]
    return default


# libyaml's C parser when PyYAML was built with it (10x faster); both give node positions
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_FLOAT_TAG = "tag:yaml.org,2002:float"


class _Walker:
    """Builds Python data from a composed YAML node, recording each key's and item's position."""

    def __init__(self, path: Path):
        self.path = path
        self.marks: dict[Loc, tuple[int, int]] = {}
        self.errors: list[CaseError] = []
        self.seen: set[int] = set()
        self.constructor = yaml.SafeLoader("")

    def error(self, mark: yaml.Mark, loc: Loc, message: str) -> None:
        self.errors.append(CaseError(self.path, mark.line + 1, mark.column + 1, _dotted(loc), message))

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
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:  # e.g. !!python/object: the safe loader refuses any tag
            self.error(node.start_mark, loc, f"unsupported YAML tag {node.tag!r} (case files are data)")
            del exc
            return None


def _documents(path: Path, text: str) -> Iterator[tuple[yaml.Node | None, CaseError | None]]:
    try:
        for node in yaml.compose_all(text, Loader=SAFE_LOADER):
            yield node, None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        yield None, CaseError(path, line, col, "", f"YAML syntax: {exc.problem or exc}")
    except (yaml.YAMLError, RecursionError) as exc:
        yield None, CaseError(path, 1, 1, "", f"YAML: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- validation


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model describing the mapping at `loc` (for suggesting valid keys)."""
    model: Any = Case
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = model.model_fields.get(part)
        if info is None:
            return None
        model = _unwrap_model(info.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if found is not None:
                return found
    return None


def _pydantic_errors(exc: ValidationError) -> list[tuple[Loc, str]]:
    """One message per location: the branches of a union (int | list) are joined with "or"."""
    merged: dict[Loc, list[str]] = {}
    for loc, message in _each_pydantic_error(exc):
        merged.setdefault(loc, []).append(message)
    return [(loc, " or ".join(messages)) for loc, messages in merged.items()]


def _each_pydantic_error(exc: ValidationError) -> Iterator[tuple[Loc, str]]:
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            model = _model_at(loc[:-1])
            key = str(loc[-1])
            valid = sorted(model.model_fields) if model else []
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
            yield loc, f"unknown key {key!r}{hint}"
            continue
        # drop pydantic's union-branch tags ("int", "list[int]") from the location
        clean = tuple(p for p in loc if isinstance(p, int) or not ("[" in p or p in _TYPE_TAGS))
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        yield clean, f"{err['msg']}{shown}"


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "function-after", "list", "dict"}


def flat_numbers(values: Any, loc: Loc) -> tuple[list[float], list[tuple[Loc, str]]]:
    """Flatten nested lists of numbers (C order), reporting any element that is not a number."""
    out: list[float] = []
    errors: list[tuple[Loc, str]] = []

    def walk(v: Any, where: Loc) -> None:
        if isinstance(v, list):
            for i, item in enumerate(v):
                walk(item, (*where, i))
        elif isinstance(v, bool) or not isinstance(v, int | float):
            errors.append((where, f"expected a number, got {v!r} (NaN and infinity are .nan and .inf)"))
        else:
            out.append(float(v))

    walk(values, loc)
    return out, errors


def _nested_shape(values: Any) -> tuple[int, ...] | None:
    """Shape of a regular nested list, or None when ragged."""
    if not isinstance(values, list):
        return ()
    if not values:
        return (0,)
    shapes = {_nested_shape(v) for v in values}
    if len(shapes) != 1 or None in shapes:
        return None
    return (len(values), *shapes.pop())


def _check_values(values: Any, shape: tuple[int, ...], loc: Loc, what: str) -> list[tuple[Loc, str]]:
    numbers, errors = flat_numbers(values, loc)
    if errors:
        return errors
    count = math.prod(shape)
    nested = _nested_shape(values)
    if nested is not None and len(nested) > 1 and nested != shape:
        return [(loc, f"nested shape {list(nested)} does not match {what} {list(shape)}")]
    if len(numbers) != count:
        return [(loc, f"{len(numbers)} values given, {what} {list(shape)} needs {count}")]
    return []


def _semantic_errors(case: Case) -> list[tuple[Loc, str]]:
    """What the models alone cannot check: counts against shapes, channels, modes."""
    errors: list[tuple[Loc, str]] = []
    if (case.input is None) == (case.batches is None):
        errors.append(((), "give exactly one of `input` and `batches`"))
        return errors
    if case.batches is not None and not case.batches:
        return [(("batches",), "needs at least one batch")]
    if case.training is None and case.inference is None:
        errors.append(((), "give `training`, `inference` or both"))
    base: Loc = ("input",) if case.input is not None else ("batches",)
    shapes = []
    for i, tensor in enumerate(case.tensors):
        loc = base if case.input is not None else (*base, i)
        shape = tuple(tensor.shape)
        shapes.append(shape)
        if math.prod(shape) > MAX_ELEMENTS:
            errors.append(((*loc, "shape"), f"{math.prod(shape)} elements; the limit is {MAX_ELEMENTS}"))
            continue
        if (tensor.values is None) == (tensor.random is None):
            errors.append((loc, "give exactly one of `values` and `random`"))
        elif tensor.values is not None:
            errors.extend(_check_values(tensor.values, shape, (*loc, "values"), "shape"))
    if errors:
        return errors
    rank = len(shapes[0])
    axes = case.params.axis if isinstance(case.params.axis, list) else [case.params.axis]
    if any(len(s) != rank for s in shapes):
        errors.append((("batches",), "every batch needs the same rank"))
    if rank < 1:
        errors.append(((*base, "shape"), "the input needs at least one dimension"))
    if not axes:
        errors.append((("params", "axis"), "needs at least one axis"))
    out_of_range = [a for a in axes if not -rank <= a < rank]
    if len({a % rank for a in axes if a not in out_of_range}) != len(axes) - len(out_of_range):
        errors.append((("params", "axis"), "an axis is given twice"))
    if out_of_range and not case.expect_error:
        errors.append(
            (("params", "axis"), f"axis {out_of_range[0]} is out of range for rank {rank} "
             "(set expect_error: true to check that frameworks reject it)")
        )
    if errors or out_of_range:
        return errors
    channel_dims = tuple(shapes[0][a % rank] for a in axes)
    if any(tuple(s[a % rank] for a in axes) != channel_dims for s in shapes):
        errors.append((("batches",), "every batch needs the same channel sizes"))
    per_channel = {
        ("params", "gamma"): case.params.gamma,
        ("params", "beta"): case.params.beta,
        ("params", "moving_mean"): case.params.moving_mean,
        ("params", "moving_variance"): case.params.moving_variance,
    }
    if case.training is not None:
        for name in ("batch_mean", "batch_variance", "moving_mean", "moving_variance",
                     "moving_variance_unbiased"):
            per_channel[("training", "expected", name)] = getattr(case.training.expected, name)
        grads = case.training.gradients
        if grads is not None:
            per_channel[("training", "gradients", "expected", "gamma")] = grads.expected.gamma
            per_channel[("training", "gradients", "expected", "beta")] = grads.expected.beta
    for loc, values in per_channel.items():
        if values is not None:
            errors.extend(_check_values(values, channel_dims, loc, "channel count"))
    if case.params.beta is not None and not case.params.center:
        errors.append((("params", "beta"), "given while center is false (beta is not applied)"))
    if case.params.gamma is not None and not case.params.scale:
        errors.append((("params", "gamma"), "given while scale is false (gamma is not applied)"))
    last = shapes[(case.steps - 1) % len(shapes)] if case.training is not None else shapes[-1]
    full_shape = {("inference", "expected", "output"): (case.inference, shapes[-1])}
    if case.training is not None:
        ex = case.training.expected
        errors.extend(_check_values(ex.output, last, ("training", "expected", "output"), "input shape")
                      if ex.output is not None else [])
        if ex.inference_output is not None:
            errors.extend(_check_values(ex.inference_output, last,
                                        ("training", "expected", "inference_output"), "input shape"))
        grads = case.training.gradients
        if grads is not None:
            up = grads.upstream
            if (up.values is None) == (up.random is None):
                errors.append((("training", "gradients", "upstream"),
                               "give exactly one of `values` and `random`"))
            elif up.values is not None:
                errors.extend(_check_values(up.values, last,
                                            ("training", "gradients", "upstream", "values"), "input shape"))
            if grads.expected.input is not None:
                errors.extend(_check_values(grads.expected.input, last,
                                            ("training", "gradients", "expected", "input"), "input shape"))
    for loc, (mode, shape) in full_shape.items():
        if mode is not None and mode.expected.output is not None:
            errors.extend(_check_values(mode.expected.output, shape, loc, "input shape"))
    return errors


# ---------------------------------------------------------------- loading


def load_text(path: Path, text: str) -> tuple[list[LoadedCase], list[CaseError]]:
    cases: list[LoadedCase] = []
    errors: list[CaseError] = []
    for node, syntax_error in _documents(path, text):
        if syntax_error is not None:
            errors.append(syntax_error)
            break
        if node is None:
            continue
        walker = _Walker(path)
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
            problems = _semantic_errors(case)
        except ValidationError as exc:
            problems = _pydantic_errors(exc)
        except RecursionError:
            problems = [((), "document nested too deeply")]
        if problems:
            for loc, message in problems:
                line, col = _nearest_mark(walker.marks, loc, start)
                errors.append(CaseError(path, line, col, _dotted(loc), message))
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
    return load_text(path, text)


def case_files(folders: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for folder in folders:
        if folder.is_file():
            files.append(folder)
            continue
        files.extend(p for p in sorted(folder.rglob("*.yaml")) if p.name != "schema.yaml")
        files.extend(sorted(folder.rglob("*.yml")))
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
    unique: list[LoadedCase] = []
    for loaded in cases:
        other = first.setdefault(loaded.case.id, loaded)
        if other is loaded:
            unique.append(loaded)
        else:
            errors.append(CaseError(loaded.path, loaded.line_of(("id",)), 1, "id",
                                    f"duplicate id {loaded.case.id!r}, first used at "
                                    f"{other.path}:{other.line_of(('id',))}"))
    return unique, errors


def load_one(path: Path) -> list[LoadedCase]:
    cases, errors = load_file(path)
    if errors:
        raise CaseErrors(errors)
    return cases


# ---------------------------------------------------------------- arrays


def make_array(values: Values, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """float64 array of the given shape holding values representable in `dtype`."""
    if values.values is not None:
        flat, _ = flat_numbers(values.values, ())
        raw = np.array(flat, dtype=np.float64).reshape(shape)
    else:
        spec = values.random
        assert spec is not None
        rng = np.random.default_rng(spec.seed)
        if spec.distribution == "normal":
            raw = rng.normal(spec.mean, spec.std, size=shape)
        else:
            raw = rng.uniform(spec.low, spec.high, size=shape)
    return round_to(raw, dtype)


def per_channel(values: list[Any] | None, channel_shape: tuple[int, ...], default: float,
                dtype: str) -> np.ndarray:
    if values is None:
        return np.full(channel_shape, default, dtype=np.float64)
    flat, _ = flat_numbers(values, ())
    return round_to(np.array(flat, dtype=np.float64).reshape(channel_shape), dtype)


def as_array(values: list[Any], shape: tuple[int, ...]) -> np.ndarray:
    """An expected field as a float64 array (no rounding: expected values are float64)."""
    flat, _ = flat_numbers(values, ())
    return np.array(flat, dtype=np.float64).reshape(shape)


assert set(DTYPES) == {"float16", "bfloat16", "float32", "float64"}
