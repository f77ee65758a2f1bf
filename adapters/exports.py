"""What the Keras-family export adapters (`keras_export.py`, `tf_export.py`) share: the artefact is a
channels-last model with a fixed batch dimension, converted after the source layer trained, and run
in inference form. No framework is imported here."""

from __future__ import annotations

import numpy as np

from adapters.base import Check, Problem


class ChannelsLastArtefact:
    """Mixed into an Adapter whose artefact normalizes the last axis of a fixed-size batch."""

    artefact = "exported model"  # what the adapter calls what it runs, in its reasons

    def not_expressible(self, problem: Problem, check: Check) -> str | None:
        if check == "training" and not problem.infer_after_training:
            return (f"the {self.artefact} is inference-only: the training check compares what it outputs "
                    "after the source trained (training.expected.inference_output), which this case "
                    "does not give")
        if any(x.size == 0 for x in problem.batches):
            return f"a {self.artefact} has a fixed, non-empty batch dimension"
        return None

    @staticmethod
    def layout_translations(problem: Problem) -> list[str]:
        """Momentum, epsilon, the channels-last layout, the preceding layer and the fixed batch."""
        out = [f"momentum {problem.momentum:g} -> momentum={problem.momentum:g} (same decay form)",
               f"epsilon {problem.epsilon:g} -> epsilon={problem.epsilon:g}"]
        axis = problem.axes[0]
        if axis not in (-1, problem.rank - 1):
            out.append(f"channel axis {axis} -> np.moveaxis({axis}, -1) before the model and back after")
        if problem.preceding is not None:
            kind = "Dense" if problem.rank == 2 else f"Conv{problem.rank - 2}D kernel 1"
            out.append(f"preceding -> {kind} with kernel = weight transposed, bias")
        out.append(f"batch dimension fixed to {problem.batches[-1].shape[0]}")
        return out

    @staticmethod
    def last(x: np.ndarray, problem: Problem) -> np.ndarray:
        """The case's input, channels last, as the float32 array the artefact takes."""
        return np.ascontiguousarray(np.moveaxis(x, problem.axes[0], -1), dtype=np.float32)

    @staticmethod
    def back(y: np.ndarray, problem: Problem) -> np.ndarray:
        return np.moveaxis(np.asarray(y, np.float64), -1, problem.axes[0])
