"""Every check and every expected output, declared once.

The case model (`schema`), shape validation (`validate`), `fill`, the expected arrays (`problem`),
the reference hookup and the comparison loop (`evaluate`) all read these two tables: adding an
output is one `Output(...)` line plus the reference formula that computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from adapters.base import CHECKS as CHECK_NAMES
from adapters.base import Check

ShapeKind = Literal["input", "channels"]  # like the (last) input fed, or like the channel dims
# the dtype an output is held in, for its tolerance under mixed precision (`params.param_dtype`):
# the input's, the parameters' (gamma, beta, moving statistics), or the coarser of the two
HeldIn = Literal["input", "params", "both"]


Batches = Literal["every-step", "last-fed", "last-listed"]


@dataclass(frozen=True)
class CheckInfo:
    name: Check
    expected_at: tuple[str, ...]  # where the check's `expected` mapping sits in a case file
    description: str
    method: str  # the Adapter method that runs it (its result is the outputs by name)
    batches: Batches  # what the problem feeds: every training step's batch, or one batch


CHECKS: dict[str, CheckInfo] = {c.name: c for c in (
    CheckInfo("training", ("training", "expected"),
              "training steps: one per batch fed (cycling when `training.steps` is larger)",
              "train", "every-step"),
    CheckInfo("gradients", ("training", "gradients", "expected"),
              "a training-mode forward of the last batch fed, then dL/dy = `upstream` backwards",
              "gradients", "last-fed"),
    CheckInfo("inference", ("inference", "expected"),
              "inference on the last batch with params.moving_mean / moving_variance",
              "infer", "last-listed"),
)}


assert set(CHECKS) == set(CHECK_NAMES), "adapters.base.CHECKS (what adapters may support) names them too"


def _always(params: Any) -> bool:
    return True


def _renorm(params: Any) -> bool:
    return params.renorm is not None


def _tracked(params: Any) -> bool:
    return bool(params.track_running_stats)


@dataclass(frozen=True)
class Output:
    check: Check
    name: str  # its key under the check's `expected`, and the reference's name for it
    shape: ShapeKind
    description: str
    # the expected value of `stands_for` under a named convention (moving_variance_unbiased is
    # moving_variance for an adapter that updates with the unbiased batch variance); never compared
    # on its own
    variant: str | None = None
    stands_for: str | None = None
    exists: Callable[[Any], bool] = _always  # given the case's params: does the output exist at all
    held_in: HeldIn = "input"

    @property
    def compared(self) -> bool:
        return self.stands_for is None

    @property
    def folded(self) -> bool:
        """With a preceding layer, an exporter computes this output as the folded layer W'·x + b',
        each channel from its own folded weights (compare.folded_tolerance): y of training and
        inference. dL/dx is not: Wᵀ·dL/dz mixes the channels."""
        return self.shape == "input" and self.check != "gradients"


OUTPUTS: tuple[Output, ...] = (
    Output("training", "output", "input", "y of the last step, normalized with the biased batch variance"),
    Output("training", "batch_mean", "channels", "mean of the last batch"),
    Output("training", "batch_variance", "channels", "biased (population) variance of the last batch"),
    Output("training", "moving_mean", "channels", "moving mean after the last step (only when "
           "track_running_stats is on)", exists=_tracked, held_in="params"),
    Output("training", "moving_variance", "channels", "moving variance, every update with the biased batch "
           "variance (only when track_running_stats is on)", exists=_tracked, held_in="params"),
    Output("training", "moving_variance_unbiased", "channels", "the moving variance when every update uses "
           "the Bessel-corrected (n/(n-1)) batch variance", variant="moving-variance-unbiased",
           stands_for="moving_variance", exists=_tracked, held_in="params"),
    Output("training", "renorm_mean", "channels", "renorm's moving mean (mu_r) after the last step "
           "(only with renorm)", exists=_renorm, held_in="params"),
    Output("training", "renorm_stddev", "channels", "renorm's moving standard deviation (sigma_r) after "
           "the last step (only with renorm)", exists=_renorm, held_in="params"),
    Output("training", "inference_output", "input", "inference on the last batch with the state after "
           "training; giving it asks adapters to run that inference", held_in="both"),
    Output("inference", "output", "input", "y with params.moving_mean and moving_variance"),
    Output("gradients", "input", "input", "dL/dx"),
    Output("gradients", "gamma", "channels", "dL/dgamma (only when scale is on)", exists=lambda p: p.scale,
           held_in="params"),
    Output("gradients", "beta", "channels", "dL/dbeta (only when center is on)", exists=lambda p: p.center,
           held_in="params"),
)


def outputs_of(check: str) -> tuple[Output, ...]:
    return tuple(o for o in OUTPUTS if o.check == check)


def alternatives(check: str, name: str) -> dict[str, str]:
    """variant name -> the case field holding `name`'s expected value under that variant."""
    return {o.variant: o.name for o in outputs_of(check) if o.stands_for == name and o.variant}
