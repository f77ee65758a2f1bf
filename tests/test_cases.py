"""The loader: every error names path:line:column and the field; one bad file stops nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conformance.loader import load_file, load_folders
from conformance.schema import schema_text

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
id: good-case
title: a valid case
input:
  shape: [2, 3]
  values: [[1, 2, 3], [4, 5, 6]]
params:
  axis: 1
  gamma: [1, 2, 3]
training: {}
"""


def errors_of(write_case, text: str, name: str = "case.yaml"):
    cases, errors = load_file(write_case(name, text))
    assert not cases
    assert errors
    return errors


def test_a_valid_case_loads(write_case):
    cases, errors = load_file(write_case("ok.yaml", GOOD))
    assert not errors
    assert cases[0].case.id == "good-case"
    assert cases[0].case.checks == ["training"]


def test_yaml_syntax_error_has_line_and_column(write_case):
    [error] = errors_of(write_case, "id: x\nparams: {axis: 1\ntraining: {}\n")
    assert error.line >= 2 and "YAML syntax" in error.message
    assert str(error).startswith(f"{error.path}:{error.line}:{error.column}:")


def test_unknown_key_suggests_the_nearest(write_case):
    [error] = errors_of(write_case, GOOD.replace("  axis: 1", "  axis: 1\n  momentun: 0.9"))
    assert (error.line, error.field) == (8, "params.momentun")
    assert "did you mean 'momentum'" in error.message


def test_wrong_type_names_field_and_line(write_case):
    [error] = errors_of(write_case, GOOD.replace("  axis: 1", "  axis: first"))
    assert (error.line, error.field) == (7, "params.axis")


def test_value_count_must_match_shape(write_case):
    [error] = errors_of(write_case, GOOD.replace("[[1, 2, 3], [4, 5, 6]]", "[1, 2, 3, 4, 5]"))
    assert error.field == "input.values" and error.line == 5
    assert "5 values given" in error.message and "needs 6" in error.message


def test_per_channel_vector_length_must_match_channels(write_case):
    [error] = errors_of(write_case, GOOD.replace("gamma: [1, 2, 3]", "gamma: [1, 2]"))
    assert (error.field, error.line) == ("params.gamma", 8)
    assert "channel count [3]" in error.message


def test_non_number_element_is_named(write_case):
    [error] = errors_of(write_case, GOOD.replace("[4, 5, 6]", "[4, five, 6]"))
    assert error.field == "input.values[1][1]" and "'five'" in error.message


def test_missing_required_field(write_case):
    [error] = errors_of(write_case, GOOD.replace("params:\n  axis: 1\n  gamma: [1, 2, 3]\n", ""))
    assert error.field == "params" and "required" in error.message.lower()


def test_tolerance_needs_a_reason(write_case):
    [error] = errors_of(write_case, GOOD + "tolerance: {rtol: 0.1}\n")
    assert error.field == "tolerance.reason"


def test_duplicate_key_is_an_error(write_case):
    [error] = errors_of(write_case, GOOD + "training: {}\n")
    assert error.field == "training" and "duplicate key" in error.message and error.line == 10


def test_python_tags_are_refused(write_case):
    errors = errors_of(write_case, GOOD.replace("title: a valid case",
                                                "title: !!python/object/apply:os.system [echo hi]"))
    assert errors[0].line == 2 and "tag" in errors[0].message


def test_out_of_range_axis_needs_expect_error(write_case):
    [error] = errors_of(write_case, GOOD.replace("  axis: 1\n  gamma: [1, 2, 3]\n", "  axis: 2\n"))
    assert "out of range" in error.message and "expect_error" in error.message
    cases, errors = load_file(write_case("e.yaml", GOOD.replace("  axis: 1\n  gamma: [1, 2, 3]\n",
                                                                  "  axis: 2\n") + "expect_error: true\n"))
    assert cases and not errors


def test_shape_over_the_element_limit_is_rejected_before_allocation(write_case):
    [error] = errors_of(write_case, GOOD.replace("shape: [2, 3]", "shape: [100000, 100000]").replace(
        "values: [[1, 2, 3], [4, 5, 6]]", "random: {seed: 0}").replace("  gamma: [1, 2, 3]\n", ""))
    assert error.field == "input.shape" and "limit" in error.message


def test_duplicate_ids_across_folders(tmp_path: Path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.yaml").write_text(GOOD)
    cases, errors = load_folders([tmp_path / "a", tmp_path / "b"])
    assert len(cases) == 1
    [error] = errors
    assert error.field == "id" and "duplicate id 'good-case'" in error.message
    assert str(tmp_path / "a" / "x.yaml") in error.message


def test_one_broken_file_does_not_stop_the_others(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text("id: [unclosed\n")
    (tmp_path / "c.yaml").write_text(GOOD.replace("good-case", "other-case"))
    cases, errors = load_folders([tmp_path])
    assert sorted(c.case.id for c in cases) == ["good-case", "other-case"]
    assert [e.path.name for e in errors] == ["b.yaml"]


def test_several_documents_in_one_file(write_case):
    cases, errors = load_file(write_case("m.yaml", GOOD + "---\n" + GOOD.replace("good-case", "second")))
    assert not errors and [c.case.id for c in cases] == ["good-case", "second"]


def test_every_shipped_case_validates():
    cases, errors = load_folders([ROOT / "cases"])
    assert not errors, "\n".join(map(str, errors))
    assert len(cases) >= 40


def test_committed_schema_is_current():
    committed = (ROOT / "cases" / "schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(), "cases/schema.json is stale: run python -m conformance schema"
    assert json.loads(committed)["title"] == "bnconform case"


@pytest.mark.parametrize("key", ["input", "params", "training", "inference", "tolerance", "expect_error"])
def test_schema_documents_every_top_level_key(key):
    assert key in json.loads(schema_text())["properties"]


def test_a_negative_seed_or_std_is_refused_at_validation(write_case):
    errors = errors_of(write_case, GOOD.replace("  values: [[1, 2, 3], [4, 5, 6]]",
                                                "  random: {seed: -1, std: -2.0}"))
    assert {e.field for e in errors} == {"input.random.seed", "input.random.std"}


def test_an_expected_output_that_cannot_exist_is_refused(write_case):
    text = GOOD.replace("training: {}", "training:\n  gradients:\n    upstream: {random: {seed: 2}}\n"
                        "    expected: {gamma: [1.0, 2.0, 3.0]}").replace("  gamma: [1, 2, 3]\n",
                                                                          "  scale: false\n")
    [error] = errors_of(write_case, text)
    assert error.field == "training.gradients.expected.gamma" and "does not exist" in error.message


def test_a_rule_naming_an_unknown_param_is_refused():
    from pydantic import ValidationError

    from conformance.known import Rule

    with pytest.raises(ValidationError, match="unknown param 'momentun'"):
        Rule(adapters=["torch"], when={"params": {"momentun": 0.9}}, explained_by="rejects",
             reason="r", link="https://example.org")


@pytest.mark.parametrize(("added", "field", "words"), [
    ("  virtual_batch_size: 4", "params.virtual_batch_size", "does not divide the batch size [2]"),
    ("  adjustment: {scale: [1, 2]}", "params.adjustment.scale", "channel count [3]"),
    ("  renorm: {rmin: 2.0, rmax: 1.0}", "params.renorm.rmin", "above rmax"),
    ("  renorm: {momentum: 0.9, rmaxx: 3}", "params.renorm.rmaxx", "did you mean 'rmax'"),
])
def test_feature_fields_are_checked_against_the_case(write_case, added, field, words):
    [error] = errors_of(write_case, GOOD.replace("  gamma: [1, 2, 3]", f"  gamma: [1, 2, 3]\n{added}"))
    assert error.field == field and words in error.message and error.line == 9


def test_ghost_batches_need_axis_0_to_be_a_batch_axis(write_case):
    text = GOOD.replace("  axis: 1\n  gamma: [1, 2, 3]", "  axis: 0\n  virtual_batch_size: 1")
    [error] = errors_of(write_case, text)
    assert error.field == "params.virtual_batch_size" and "axis 0" in error.message


def test_moving_statistics_do_not_exist_without_running_stats(write_case):
    text = GOOD.replace("  gamma: [1, 2, 3]", "  track_running_stats: false").replace(
        "training: {}", "training:\n  expected:\n    moving_mean: [0, 0, 0]")
    [error] = errors_of(write_case, text)
    assert error.field == "training.expected.moving_mean" and "does not exist" in error.message
