"""Validation beyond the models: pydantic's errors turned into one message per field (unknown keys
suggest the nearest valid one), and what the models alone cannot check (value counts against
shapes, channel sizes, axes in range, modes given). Every error is a (location, message) pair; the
loader turns locations into file:line:column.
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from conformance.outputs import CHECKS, outputs_of
from conformance.schema import Case, Params
from conformance.yamlpos import Loc

MAX_ELEMENTS = 1_000_000  # per tensor; larger shapes are rejected before anything is allocated
Problems = list[tuple[Loc, str]]


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


def pydantic_errors(exc: ValidationError) -> list[tuple[Loc, str]]:
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
    # below an empty list nothing shows the remaining dims: [[], []] is a [2, 0, 3] tensor too
    hidden_below_empty = nested is not None and nested[-1:] == (0,) and tuple(shape[:len(nested)]) == nested
    if nested is not None and len(nested) > 1 and nested != shape and not hidden_below_empty:
        return [(loc, f"nested shape {list(nested)} does not match {what} {list(shape)}")]
    if len(numbers) != count:
        return [(loc, f"{len(numbers)} values given, {what} {list(shape)} needs {count}")]
    return []


def semantic_errors(case: Case) -> Problems:
    """What the models alone cannot check: counts against shapes, channels, modes."""
    errors: Problems = []
    if (case.input is None) == (case.batches is None):
        return [((), "give exactly one of `input` and `batches`")]
    if case.batches is not None and not case.batches:
        return [(("batches",), "needs at least one batch")]
    if not case.checks:
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
        errors.extend(_values_errors(tensor, shape, loc))
    if errors:
        return errors
    errors.extend(_axis_errors(case, shapes, base))
    if errors or not all(-len(shapes[0]) <= a < len(shapes[0]) for a in case.params.axes):
        return errors
    rank = len(shapes[0])
    channel_dims = tuple(shapes[0][a % rank] for a in case.params.axes)
    if any(tuple(s[a % rank] for a in case.params.axes) != channel_dims for s in shapes):
        errors.append((("batches",), "every batch needs the same channel sizes"))
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        values = getattr(case.params, name)
        if values is not None:
            errors.extend(_check_values(values, channel_dims, ("params", name), "channel count"))
    errors.extend(_feature_errors(case, shapes, channel_dims))
    errors.extend(_preceding_errors(case, channel_dims))
    if case.params.beta is not None and not case.params.center:
        errors.append((("params", "beta"), "given while center is false (beta is not applied)"))
    if case.params.gamma is not None and not case.params.scale:
        errors.append((("params", "gamma"), "given while scale is false (gamma is not applied)"))
    last = shapes[(case.steps - 1) % len(shapes)]
    fed_last = {"every-step": last, "last-fed": last, "last-listed": shapes[-1]}
    for check in case.checks:
        given = case.given(check)
        for output in outputs_of(check):
            if output.name in given and not output.exists(case.params):
                errors.append(((*CHECKS[check].expected_at, output.name),
                               f"given, but the output does not exist here ({output.description})"))
            elif output.name in given:
                shape = fed_last[CHECKS[check].batches] if output.shape == "input" else channel_dims
                what = "input shape" if output.shape == "input" else "channel count"
                errors.extend(_check_values(given[output.name], shape,
                                            (*CHECKS[check].expected_at, output.name), what))
    if case.training is not None and case.training.gradients is not None:
        errors.extend(_values_errors(case.training.gradients.upstream, last,
                                     ("training", "gradients", "upstream")))
    errors.extend(_replica_errors(case, shapes))
    return errors


def _replica_errors(case: Case, shapes: list[tuple[int, ...]]) -> Problems:
    """`params.replicas` splits axis 0 into one shard per replica: axis 0 must be a batch axis with
    a sample for every replica. Gradients across replicas (a sum or a mean over them?) are not
    defined by the format yet."""
    replicas = case.params.replicas
    if replicas is None:
        return []
    loc: Loc = ("params", "replicas")
    rank = len(shapes[0])
    if 0 in {a % rank for a in case.params.axes}:
        return [(loc, "the batch is split on axis 0, which is a channel axis here")]
    errors: Problems = []
    if min(s[0] for s in shapes) < replicas.count:
        errors.append(((*loc, "count"), f"{replicas.count} replicas need at least {replicas.count} "
                       f"samples on axis 0 in every batch (the smallest has {min(s[0] for s in shapes)})"))
    if case.training is not None and case.training.gradients is not None:
        errors.append((("training", "gradients"), "not defined with replicas (params.replicas)"))
    for name in SINGLE_DEVICE_PARAMS:
        if getattr(case.params, name) != Params.model_fields[name].default:
            errors.append((("params", name), "not defined together with params.replicas"))
    return errors


# What each replica does with renorm's statistics, its virtual batches, an adjustment or no running
# statistics is not defined by the format yet (nor measured): these params, set away from their
# default, are refused together with params.replicas (and the generator and fuzzer never draw both).
SINGLE_DEVICE_PARAMS = ("renorm", "virtual_batch_size", "adjustment", "track_running_stats")


def _feature_errors(case: Case, shapes: list[tuple[int, ...]], channel_dims: tuple[int, ...]) -> Problems:
    """renorm, virtual_batch_size and adjustment against the shapes (docs/case-format.md)."""
    p, errors = case.params, []
    v = p.virtual_batch_size
    if v is not None:
        if 0 in (a % len(shapes[0]) for a in p.axes):
            errors.append((("params", "virtual_batch_size"),
                           "ghost batches split axis 0, which is a channel axis"))
        elif any(s[0] % v for s in shapes):
            sizes = sorted({s[0] for s in shapes})
            errors.append((("params", "virtual_batch_size"), f"{v} does not divide the batch size {sizes}"))
    if p.adjustment is not None:
        for name in ("scale", "bias"):
            values = getattr(p.adjustment, name)
            if values is not None:
                errors.extend(_check_values(values, channel_dims, ("params", "adjustment", name),
                                            "channel count"))
    r = p.renorm
    if r is not None and r.rmin is not None and r.rmax is not None and r.rmin > r.rmax:
        errors.append((("params", "renorm", "rmin"), f"rmin {r.rmin} is above rmax {r.rmax}"))
    return errors


def _preceding_errors(case: Case, channel_dims: tuple[int, ...]) -> Problems:
    """`preceding` maps one channel axis onto itself: a C x C weight and C biases."""
    preceding = case.params.preceding
    if preceding is None:
        return []
    if len(channel_dims) != 1:
        return [(("params", "preceding"), "needs exactly one channel axis")]
    c = channel_dims[0]
    errors = _check_values(preceding.weight, (c, c), ("params", "preceding", "weight"),
                           "channels x channels")
    if preceding.bias is not None:
        errors.extend(_check_values(preceding.bias, channel_dims, ("params", "preceding", "bias"),
                                    "channel count"))
    return errors


def _values_errors(values: Any, shape: tuple[int, ...], loc: Loc) -> Problems:
    """A `values:` or `random:` entry: exactly one of them, and values that fill `shape`."""
    if (values.values is None) == (values.random is None):
        return [(loc, "give exactly one of `values` and `random`")]
    if values.values is not None:
        return _check_values(values.values, shape, (*loc, "values"), "input shape" if "upstream" in loc
                             else "shape")
    return []


def _axis_errors(case: Case, shapes: list[tuple[int, ...]], base: Loc) -> Problems:
    errors: Problems = []
    rank = len(shapes[0])
    axes = case.params.axes
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
    return errors
