"""The contract between the harness and every adapter.

The harness resolves a YAML case into a `Problem`: plain float64 NumPy arrays whose values are
already representable in the case dtype, and parameters in the canonical convention (decay-form
momentum, epsilon inside the square root, channel axes as given). An adapter translates that into
one framework API, runs it, and hands back float64 arrays. It never compares anything itself.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import numpy as np

Check = Literal["training", "inference", "gradients"]
DTYPES = ("float16", "bfloat16", "float32", "float64")
CHECKS: tuple[Check, ...] = ("training", "inference", "gradients")

# Optional case features: an adapter runs a case that uses one only if it declares it (see
# `Capabilities`). A Problem field added for a new BN parameter carries `metadata={"feature": name}`
# and is listed here, so an adapter that does not know it reports the case not expressible instead
# of running plain BN.
FEATURES: dict[str, str] = {
    "multi-axis": "several channel axes",
    "momentum-null": "momentum null (a cumulative average)",
    # batch renormalization, ghost batches, tf.layers adjustment, no moving statistics
    "renorm": "batch renormalization (renorm)",
    "ghost-batches": "ghost batches (virtual_batch_size)",
    "adjustment": "an adjustment of the normalized values in training",
    "no-running-stats": "no moving statistics (track_running_stats false)",
    "preceding": "a preceding 1x1 convolution / dense layer (params.preceding)",
    "param-dtype": "gamma, beta and moving statistics in a dtype other than the input's (mixed precision)",
    "replicas": "data-parallel replicas (params.replicas)",
}


# The canonical parameters and state an adapter's `names` spell in its API's own words.
NAMES = ("momentum", "epsilon", "axis", "center", "scale", "gamma", "beta", "moving_mean",
         "moving_variance", "mode")


# `--device` (pytest and `python -m conformance run`) reaches the adapters through this variable, set
# before any framework is imported. The torch and JAX families honour it; the others run where their
# framework puts them and report that from `Adapter.device()`.
DEVICE_VARIABLE = "BNCONFORM_DEVICE"
DEVICES = ("cpu", "cuda", "gpu")  # gpu: the same as cuda


# What a process spent inside its frameworks, beside its wall time: the setup of a framework adds
# its own figures (adapters/jax_setup.py: XLA compilations and cache loads), and the results file
# records them, so a slow family shows whether compiling or computing took its time.
PROCESS_COSTS: dict[str, float] = {}


def requested_device() -> str:
    """The device the run asked for: "cpu" (the default) or "cuda" ("gpu" is read as "cuda")."""
    device = os.environ.get(DEVICE_VARIABLE, "cpu").strip().lower() or "cpu"
    if device not in DEVICES:
        raise ValueError(f"{DEVICE_VARIABLE}={device!r}: use one of {', '.join(DEVICES)}")
    return "cuda" if device == "gpu" else device


class NotExpressible(Exception):
    """The API cannot state this case (several channel axes in torch, say); the reason is reported."""


@dataclass(frozen=True, eq=False)
class Preceding:
    """A per-position linear map over the one channel axis before BN (a 1x1 convolution or a dense
    layer), the layer exporters fold BN into: z[..., o] = sum_i weight[o, i] * x[..., i] + bias[o].
    `weight` is (out, in) = (C, C), as torch's Conv/Linear hold it; values are in the case dtype."""

    weight: np.ndarray
    bias: np.ndarray

    def apply(self, x: np.ndarray, axis: int) -> np.ndarray:
        """The layer's output in float64 (the reference's), channel axis `axis` (non-negative)."""
        return np.moveaxis(_sum_of_products(np.moveaxis(x, axis, -1), self.weight) + self.bias, -1, axis)

    def absolute(self) -> Preceding:
        """The layer of |W| and |b|: its output on |x| bounds |z| element for element."""
        return Preceding(np.abs(self.weight), np.abs(self.bias))

    def transpose_apply(self, dz: np.ndarray, axis: int) -> np.ndarray:
        """dL/dx from dL/dz: the weight transposed, no bias."""
        return np.moveaxis(_sum_of_products(np.moveaxis(dz, axis, -1), self.weight.T), -1, axis)


def _sum_of_products(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x @ weight.T over the last axis, summed in input-channel order at every position alike, so
    equal inputs give equal outputs (as exact arithmetic does): a BLAS matmul's blocking rounds
    positions differently, and 27 positions of 3.2 through one row of fuzz case 164cc707 gave two
    float64 values, a variance of 1.6e-30 for a channel every framework sees constant (0/0)."""
    out = np.zeros((*x.shape[:-1], weight.shape[0]))
    for i in range(weight.shape[1]):
        out = out + x[..., i : i + 1] * weight[:, i]
    return out


@dataclass(frozen=True)
class Renorm:
    """Batch renormalization's settings (canonical semantics in conformance/reference.py)."""

    momentum: float  # decay form, for the renorm mean and standard deviation
    rmax: float | None = None  # None: that side is not clipped
    rmin: float | None = None
    dmax: float | None = None


@dataclass(frozen=True)
class Adjustment:
    """tf.layers `adjustment`: training output gamma * (xhat * scale + bias) + beta."""

    scale: np.ndarray  # shaped like the channel dims
    bias: np.ndarray


@dataclass(frozen=True)
class Replicas:
    """Data-parallel training: the batch split into `count` consecutive shards on axis 0 (the first
    N mod count shards one sample larger, as numpy.array_split), one per replica. `synchronized`:
    every replica normalizes with the whole batch's statistics; otherwise each with its shard's."""

    count: int
    synchronized: bool

    def slices(self, n: int) -> list[slice]:
        """The rows of each replica's shard of n rows: consecutive, the first n mod count one larger."""
        size, larger = divmod(n, self.count)
        starts = [i * size + min(i, larger) for i in range(self.count + 1)]
        return [slice(a, b) for a, b in itertools.pairwise(starts)]

    def shards(self, x: np.ndarray) -> list[np.ndarray]:
        """The consecutive shards of a batch, one per replica."""
        return [x[s] for s in self.slices(x.shape[0])]


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
    # optional features: an adapter that does not declare one reports the case not expressible
    renorm: Renorm | None = field(default=None, metadata={"feature": "renorm"})
    virtual_batch_size: int | None = field(default=None, metadata={"feature": "ghost-batches"})
    adjustment: Adjustment | None = field(default=None, metadata={"feature": "adjustment"})
    track_running_stats: bool = field(default=True, metadata={"feature": "no-running-stats"})
    # the layer before BN; batches are its input. Adapters run it too, or do not declare the feature
    preceding: Preceding | None = field(default=None, metadata={"feature": "preceding"})
    # mixed precision: the dtype of gamma, beta and the moving statistics when it is not `dtype`
    # (None: the same as the input); their values above are representable in it
    param_dtype: str | None = field(default=None, metadata={"feature": "param-dtype"})

    @property
    def params_dtype(self) -> str:
        """The dtype gamma, beta and the moving statistics are held in."""
        return self.param_dtype or self.dtype
    # data-parallel replicas; None: one device, as every ordinary case
    replicas: Replicas | None = field(default=None, metadata={"feature": "replicas"})

    @property
    def rank(self) -> int:
        return self.batches[0].ndim

    @property
    def axes_in_range(self) -> bool:
        return all(-self.rank <= a < self.rank for a in self.axes)

    def features(self) -> list[str]:
        """The optional features (keys of FEATURES) this problem uses."""
        used = []
        if len(self.axes) > 1:
            used.append("multi-axis")
        if self.momentum is None:
            used.append("momentum-null")
        for f in fields(self):
            name = f.metadata.get("feature")
            if name and getattr(self, f.name) != f.default:
                used.append(name)
        return used

    def to_ascending(self, per_channel: np.ndarray) -> np.ndarray:
        """Per-channel values from the case's axis order to ascending axes (the input's order)."""
        return to_ascending(per_channel, self.channel_axes)

    def to_case_order(self, values: np.ndarray) -> np.ndarray:
        """Per-channel values an API holds in ascending-axis order (any shape with the right size)
        back in the case's channel shape and axis order."""
        ascending = sorted(self.channel_axes)
        sizes = [self.batches[0].shape[a] for a in ascending]
        return to_case_order(np.asarray(values).reshape(sizes), self.channel_axes)

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

    output: np.ndarray | None  # None: an exported inference-only artefact has no training output
    moving_mean: np.ndarray | None
    moving_variance: np.ndarray | None
    batch_mean: np.ndarray | None = None
    batch_variance: np.ndarray | None = None
    inference_output: np.ndarray | None = None
    renorm_mean: np.ndarray | None = None  # renorm's own moving statistics (renorm cases)
    renorm_stddev: np.ndarray | None = None


@dataclass
class Gradients:
    input: np.ndarray
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None


@dataclass(frozen=True)
class Capabilities:
    """What an API can state, declared as data next to its adapter (like PyTorch's ModuleInfo). The
    runner reports a case needing anything else as not expressible, with a reason made from
    `why`, before the adapter is called. Rules that depend on values (torch rejects eps 0 in
    training) stay in `Adapter.not_expressible`."""

    dtypes: frozenset[str] = frozenset(DTYPES)
    checks: frozenset[str] = frozenset(CHECKS)
    min_rank: int = 1
    max_rank: int | None = None
    features: frozenset[str] = frozenset()  # optional FEATURES the API supports
    why: dict[str, str] = field(default_factory=dict)  # the API's reason, per dtype, check or feature

    def missing(self, problem: Problem, check: str) -> str | None:
        """Why the API cannot state this problem, or None."""
        unsupported = [(problem.dtype, f"dtype {problem.dtype}")] if problem.dtype not in self.dtypes else []
        if check not in self.checks:
            unsupported.append((check, f"the {check} check"))
        if problem.rank < self.min_rank or (self.max_rank is not None and problem.rank > self.max_rank):
            upper = "" if self.max_rank is None else f" to {self.max_rank}"
            unsupported.append(("rank", f"rank {problem.rank} (takes {self.min_rank}{upper})"))
        unsupported += [(f, FEATURES.get(f, f)) for f in problem.features() if f not in self.features]
        if not unsupported:
            return None
        key, what = unsupported[0]
        return f"{what}: {self.why[key]}" if key in self.why else f"{what} is not supported"


@dataclass(frozen=True)
class Conventions:
    """What the framework does that no parameter changes, as variant names from the conventions
    catalogue (`conformance/variants.py`). Expected values are computed under them, so a wrong
    declaration fails, and the diagnosis names the variant the measurement follows instead.
    Declare only conventions that hold for every input the adapter runs, simulated exactly in
    float64 (an estimator, not a rounding effect); rounding effects are known-divergence rules."""

    variants: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


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
    capabilities: ClassVar[Capabilities] = Capabilities()
    # The API's own spelling of each canonical parameter and piece of state, keyed by NAMES, as a
    # user types it: what `python -m conformance port` lines up between two adapters.
    names: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the packages this adapter drives."""

    def conventions_for(self, problem: Problem) -> Conventions:
        """The conventions this problem runs under, where the API picks a kernel by input
        (tf_keras with fused=None: the fused kernel on 4-D/5-D input, the unfused one otherwise)."""
        return self.conventions

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        """A rule that depends on values rather than on `capabilities` (torch refuses eps 0 in
        training): why this API cannot state the case, or None. Callers use `why_not_expressible`."""
        return None

    def why_not_expressible(self, problem: Problem, check: Check) -> str | None:
        """Capabilities first, then the value rules: the one place that decides."""
        return self.capabilities.missing(problem, check) or self.not_expressible(problem, check)

    def translations(self, problem: Problem) -> list[str]:
        """Human-readable list of how the canonical parameters were mapped to this API."""
        return []

    def default_layer(self, shape: tuple[int, ...], dtype: str = "float32",
                      trainable: bool = True) -> DefaultLayer:
        """A layer with the API's defaults for an input of `shape` (channel count as the API
        expects it). Raise NotExpressible where the API has no such layer or flag (trainable)."""
        raise NotExpressible(f"{self.id} has no default-layer probe hook")

    def feature_layer(self, shape: tuple[int, ...], arguments: dict) -> DefaultLayer:
        """A default layer with the API's own arguments for an optional feature added and nothing
        else (`{"renorm": True}`, `{"virtual_batch_size": 2}`), for the probes that measure what
        those arguments default to and do. Raise NotExpressible where the API has no such argument."""
        raise NotExpressible(f"{self.id} has no argument {', '.join(arguments)}")

    @abstractmethod
    def train(self, problem: Problem) -> TrainingRun: ...

    @abstractmethod
    def infer(self, problem: Problem) -> np.ndarray: ...

    @abstractmethod
    def gradients(self, problem: Problem) -> Gradients: ...

    def device(self) -> str:
        """Where the framework ran the computation."""
        return "cpu"


# Capabilities.why entries every data-parallel replica adapter shares (params.replicas cases only)
REPLICA_WHY = {"gradients": "gradients across replicas are not part of the case format",
               "rank": "axis 0 is split across replicas and another axis holds the channels"}


def no_such_argument(api: str, features: tuple[str, ...] = ("renorm", "ghost-batches", "adjustment",
                                                            "no-running-stats")) -> dict[str, str]:
    """`Capabilities.why` entries for features an API has no argument for."""
    names = {"renorm": "renorm", "ghost-batches": "virtual_batch_size", "adjustment": "adjustment",
             "no-running-stats": "track_running_stats"}
    return {f: f"{api} has no {names[f]} argument (or an equivalent)" for f in features}


def configuration(problem: Problem) -> tuple:
    """What a layer (or a graph) is built from, not the state loaded into it nor the batches fed:
    the key under which an adapter keeps a built layer for the checks and cases that share it."""
    adjustment, preceding = problem.adjustment, problem.preceding
    return (problem.dtype, problem.param_dtype, problem.rank, problem.axes, problem.gamma.shape,
            problem.momentum, problem.epsilon, problem.center, problem.scale, problem.renorm,
            problem.virtual_batch_size, problem.track_running_stats, problem.replicas,
            None if adjustment is None else (adjustment.scale.tobytes(), adjustment.bias.tobytes()),
            None if preceding is None else (preceding.weight.tobytes(), preceding.bias.tobytes()))


def keras_renorm_arguments(problem: Problem) -> dict[str, Any]:
    """renorm as the Keras family spells it (tf_keras, tf.compat.v1.layers and Keras 3 alike):
    `renorm`, `renorm_momentum`, and `renorm_clipping` with only the clips the case gives."""
    if problem.renorm is None:
        return {}
    r = problem.renorm
    return {"renorm": True, "renorm_momentum": r.momentum, "renorm_clipping": {
        k: v for k, v in (("rmax", r.rmax), ("rmin", r.rmin), ("dmax", r.dmax)) if v is not None}}


def keras_renorm_translations(problem: Problem, assigned: str = "assigned") -> list[str]:
    """The translation line for `keras_renorm_arguments`, with how the renorm variables got their
    values (`assigned` eagerly, or `loaded` through a graph's assign ops)."""
    if problem.renorm is None:
        return []
    args = keras_renorm_arguments(problem)
    return [f"renorm -> renorm=True, renorm_momentum={args['renorm_momentum']:g}, "
            f"renorm_clipping={args['renorm_clipping']}; renorm_mean, renorm_stddev and moving_stddev "
            f"{assigned} moving_mean, sqrt(moving_variance), sqrt(moving_variance)"]


def broadcast_to_input(per_channel: np.ndarray, problem: Problem) -> np.ndarray:
    """Per-channel values (case axis order) shaped to broadcast against the input (sizes at the
    channel axes, 1 elsewhere), for APIs that take such a tensor (tf.layers `adjustment`)."""
    ascending = to_ascending(per_channel, problem.channel_axes)
    shape = [1] * problem.rank
    for axis, size in zip(sorted(problem.channel_axes), ascending.shape, strict=True):
        shape[axis] = size
    return ascending.reshape(shape)


def channels_first_permutation(rank: int, channel_axis: int) -> list[int]:
    """Transpose that puts `channel_axis` at dim 1 (others keep their order), for APIs that
    normalize over dim 1 only. Its inverse is `np.argsort(perm)`. A negative axis gets the rank
    added once; one still out of range stays in the perm, for the framework to reject."""
    axis = channel_axis + rank if channel_axis < 0 else channel_axis
    others = [d for d in range(rank) if d != axis]
    return [others[0], axis, *others[1:]]


def to_ascending(per_channel: np.ndarray, channel_axes: tuple[int, ...]) -> np.ndarray:
    """Per-channel values from the case's axis order (non-negative `channel_axes`) to ascending axes."""
    return np.transpose(per_channel, _argsort(channel_axes))


def to_case_order(ascending: np.ndarray, channel_axes: tuple[int, ...]) -> np.ndarray:
    """The inverse of `to_ascending`."""
    return np.transpose(ascending, _argsort(_argsort(channel_axes)))


def _argsort(values: Sequence[int]) -> list[int]:
    """np.argsort of a few ints, without its cost per call (the diagnosis makes ~100,000 such calls
    per 1,000 cases)."""
    return sorted(range(len(values)), key=values.__getitem__)
