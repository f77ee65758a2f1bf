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
from conformance.loader import load_one
from conformance.outputs import CHECKS, outputs_of
from conformance.schema import Case


def nested(array: np.ndarray) -> CommentedSeq | float:
    """Nested lists, the innermost in flow style: one row of numbers per line."""
    if array.ndim == 0:
        return float(array)
    seq = CommentedSeq(nested(a) for a in array)
    if array.ndim == 1:
        seq.fa.set_flow_style()
    return seq


def expected_values(case: Case) -> dict[tuple[str, ...], dict[str, np.ndarray]]:
    """Mapping path (inside the case) -> expected fields, for every check the case has."""
    out: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    if case.expect_error:
        return out
    for check in case.checks:
        computed = reference.outputs(problems.build(case, check), check)
        out[CHECKS[check].expected_at] = {o.name: computed[o.name] for o in outputs_of(check)
                                          if o.exists(case.params)}
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
