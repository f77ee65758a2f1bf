"""Known divergences as rules: adapters/known/<family>.yaml.

A rule says which adapters, under which conditions on the case, depart from the canonical
convention in which named way (a variant of `conformance.variants`), with a reason and a link to
the framework's source line or upstream issue. It is never a list of case ids alone: a case a user
writes is recognised by the same rule. A failing check under a rule whose variant explains the
measurement is `known`; under a rule whose variant does not, `fail` (the framework now diverges
another way); a passing check stays `pass`. See docs/case-format.md, "Known divergences".
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from adapters.base import FEATURES, Adapter
from conformance import ROOT
from conformance.outputs import CHECKS
from conformance.problem import build
from conformance.schema import Case, Params
from conformance.variants import CATALOGUE, zero_variance

KNOWN_DIR = ROOT / "adapters" / "known"


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


class When(BaseModel):
    """Conditions on the case; every one given must hold. A list means any of its values."""

    model_config = ConfigDict(extra="forbid")

    dtype: str | list[str] | None = None
    rank: int | list[int] | None = None
    tags: list[str] | None = None  # the case has every one of these tags
    ids: list[str] | None = None  # for a divergence only some inputs show (say why in the reason)
    params: dict[str, Any] | None = None  # param name -> value or list of values
    steps: int | list[int] | None = None
    multi_step: bool | None = None  # more than one training step
    values_per_channel: int | list[int] | None = None  # of the smallest batch (or shard) fed: 1 = one row
    channels: int | list[int] | None = None  # how many channels (the product of the channel dims)
    features: list[str] | None = None  # the case uses every one of these optional features (FEATURES)
    # a check normalizes a channel whose var + eps is 0 with more than one value: 0/0 under rounding
    # (variants.zero_variance; problem.undetermined says what is accepted there)
    zero_variance: bool | None = None
    # where the adapter ran, as its results' environment records it: a device ("cpu", "cuda") and
    # package versions as PEP 440 specifiers ({torch: "<2.13"}), for a divergence of one platform
    # or release (as PyTorch's DecorateInfo keys a known failure by device and dtype)
    device: str | list[str] | None = None
    versions: dict[str, str] | None = None

    @staticmethod
    def channel_count(case: Case) -> int:
        shape = case.tensors[0].shape
        axes = case.params.axes
        return math.prod(shape[a % len(shape)] for a in axes)

    @staticmethod
    def smallest_count(case: Case) -> int:
        """Values per channel of the smallest batch one layer normalizes: with unsynchronized
        replicas that is the smallest shard (n // count rows, as numpy.array_split cuts them)."""
        axes = case.params.axes
        replicas = case.params.replicas
        split = replicas.count if replicas is not None and not replicas.synchronized else 1
        counts = [math.prod(s // split if d == 0 else s for d, s in enumerate(t.shape)
                            if d not in {a % len(t.shape) for a in axes})
                  for t in case.tensors]
        return min(counts)

    @field_validator("features")
    @classmethod
    def _feature_names(cls, names: list[str] | None) -> list[str] | None:
        unknown = sorted(set(names or []) - set(FEATURES))
        if unknown:
            raise ValueError(f"unknown feature {unknown[0]!r} ({', '.join(FEATURES)})")
        return names

    @field_validator("versions")
    @classmethod
    def _specifiers(cls, versions: dict[str, str] | None) -> dict[str, str] | None:
        for package, spec in (versions or {}).items():
            try:
                SpecifierSet(spec)
            except InvalidSpecifier:
                raise ValueError(f"{package}: {spec!r} is not a version specifier (say \"<2.13\")") from None
        return versions

    def suits(self, device: str, versions: dict[str, str]) -> bool:
        """The conditions on where the adapter ran hold: its device and package versions."""
        wanted = (self.versions or {}).items()
        return ((self.device is None or device in _listed(self.device))
                and all(_version_in(versions.get(package), spec) for package, spec in wanted))

    @field_validator("params")
    @classmethod
    def _param_names(cls, params: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = sorted(set(params or {}) - set(Params.model_fields))
        if unknown:
            raise ValueError(f"unknown param {unknown[0]!r} ({', '.join(Params.model_fields)})")
        return params

    def holds(self, case: Case) -> bool:
        rank = len(case.tensors[0].shape)
        params = case.params.model_dump()
        checks = [
            self.dtype is None or case.dtype in _listed(self.dtype),
            self.rank is None or rank in _listed(self.rank),
            self.tags is None or set(self.tags) <= set(case.tags),
            self.ids is None or case.id in self.ids,
            self.steps is None or case.steps in _listed(self.steps),
            self.multi_step is None or (case.steps > 1) == self.multi_step,
            self.values_per_channel is None or self.smallest_count(case) in _listed(self.values_per_channel),
            self.channels is None or self.channel_count(case) in _listed(self.channels),
            self.params is None or all(params.get(k) in _listed(v) for k, v in self.params.items()),
            self.features is None or set(self.features) <= set(build(case, case.checks[0]).features()),
            self.zero_variance is None or self.zero_variance == case.memo(("zero-variance",), lambda: any(
                zero_variance(build(case, check), check) is not None for check in case.checks)),
        ]
        return all(checks)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapters: list[str] = Field(min_length=1)
    when: When = When()
    checks: list[str] = list(CHECKS)
    explained_by: str
    reason: str = Field(min_length=1)
    link: str = Field(pattern=r"^https?://")
    source: str = ""  # file:line, filled by the loader

    @field_validator("explained_by")
    @classmethod
    def _a_variant(cls, name: str) -> str:
        if name not in CATALOGUE:
            raise ValueError(f"{name!r} is not a variant of the catalogue ({', '.join(CATALOGUE)})")
        return name

    @field_validator("checks")
    @classmethod
    def _checks(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in CHECKS]
        if unknown:
            raise ValueError(f"unknown check {unknown[0]!r} ({', '.join(CHECKS)})")
        return names

    def covers(self, adapter: Adapter, case: Case, check: str) -> bool:
        return self.reachable_by(adapter) and check in self.checks and self.when.holds(case)

    def reachable_by(self, adapter: Adapter) -> bool:
        """The rule names this adapter and its device and versions (a CUDA rule on a CPU run, a
        rule for another release: never)."""
        return adapter.id in self.adapters and self.when.suits(*runtime(adapter))


@dataclass
class Rules:
    rules: list[Rule]

    def for_check(self, adapter: Adapter, case: Case, check: str) -> list[Rule]:
        return [r for r in self.rules if r.covers(adapter, case, check)]


def _version_in(version: str | None, spec: str) -> bool:
    try:
        return version is not None and Version(version) in SpecifierSet(spec)
    except InvalidVersion:
        return False


@functools.cache
def runtime(adapter: Adapter) -> tuple[str, dict[str, str]]:
    """The adapter's device and versions, asked once (versions() can start a compiler)."""
    return adapter.device(), adapter.versions()


def load(folder: Path = KNOWN_DIR) -> Rules:
    """Every rule under `folder`; a malformed one is an error naming its file and line."""
    rules = []
    for path in sorted(folder.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        try:
            node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            entries = yaml.safe_load(text) or []
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        lines = [item.start_mark.line + 1 for item in node.value] if node is not None else []
        for raw, line in zip(entries, lines, strict=True):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
            try:
                rules.append(Rule.model_validate({**raw, "source": where}))
            except (ValidationError, TypeError) as exc:
                raise ValueError(f"{where}: {exc}") from exc
    return Rules(rules)
