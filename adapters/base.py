"""The contract between the harness and every adapter.

The harness resolves a YAML case into a `Problem`: plain float64 NumPy arrays whose values are
already representable in the case dtype, and parameters in the canonical convention (decay-form
momentum, epsilon inside the square root, channel axes as given). An adapter translates that into
one framework API, runs it, and hands back float64 arrays. It never compares anything itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

Check = Literal["training", "inference", "gradients"]
VarianceEstimator = Literal["biased", "unbiased"]


class NotExpressible(Exception):
    """The API cannot state this case (several channel axes in torch, say); the reason is reported."""


@dataclass(frozen=True)
class Problem:
    """One case, resolved to arrays, as an adapter receives it."""

    case_id: str
    dtype: str  # float16 | bfloat16 | float32 | float64
    batches: tuple[np.ndarray, ...]  # one per training step (a single one for inference)
    axes: tuple[int, ...]  # channel axes exactly as the case gives them (may be out of range)
    momentum: float | None  # decay form: moving = m*moving + (1-m)*batch; None = cumulative
    epsilon: float
    center: bool
    scale: bool
    gamma: np.ndarray  # shaped like the channel dims; ones when scale is off
    beta: np.ndarray  # zeros when center is off
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    upstream: np.ndarray | None = None  # dL/dy of the last step, for gradients
    infer_after_training: bool = False  # also run inference on the last batch after training

    @property
    def rank(self) -> int:
        return self.batches[0].ndim

    @property
    def channel_axes(self) -> tuple[int, ...]:
        """Non-negative channel axes; raises IndexError when an axis is out of range."""
        rank = self.rank
        out = []
        for a in self.axes:
            if not -rank <= a < rank:
                raise IndexError(f"axis {a} is out of range for a rank-{rank} input")
            out.append(a % rank)
        return tuple(out)


@dataclass
class TrainingRun:
    """What a framework produced after the training steps. None = the API does not expose it."""

    output: np.ndarray
    moving_mean: np.ndarray | None
    moving_variance: np.ndarray | None
    batch_mean: np.ndarray | None = None
    batch_variance: np.ndarray | None = None
    inference_output: np.ndarray | None = None


@dataclass
class Gradients:
    input: np.ndarray
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None


@dataclass
class Conventions:
    """What the framework does that no parameter changes, declared as data and checked by measuring."""

    moving_variance_estimator: VarianceEstimator
    batch_variance_estimator: VarianceEstimator = "biased"  # of the batch_variance it reports
    notes: list[str] = field(default_factory=list)


@dataclass
class Observed:
    """What a default layer returned from one call, for the semantic probes."""

    output: np.ndarray  # float64
    output_dtype: str  # the framework's own dtype name, e.g. "float16"
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    stats_dtype: str


class DefaultLayer(ABC):
    """A layer built the way a user who passes nothing but what the API requires builds it.

    The semantic probes call it on their own inputs and read its state; they never tell it
    the canonical parameters, so what they measure is the API's defaults."""

    @abstractmethod
    def call(self, x: np.ndarray, mode: Check | None) -> Observed:
        """Run on x (values representable in the layer's dtype). mode None: call with no mode
        argument at all, as a fresh layer is called; "training": the API's training switch and
        nothing more (no extra update step: `stats_update_without_extra_step` measures that)."""

    def train_step(self, x: np.ndarray) -> Observed:
        """One training step done the way the API's documentation prescribes (TF1 layers: with
        the UPDATE_OPS dependency). For most APIs that is the plain training call."""
        return self.call(x, "training")


class Adapter(ABC):
    """One way of running BN in one framework. Subclasses read like that API's own documentation."""

    id: ClassVar[str]
    family: ClassVar[str]
    conventions: ClassVar[Conventions]

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the packages this adapter drives."""

    def conventions_for(self, problem: Problem) -> Conventions:
        """The conventions this problem runs under, where the API picks a kernel by input
        (tf_keras with fused=None: the fused kernel on 4-D/5-D input, the unfused one otherwise)."""
        return self.conventions

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        """Why this API cannot state the case, or None when it can."""
        return None

    def translations(self, problem: Problem) -> list[str]:
        """Human-readable list of how the canonical parameters were mapped to this API."""
        return []

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        """A layer with the API's defaults for an input of `shape` (channel count as the API
        expects it). Raise NotExpressible where the API has no such layer or flag (trainable)."""
        raise NotExpressible(f"{self.id} has no default-layer probe hook")

    @abstractmethod
    def train(self, problem: Problem) -> TrainingRun: ...

    @abstractmethod
    def infer(self, problem: Problem) -> np.ndarray: ...

    @abstractmethod
    def gradients(self, problem: Problem) -> Gradients: ...

    def device(self) -> str:
        """Where the framework ran the computation."""
        return "cpu"


def channels_first_permutation(rank: int, channel_axis: int) -> tuple[int, ...]:
    """Transpose that puts `channel_axis` at dim 1 (others keep their order): for APIs that
    normalize over dim 1 only. Its inverse is `np.argsort(perm)`."""
    others = [d for d in range(rank) if d != channel_axis]
    return (others[0], channel_axis, *others[1:])
