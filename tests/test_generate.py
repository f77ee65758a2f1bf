"""The case generator: deterministic, always valid, every expected value filled, every feature common."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conformance.fill import fill_file
from conformance.generate import HEADER, dump, generate, main, write

try:
    from conformance.loader import LoadedCase, load_folders
except ImportError:  # the layout before the loader was split out of conformance/cases.py
    from conformance.cases import LoadedCase, load_folders  # type: ignore[no-redef]

COUNT, SEED = 200, 3
TRAINING_NAMES = ("output", "batch_mean", "batch_variance", "moving_mean", "moving_variance",
                  "moving_variance_unbiased")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    write(out, COUNT, SEED)
    return out


@pytest.fixture(scope="module")
def loaded(folder: Path) -> list[LoadedCase]:
    cases, errors = load_folders([folder])
    assert errors == []
    return cases


def test_same_seed_same_files(tmp_path: Path):
    first, second = write(tmp_path / "a", 30, 5), write(tmp_path / "b", 30, 5)
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_more_cases_extend_fewer_and_seeds_differ():
    few, more = generate(12, 5), generate(20, 5)
    assert [dump(c) for c in more[:12]] == [dump(c) for c in few]  # as text: NaN != NaN in a dict
    other = generate(12, 6)
    assert [c["id"] for c in other] != [c["id"] for c in few]
    assert all(dump(a) != dump(b) for a, b in zip(few, other, strict=True))


def test_every_file_valid_with_header_and_unique_lowercase_ids(folder: Path, loaded: list[LoadedCase]):
    files = sorted(folder.glob("*.yaml"))
    assert len(files) == len(loaded) == COUNT
    for path in files:
        assert path.read_text(encoding="utf-8").splitlines()[0] == f"{HEADER} --count {COUNT} --seed {SEED}"
    ids = [c.case.id for c in loaded]
    assert len(set(ids)) == COUNT
    for c in loaded:
        assert c.path.name == f"{c.case.id}.yaml"
        assert c.case.id.startswith(f"gen-{SEED}-") and c.case.id == c.case.id.lower()
        assert c.case.title and c.case.tags


def test_every_expected_value_filled(loaded: list[LoadedCase]):
    for c in (item.case for item in loaded):
        assert c.tolerance is None and not c.expect_error
        if c.training is not None:
            ex = c.training.expected
            untracked = ("moving_mean", "moving_variance", "moving_variance_unbiased")
            names = TRAINING_NAMES if c.params.track_running_stats else [
                n for n in TRAINING_NAMES if n not in untracked]
            assert all(getattr(ex, name) is not None for name in names), c.id
            assert (ex.inference_output is not None) == ("inference-after-training" in c.tags), c.id
            grads = c.training.gradients
            if grads is not None:
                assert grads.expected.input is not None
                assert (grads.expected.gamma is not None) == c.params.scale
                assert (grads.expected.beta is not None) == c.params.center
        if c.inference is not None:
            assert c.inference.expected.output is not None, c.id


def test_cases_stay_small_and_follow_the_rules(loaded: list[LoadedCase]):
    for c in (item.case for item in loaded):
        for tensor in c.tensors:
            assert math.prod(tensor.shape) <= 2000
        assert c.params.gamma is None or c.params.scale
        assert c.params.beta is None or c.params.center
        assert len(c.tensors) <= 3 and c.steps <= 3


def _features(c) -> set[str]:
    """What the case really is, read from the loaded model (not from its tags)."""
    shape = c.tensors[0].shape
    rank = len(shape)
    axes = c.params.axis if isinstance(c.params.axis, list) else [c.params.axis]
    out = {c.dtype, f"rank-{rank}"}
    if len(axes) > 1:
        out.add("multi-axis")
        if [a % rank for a in axes] != sorted(a % rank for a in axes):
            out.add("unsorted-axes")
    if any(a < 0 for a in axes):
        out.add("negative-axis")
    if c.params.momentum is None and c.training is not None:
        out.add("momentum-null")
    if c.params.epsilon == 0:
        out.add("epsilon-0")
    if c.params.param_dtype not in (None, c.dtype):
        out.add("mixed-precision")
    if any(t.shape[0] == 1 for t in c.tensors) and 0 not in [a % rank for a in axes]:
        out.add("batch-of-one")
    if any(0 in t.shape for t in c.tensors):
        out.add("empty-batch")
    if c.training is not None:
        out.add("training")
        if c.training.gradients is not None:
            out.add("gradients")
        if c.steps > 1:
            out.add("multi-step")
    if c.inference is not None:
        out.add("inference")
    if not c.params.center:
        out.add("center-off")
    if not c.params.scale:
        out.add("scale-off")
    if c.params.gamma is not None and min(c.params.gamma) < 0:
        out.add("negative-gamma")
    if any(t.values is not None for t in c.tensors):
        out.add("inline-values")
    if c.params.renorm is not None:
        out.add("renorm")
    if c.params.virtual_batch_size is not None:
        out.add("ghost")
    if c.params.adjustment is not None:
        out.add("adjustment")
    if not c.params.track_running_stats:
        out.add("no-running-stats")
    return out


def test_feature_mix_covers_everything_and_tags_tell_the_truth(loaded: list[LoadedCase]):
    seen: Counter[str] = Counter()
    for c in (item.case for item in loaded):
        real = _features(c)
        seen.update(real)
        for tag in real:
            assert tag in c.tags or tag == "momentum-null", (c.id, tag)
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        assert seen[dtype] >= 40
    for rank in (2, 3, 4, 5):
        assert seen[f"rank-{rank}"] >= 30
    assert seen["rank-1"] >= 10
    common = ("multi-axis", "momentum-null", "batch-of-one", "gradients", "inference", "training",
              "multi-step", "negative-axis", "center-off", "scale-off", "negative-gamma", "inline-values",
              "mixed-precision")
    for feature in common:
        assert seen[feature] >= 10, (feature, seen[feature])
    assert seen["unsorted-axes"] >= 5 and seen["epsilon-0"] >= 5
    for feature in ("renorm", "ghost", "adjustment", "no-running-stats"):
        assert seen[feature] >= 5, (feature, seen[feature])
    tags = Counter(t for item in loaded for t in item.case.tags)
    for tag in ("large-mean", "constant-channel", "inference-after-training", "batch-size-changes",
                "momentum-0", "momentum-1", "momentum-0.5", "momentum-0.99", "momentum-random",
                "epsilon-0.1", "epsilon-1e-3", "epsilon-random", "channels-first", "channels-last",
                "channels-middle", "channels-axis-0", "moving-mean", "moving-variance", "batches",
                "one-value-per-channel", "zero-variance-channel"):
        assert tags[tag] >= 5, (tag, tags[tag])


def test_expected_values_match_conformance_fill(folder: Path, loaded: list[LoadedCase], tmp_path: Path):
    """The values written are those `python -m conformance fill` writes (fill_file on a copy)."""
    chosen = [c for c in loaded if "gradients" in c.case.tags][:4] + [c for c in loaded if
                                                                       "inference" in c.case.tags][:4]
    for item in chosen:
        copy = tmp_path / item.path.name
        shutil.copy(item.path, copy)
        with np.errstate(all="ignore"):
            fill_file(copy)
        (refilled,), errors = load_folders([copy])
        assert errors == []
        ours, theirs = item.case, refilled.case
        pairs = []
        if ours.training is not None:
            for name in TRAINING_NAMES:
                pairs.append((getattr(ours.training.expected, name), getattr(theirs.training.expected, name)))
        if ours.inference is not None:
            pairs.append((ours.inference.expected.output, theirs.inference.expected.output))
        for a, b in pairs:
            np.testing.assert_array_equal(np.array(a, dtype=float), np.array(b, dtype=float))


def test_write_replaces_earlier_generated_files_only(tmp_path: Path):
    write(tmp_path, 6, 1)
    mine = tmp_path / "hand.yaml"
    (tmp_path / "gen-1-0005-old.yaml").write_text(f"{HEADER} --count 9 --seed 1\nid: x\n", encoding="utf-8")
    shutil.copy(next(iter(sorted(tmp_path.glob("gen-1-0000-*.yaml")))), mine)
    text = mine.read_text(encoding="utf-8").split("\n", 1)[1]  # without the generated header
    mine.write_text(text.replace("id: gen-1-0000", "id: hand-0"), encoding="utf-8")
    paths = write(tmp_path, 3, 1)
    assert len(paths) == 3
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == sorted([*(p.name for p in paths), "hand.yaml"])


def test_main_prints_count_and_tags(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["--count", "8", "--seed", "2", "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote 8 case(s) to {tmp_path / 'g'}")
    assert "generated" in out and "float16" in out
    assert len(list((tmp_path / "g").glob("*.yaml"))) == 8
