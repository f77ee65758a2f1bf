"""`python -m conformance fill`: write a case's expected values from the float64 reference.

The file is rewritten with ruamel.yaml's round-trip mode, so key order, comments (the schema line,
hand derivations) and formatting elsewhere stay; only the `expected` mappings are replaced.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from conformance import problem as problems
from conformance import reference
from conformance.cases import Case, load_one


def nested(array: np.ndarray) -> CommentedSeq | float:
    """Nested lists, the innermost in flow style: one row of numbers per line."""
    if array.ndim == 0:
        return float(array)
    seq = CommentedSeq(nested(a) for a in array)
    if array.ndim == 1:
        seq.fa.set_flow_style()
    return seq


def expected_values(case: Case) -> dict[tuple[str, ...], dict[str, np.ndarray]]:
    """Mapping path (inside the case) -> expected fields, for every mode the case has."""
    out: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    if case.expect_error:
        return out
    if case.training is not None:
        r = reference.train(problems.build(case, "training"))
        out[("training", "expected")] = {name: getattr(r, name) for name in problems.TRAINING_FIELDS}
        if case.training.gradients is not None:
            g = reference.gradients(problems.build(case, "gradients"))
            fields = {"input": g["input"]}
            if case.params.scale:
                fields["gamma"] = g["gamma"]
            if case.params.center:
                fields["beta"] = g["beta"]
            out[("training", "gradients", "expected")] = fields
    if case.inference is not None:
        out[("inference", "expected")] = {"output": reference.infer(problems.build(case, "inference"))}
    return out


def fill_file(path: Path) -> int:
    """Fill every case in the file; returns how many expected fields were written."""
    loaded = load_one(path)  # raises CaseErrors with path:line messages when the file is invalid
    yaml = YAML()  # round-trip
    yaml.width = 100
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=2, offset=0)
    documents = list(yaml.load_all(path.read_text(encoding="utf-8")))
    written = 0
    for doc, case in zip(documents, (c.case for c in loaded), strict=True):
        for location, fields in expected_values(case).items():
            target = doc
            for key in location:
                if key not in target or target[key] is None:
                    target[key] = CommentedMap()
                target = target[key]
            for name, array in fields.items():
                target[name] = nested(array)
                written += 1
    buffer = io.StringIO()
    if len(documents) == 1:
        yaml.dump(documents[0], buffer)
    else:
        yaml.dump_all(documents, buffer)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return written
