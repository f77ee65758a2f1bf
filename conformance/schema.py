"""The case format as pydantic models, and the JSON Schema published from them (cases/schema.json).

The `expected` mappings are generated from `conformance.outputs`, so an output is declared once.
`docs/case-format.md` documents every field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model

from conformance.outputs import CHECKS, outputs_of


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class RandomSpec(Strict):
    """Values drawn with numpy.random.default_rng(seed), then rounded to the case dtype."""

    seed: int = Field(ge=0)  # numpy's default_rng refuses a negative seed
    distribution: Literal["normal", "uniform"] = "normal"
    mean: float = 0.0  # normal
    std: float = Field(1.0, ge=0.0)
    low: float = -1.0  # uniform
    high: float = 1.0


class Values(Strict):
    """Values given inline or drawn at random; the shape comes from the tensor or the input."""

    values: list[Any] | None = None  # nested lists, or a flat list in C order
    random: RandomSpec | None = None


class Tensor(Values):
    shape: list[Annotated[int, Field(ge=0)]]


class Renorm(Strict):
    """Batch renormalization (Ioffe 2017): training multiplies the normalized values by r and adds d,
    r = clip(sigma_B / sigma_r, rmin, rmax), d = clip((mu_B - mu_r) / sigma_r, -dmax, dmax), against
    renorm statistics mu_r, sigma_r that start at moving_mean, sqrt(moving_variance) and decay with
    `momentum`. A clip left out is not applied (Keras's default: no clipping)."""

    momentum: float = Field(0.99, ge=0.0, le=1.0)  # decay form, as params.momentum
    rmax: float | None = Field(None, gt=0.0)
    rmin: float | None = Field(None, ge=0.0)
    dmax: float | None = Field(None, ge=0.0)


class Adjustment(Strict):
    """tf.layers `adjustment`: in training the normalized values become xhat*scale + bias, before
    gamma and beta. Per channel; scale defaults to ones, bias to zeros."""

    scale: list[Any] | None = None
    bias: list[Any] | None = None


class Preceding(Strict):
    """A per-position linear map over the channels before BN (a 1x1 convolution or a dense layer):
    z[..., o] = sum_i weight[o][i] * x[..., i] + bias[o] along the channel axis. Square (C x C,
    out x in as torch's Conv/Linear hold it), so outputs keep the input's shape."""

    weight: list[Any]
    bias: list[Any] | None = None  # default zeros


class Replicas(Strict):
    """Data-parallel training: the batch split into `count` consecutive shards on axis 0."""

    count: int = Field(ge=1, le=64)
    synchronized: bool  # statistics of the whole batch (sync BN), or of each replica's shard


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
    # optional features (docs/case-format.md, "Renorm, ghost batches, adjustment, running statistics")
    renorm: Renorm | None = None
    virtual_batch_size: int | None = Field(None, ge=1)  # ghost BN over consecutive samples on axis 0
    adjustment: Adjustment | None = None
    track_running_stats: bool = True  # false: no moving statistics; inference uses batch statistics
    preceding: Preceding | None = None  # a layer exporters fold BN into (docs/case-format.md)
    # mixed precision: the dtype gamma, beta and the moving statistics are held in; null = `dtype`
    param_dtype: Literal["float16", "bfloat16", "float32", "float64"] | None = None
    replicas: Replicas | None = None  # data-parallel training (docs/case-format.md)

    @property
    def axes(self) -> list[int]:
        """The channel axes as a list, however the case wrote them."""
        return self.axis if isinstance(self.axis, list) else [self.axis]


def _expected_model(check: str, name: str) -> type[Strict]:
    fields: dict[str, Any] = {o.name: (list[Any] | None, Field(None, description=o.description))
                              for o in outputs_of(check)}
    return create_model(name, __base__=Strict, __doc__=CHECKS[check].description, **fields)


TrainingExpected = _expected_model("training", "TrainingExpected")
GradientExpected = _expected_model("gradients", "GradientExpected")
InferenceExpected = _expected_model("inference", "InferenceExpected")


class GradientSpec(Strict):
    upstream: Values  # dL/dy, shaped like the (last) input
    expected: GradientExpected = GradientExpected()  # type: ignore[valid-type]


class Training(Strict):
    steps: int | None = Field(None, ge=1, le=1000)  # default: one step per batch
    expected: TrainingExpected = TrainingExpected()  # type: ignore[valid-type]
    gradients: GradientSpec | None = None


class Inference(Strict):
    expected: InferenceExpected = InferenceExpected()  # type: ignore[valid-type]


class ToleranceOverride(Strict):
    """A case's own rtol/atol, replacing the dtype default; the reason is shown in the report."""

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
    tolerance: ToleranceOverride | None = None
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
        """The checks this case asks for, in `CHECKS` order."""
        return [name for name, info in CHECKS.items() if self.section(info.expected_at[:-1]) is not None]

    def section(self, path: tuple[str, ...]) -> Any:
        """The model at a path of field names (None where a part is absent)."""
        node: Any = self
        for part in path:
            node = getattr(node, part, None)
            if node is None:
                return None
        return node

    def given(self, check: str) -> dict[str, Any]:
        """The expected fields the case gives for a check, as written (nested lists)."""
        expected = self.section(CHECKS[check].expected_at)
        return {} if expected is None else {k: v for k, v in expected if v is not None}


def schema_text() -> str:
    schema = Case.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "bnconform case"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"

