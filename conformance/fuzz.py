"""`python -m conformance fuzz`: cases nobody wrote, drawn by Hypothesis, run on real adapters, every
difference diagnosed by name and grouped, one minimal case written per group.

Each process group (as `run` splits them) fuzzes in its own process, `python -m conformance.fuzz
--worker`, which calls `conformance.evaluate` directly (no pytest item per check) and reuses the
adapters' compiled graphs and functions across cases. A difference's *signature* is adapter x check
x status x explanation (the variant names, or the closest variant when unexplained). The first case
of each signature is then shrunk with Hypothesis's `find`, asking for a case with that signature
(within a share of the budget; a group whose case `find` cannot reach again keeps the case as
found, marked `shrunk: false`). Everything is seeded: the same seed and `--max-cases` give the same
groups run to run on one machine; with a time budget alone, the count of cases tried depends on the
machine, and Hypothesis's draws can depend on how long each example takes (README, "Fuzzing").
`--budget` is the whole run's wall-clock time, shared among the processes by `group_budgets`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from random import Random
from typing import Any

import numpy as np

import adapters as registry
from adapters.base import FEATURES
from conformance.results import Record, Results, Status, write_atomically
from conformance.validate import SINGLE_DEVICE_PARAMS

STARTED = time.monotonic()  # this process's start, near enough: a worker's startup is measured from it
SHRINK_SHARE = 0.3  # of a worker's budget, for finding a minimal case per group
DTYPES = ("float16", "bfloat16", "float32", "float64")
DRAWN_DTYPES = ("float32", "float64", "float16", "bfloat16")  # a case's dtype, shrinking to float32
# `--budget` is the run's wall-clock time; each process group gets a share of it by weight, more
# where a case costs more (compiled graphs, jitted functions, exports) and the process's rules hang
# on rare draws. In `fuzz --budget 600 --seed 11` (weights tf 4, jax 4, torch-export 3, the others
# 1 or 2) torch-export tried 398 cases at 4.6 a second, tf 1,395 at 11.9, jax 1,003 at 8.7,
# torch-compile 268 at 4.6, the others 440 to 2,750 in 29 s; a torch-export run of 124 s alone
# reached 6 of its 9 rules, so it gets the largest share.
# tf-export (TFLite conversions, 1.8 to 5.5 cases a second) tried 147 cases in its 37 s of that
# run, about ten per rule region, and missed two of its five rules; each rule region hits in one
# draw of two to three (bessel-one-value: 30 of 45 training checks), so it gets weight 3.
WEIGHTS = {"torch-export": 5.0, "tf": 4.0, "jax": 4.0, "tf-export": 3.0, "torch-compile": 2.0,
           "keras-jax": 2.0}
STARTUP_S = 8.0  # per process, before its budget starts: interpreter and imports (1-2 s), then the
# adapters (summary.json's startup_s: 0.1 to 4.7 s in that run)
FINISH_S = 20.0  # the run's end: cases filled and written, summary and report
MIN_S = 5.0  # the least a process group is given, whatever the budget
# Cases drawn in each region before the others (Worker.explore), however short the run. Sampled
# among the other draws alone, a region drawn 8.4 times on average (a 10-minute run's slowest
# process: torch-export, 251 cases over 10 regions) is drawn 3 times or fewer in 3.1% of runs
# (binomial, n = 251, p = 1/30), for each of its regions. Drawn first, the regions take 4 cases each
# (about 40 of those 251), every one of them in every run. They are evaluated a case of each region
# in turn, skipping a region whose rules are all reached: a 60-second run of one family on a busy
# machine (torch-export, tf-export alone, seed 11: 22 or 23 cases over 12 or 14 regions) reached 5
# of 10 and 6 of 11 rules with four in a row per region, 10 of 10 (19 cases) and 11 of 11 (11) so.
# A skipped region is still drawn among the other cases, but not its first, simplest case: a short
# run shows fewer failing groups (tf, 60 s: the float16 eps-0 moving-variance-0 region's first
# draws failed on tf-keras and tf-layers with four in a row, and were skipped so, tf-nn's rule
# reached first).
SWEEP = 4


def optional_features(shape: list[int], axes: list[int], count: int,
                      only: set[str] | None = None) -> Any:
    """One of renorm, ghost batches, adjustment, no running statistics (shrinks to none of them);
    with `only`, one of those features named there."""
    from hypothesis import strategies as st

    rank = len(shape)
    clips = st.sampled_from(({}, {"rmax": 3.0, "rmin": 0.3333, "dmax": 5.0},
                             {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}))
    named = {"renorm": st.builds(lambda m, c: {"renorm": {"momentum": m, **c}},
                                 st.sampled_from((0.99, 0.5, 0.9)), clips),
             "adjustment": st.builds(lambda a, b: {"adjustment": {"scale": a, "bias": b}},
                                     st.lists(st.floats(0.5, 1.5), min_size=count, max_size=count),
                                     st.lists(st.floats(-0.5, 0.5), min_size=count, max_size=count)),
             "no-running-stats": st.just({"track_running_stats": False})}
    sizes = [v for v in (2, 4, 1) if shape[0] % v == 0]
    if 0 not in {a % rank for a in axes} and sizes:
        named["ghost-batches"] = st.sampled_from(sizes).map(lambda v: {"virtual_batch_size": v})
    if only is not None:
        return st.one_of([named[n] for n in sorted(only & named.keys())] or [st.just({})])
    return st.one_of(st.just({}), *named.values())


def case_strategy(focus: frozenset[str] = frozenset(), regions: tuple[dict[str, Any], ...] = (),
                  always: bool = False) -> Any:
    """Case documents over what the format allows; every part shrinks towards a plain float32 case.

    `focus` names optional features the process's adapters need (`focus_of`): "replicas" for a
    process of replica adapters only, which find every other case not expressible, so it draws
    replicas wherever they are allowed (rank 2-5, no gradients); "preceding" for export adapters,
    which draw a preceding layer in two cases of five where one fits instead of one.
    `regions` (`rule_regions`: the conditions of the known rules of the process's adapters, and
    where their variants show, VARIANT_REGION): one case in three is drawn inside one of them (its
    dtype, rank, parameters, input, features, batch sizes and checks), the others everywhere, so a
    rare region that a rule names comes up in a short run.
    A region drawn also leaves out the optional features none of its rule's adapters states
    (`without`, from their Capabilities: such a case is not expressible for any of them), and, where
    it names no batch size, batches of one row or none (other rules' regions); with replicas the
    channel axis is never axis 0, the axis split. A region only steers the draw; what the case
    shows is measured as for any other.
    With `always`, every case is drawn in one of the regions (Worker.explore's first draws)."""
    from hypothesis import strategies as st

    replicas_only = "replicas" in focus

    @st.composite
    def draw(d: Any) -> dict[str, Any]:
        region = d(st.sampled_from(regions)) if regions and (always or d(st.integers(0, 2)) == 2) else {}
        replicas = replicas_only or "replicas" in region.get("features", ())

        def choose(key: str, default: Any) -> Any:  # the region's value(s), else the default draw
            return d(st.sampled_from(region[key])) if key in region else d(default)

        dtype = choose("dtype", st.sampled_from(DRAWN_DTYPES))
        # rank 1 in one case of five (Hypothesis draws either side of a `|` equally often)
        rank = choose("rank", st.sampled_from((2, 3, 4, 5) if replicas else (2, 3, 4, 5, 1)))
        without = set(region.get("without", ()))  # features none of the region's adapters states
        shape = [d(st.integers(2, 4)) for _ in range(rank)]
        if d(st.booleans()):
            # batch of one, a larger batch, an empty batch; in a region that names no batch size, a
            # larger one (one row or none is the region of other rules, torch's refusals among them)
            shape[0] = 8 if region and "values_per_channel" not in region else d(st.sampled_from((1, 8, 0)))
        several = rank >= 3 and "multi-axis" not in without and d(st.booleans())
        axes = sorted(d(st.sets(st.integers(0, rank - 1), min_size=2, max_size=2))) if several else \
            [d(st.sampled_from((1, rank - 1) if replicas else (1, rank - 1, 0) if rank > 1 else (0,)))]
        if d(st.booleans()):
            axes = [a - rank for a in axes]  # the negative spelling
        if d(st.integers(0, 19)) == 19:  # an axis out of range: every API must refuse the case
            if d(st.booleans()):  # the last dim, where an axis below -rank lands in Flax, of size 1:
                shape[-1] = 1  # the feature count an adapter passes then (flax-nnx `accepts`)
            return {"id": "fuzz", "dtype": dtype, "params": {"axis": d(st.sampled_from((rank, -rank - 1)))},
                    "input": {"shape": shape, "random": {"seed": 0}}, "training": {}, "inference": {},
                    "expect_error": True}
        # one value per channel (every other dim 1), twice as often on 4-D/5-D input, where TF's
        # fused kernel takes its own Bessel factor for it (bessel-one-value)
        one = d(st.integers(0, 9)) >= (8 if rank >= 4 else 9)
        if "values_per_channel" in region:  # the region's batch: one value per channel, or none
            one = 1 in region["values_per_channel"]
        if one:
            shape = [s if i in {a % rank for a in axes} else 1 for i, s in enumerate(shape)]
            if replicas and 0 not in {a % rank for a in axes}:  # one row per replica: 2 or 3 rows
                shape[0] = d(st.sampled_from((2, 3)))  # on 2 or 3 replicas (a shard's values count)
        if "rows" in region and 0 not in {a % rank for a in axes}:  # the region's batch size
            shape[0] = d(st.sampled_from(region["rows"]))
        reduced = [i for i in range(rank) if i not in {a % rank for a in axes}]
        if region.get("values_per_channel") == [0] and reduced:  # an empty batch: a reduced dim of 0,
            # with replicas a spatial one, so that the rows still split into shards
            shape[reduced[-1] if replicas and len(reduced) > 1 else reduced[0]] = 0
        if "channels" in region:  # 0: the first channel dim empty; 1: every channel dim 1
            wanted = d(st.sampled_from(region["channels"]))
            for i, a in enumerate(axes):
                shape[a] = 1 if wanted == 1 or (wanted == 0 and i > 0) else wanted
        params: dict[str, Any] = {"axis": axes if several else axes[0]}
        momentum = d(st.sampled_from((0.9, None, 0.0, 1.0, 0.5, 0.99)) | st.floats(0, 1))
        if momentum is None and "momentum-null" in without:
            momentum = 0.9
        epsilon = d(st.sampled_from((1e-5, 0.0, 1e-3, 0.1)) | st.floats(1e-8, 0.5))
        params.update(momentum=momentum, epsilon=epsilon)
        channels = [shape[a] for a in axes]
        count = int(np.prod(channels))
        for flag, values in (("scale", "gamma"), ("center", "beta")):
            if d(st.booleans()):  # booleans shrink to False: the minimal case keeps the default
                params[flag] = False
            elif d(st.booleans()):
                params[values] = d(st.lists(st.floats(-2, 2), min_size=count, max_size=count))
        if region or d(st.booleans()):  # a region always places moving statistics
            params["moving_mean"] = d(st.lists(st.floats(-2, 2), min_size=count, max_size=count))
            # in a region, also 1e-3: normalized with it, a float16 channel of 1e4 passes 65504 (the
            # float16 overflow rules of the export paths, which normalize with the moving statistics)
            variance = st.floats(0.01, 4) | st.just(1e-3) if region else st.floats(0.01, 4)
            params["moving_variance"] = d(st.lists(variance, min_size=count, max_size=count))
        if "param-dtype" in region.get("features", ()):
            params["param_dtype"] = "float32" if dtype != "float32" else "float64"
        elif "param-dtype" not in without and d(st.integers(0, 3)) == 3:  # mixed precision; shrinks to none
            # float16/bfloat16 input: float32 parameters in three draws of four, as mixed-precision
            # training holds them (the rules of torch, torch-compile and flax-nnx need that region)
            amp = dtype in ("float16", "bfloat16") and d(st.integers(0, 3)) > 0
            params["param_dtype"] = "float32" if amp else d(st.sampled_from(DTYPES))
        mean = d(st.sampled_from((0.0, 3.0, -1.0)) | st.sampled_from((1e2, 1e4)))
        std = d(st.sampled_from((1.0, 0.1, 1e-3)))
        if "input" in region:  # the region's input: drawn after the others, which stay as they were
            mean = d(st.sampled_from(region["input"]["mean"]))
            std = d(st.sampled_from(region["input"]["std"]))
        doc: dict[str, Any] = {"id": "fuzz", "dtype": dtype, "params": params,
                               "input": {"shape": shape, "random": {"seed": d(st.integers(0, 2**16)),
                                                                    "mean": mean, "std": std}}}
        steps = choose("steps", st.integers(1, 3))
        if region.get("multi_step") is not None:
            steps = d(st.integers(2, 3)) if region["multi_step"] else 1
        check = d(st.sampled_from(region["checks"])) if region else None
        inference_only = check == "inference" or (check is None and d(st.booleans()))
        if not inference_only:
            doc["training"] = {"steps": steps, "expected": {}}
            if check == "gradients" or (not replicas and check is None and d(st.booleans())):
                doc["training"]["gradients"] = {"upstream": {"random": {"seed": 1}}}
        if inference_only or check == "training" or d(st.booleans()):  # a training region infers too
            doc["inference"] = {"expected": {}}
            if "training" in doc:  # and after training, which the export adapters compare
                doc["training"]["expected"]["inference_output"] = None  # (asks `filled` for it)
        features = set(region.get("features", ()))
        if features & {"renorm", "adjustment", "ghost-batches", "no-running-stats"}:
            params.update(d(optional_features(shape, axes, count, features)))
        elif d(st.integers(0, 9)) >= 7:  # drawn last and in three cases of ten: the other draws stay
            stated = {"renorm", "adjustment", "ghost-batches", "no-running-stats"} - without
            if stated:
                params.update(d(optional_features(shape, axes, count, stated if without else None)))
        for name, values in region.get("params", {}).items():  # the region's parameters (not axis)
            if name in ("moving_mean", "moving_variance", "gamma", "beta"):  # one value, every channel
                params[name] = [d(st.sampled_from(values))] * count
            elif name != "axis":
                params[name] = d(st.sampled_from(values))
        # drawn last, so the draws before it (and the seeds tests rely on) stay as they were
        # a layer to fold BN into: in 2 cases of 5 for export adapters, 1 otherwise, 4 in a region
        # whose adapters all fold or export one (torch-fuse runs no case without it)
        fold = 1 if "preceding" in region.get("often", ()) else 3 if "preceding" in focus else 4
        if not several and count <= 8 and "preceding" not in without and (
                "preceding" in features or d(st.integers(0, 4)) >= fold):
            row = st.lists(st.floats(-2, 2), min_size=count, max_size=count)
            params["preceding"] = {"weight": d(st.lists(row, min_size=count, max_size=count)),
                                   "bias": d(row)}
        counts = [c for c in (2, 4, 3) if c <= shape[0]]  # 3 on 4 or 8 rows: uneven shards
        if region and any(shape[0] % c == 0 for c in counts):  # a region: even shards, which every
            counts = [c for c in counts if shape[0] % c == 0]  # engine takes (pmap, shard_map do not)
        if ("gradients" not in doc.get("training", {}) and counts and 0 not in {a % rank for a in axes}
                and not params.keys() & set(SINGLE_DEVICE_PARAMS) and "replicas" not in without
                and ("replicas" in features or d(st.integers(0, 3)) >= (1 if replicas else 3))):
            # replicas, drawn last: always in a region of replica adapters (their rules' region)
            params["replicas"] = {"count": d(st.sampled_from(counts)), "synchronized": d(st.booleans())}
        return doc

    return draw()


def explaining_rules(explained_by: list[str], covering: list[Any]) -> list[str]:
    """The sources of every covering rule that explains a known check: each rule named in an
    explanation ("a" or "a+b") whose variants covering rules all name. The record keeps the first
    one only (evaluate.apply_rules), but a measurement that two rules explain (tf-nn's float16
    gradients: compute-input-dtype and normalize-folded) reaches both."""
    named = {rule.explained_by: rule for rule in covering}
    sources: dict[str, None] = {}
    for explanation in explained_by:
        parts = explanation.split("+")
        if all(part in named for part in parts):
            sources.update((named[part].source, None) for part in parts)
    return list(sources)


# Where a variant shows: each entry a region of its own for every rule that names the variant (a
# rule's own conditions win: its `when` keys, and its parameters name by name), several where the
# variant shows in ways that exclude each other. Measured on the adapters of the rules a 10-minute
# run (fuzz --budget 600 --seed 11) left unreached, drawing a rule's region 30 times:
# - denormals-flushed: one step of a subnormal moving variance with eps 0 and one value per channel
#   (batch variance 0), momentum 0.5: the moving variance stays subnormal (float64 1e-310, float32
#   1e-40), flushed it is 0, and inference with it, before or after training, divides by 0. (A
#   subnormal momentum no longer shows it: below u, v - (v - b)·(1 - m) loses m·v whether or not
#   subnormals are flushed, and `problem.update_rounding` leaves that output undetermined.)
# - normalize-folded, two ways: a folded z·s + (beta - mean·s) overflows float16 or cancels only
#   where the mean is large against the std (|mean|·s past 65504: 1e4 at s = 10 or more); and with
#   var + eps = 0 (a stored moving variance of 0, eps 0: s = inf) it is inf - inf or 0·inf = NaN
#   where the unfolded form gives ±inf (the eps-0 inference rules of torch, onnxruntime, the exports).
#   Those two leave the canonical output past float16's range too (a moving mean of at most 2 against
#   z near 1e4), where TFLite's float32 folding stays finite; a third, in float16, keeps the canonical
#   (z - mean)·s small while z·s and mean·s pass 65504 (the torch exports' and torch-fuse's float16
#   rule, cases/export/conv-bn-float16-large-mean-folded-overflow): a constant float16 channel of 1e4
#   (std 0.1 rounds away at float16's spacing of 8 there), a moving mean of 1e4 and variance 1e-3 or
#   0.01 (s = 10 to 32 at eps 1e-5 or 1e-3) for inference, and momentum 0 for training, so that the
#   trained moving mean is the batch's (z, behind a preceding layer too) and the moving variance 0
#   (s = 1/sqrt(eps)). Measured on the torch exports: each of 8 draws showed it, the first (no
#   preceding layer) on OpenVINO only, the 6 with a preceding layer on all six adapters of the rule.
# - compute-input-dtype, two ways: tf-nn's float16 gradient overflows where var + eps is below about
#   1e-6 (a float16 constant channel of 1e4, or of 1e2 at std 1e-3, with eps 1e-8; at eps 1e-5 only
#   the normalize-folded rule's overflow shows); torch-compile's and flax-nnx's statistics rounded
#   to float16/bfloat16 show in dL/dgamma (scale on), torch's bfloat16 kernel in dL/dbeta (center
#   on), of a channel that does not round to a constant and whose mean is not near 0 (mean -1 at
#   std 0.1 passes on torch), at an eps torch takes in training (not 0).
# - variance-sum-of-squares: E[x²] - E[x]² loses about u·mean², which moves the output past its
#   tolerance default·(1 + c) (c = |mean|/sqrt(var + eps)) for a mean of 1e2 or 1e4 at std 1e-3 and
#   eps 1e-5 or 1e-3 in float32 (a large eps, 0.2, hides it), 1e4 in float64; float16 and bfloat16
#   cannot hold such a channel unless it is constant (the replica rules of flax-linen-pmap and
#   flax-nnx-shard, which a region of theirs also always draws replicas for).
# - folded-inf-saturated: the denormals-flushed region in float32: the trained moving variance is 0,
#   and TFLite's converter stores the folded s = inf (eps 0) as float32 max.
# - epsilon-float32 (ONNX's float32 epsilon attribute in a float64 model): an eps that float32 does
#   not hold, large against the variance: eps 0.1 runs as 0.1 + 1.5e-9, which moves a float64
#   output by about 7e-9 relative at a variance of 0.01, past float64's 1e-10; the default eps 1e-5
#   moves it by 2.5e-13 / (var + eps). On the torch exports, 2 of 6 draws in float64 alone showed
#   it, not the first; 2 of 6 here, the first (float64 [2, 2], eps 0.1) on every ONNX adapter.
_SUBNORMAL_MOVING_VARIANCE = {
    "dtype": ["float64", "float32"], "values_per_channel": [1], "steps": [1],
    "params": {"momentum": [0.5], "epsilon": [0.0], "moving_variance": [1e-310, 1e-40]}}
# Regions two variants share: a stored moving variance of 0 with eps 0 (s = inf); float16 weights
# past 65504 (moving mean 1e4 at the input's 1e4, momentum 0: the canonical output stays small); the
# denormals-flushed region in float32, whose trained moving variance is 0.
_ZERO_VARIANCE_EPS_0 = {"params": {"epsilon": [0.0], "moving_variance": [0.0]}}
_FLOAT16_FOLDED_OVERFLOW = {"dtype": ["float16"], "input": {"mean": [1e4], "std": [0.1]},
                            "params": {"momentum": [0.0], "epsilon": [1e-5, 1e-3], "moving_mean": [1e4],
                                       "moving_variance": [1e-3, 0.01]}}
_SUBNORMAL_FLOAT32 = {**_SUBNORMAL_MOVING_VARIANCE, "dtype": ["float32"],
                      "params": {**_SUBNORMAL_MOVING_VARIANCE["params"], "moving_variance": [1e-40]}}
VARIANT_REGION: dict[str, list[dict[str, Any]]] = {
    "denormals-flushed": [_SUBNORMAL_MOVING_VARIANCE],
    "normalize-folded": [{"input": {"mean": [1e4], "std": [0.1, 1e-3]}}, _ZERO_VARIANCE_EPS_0,
                         _FLOAT16_FOLDED_OVERFLOW],
    "folded-inf-saturated": [_SUBNORMAL_FLOAT32],
    # BN folded into the layer before it: a layer's sum of ±inf terms differs from the unfused fold
    # only where s = gamma/sqrt(var + eps) is infinite, or in float16 where the folded weights pass
    # 65504 (torch's training-mode exports, which refuse eps 0)
    "folded-into-layer": [_ZERO_VARIANCE_EPS_0, _FLOAT16_FOLDED_OVERFLOW, _SUBNORMAL_FLOAT32],
    "epsilon-float32": [{"params": {"epsilon": [0.1, 1e-3]}}],
    "compute-input-dtype": [
        {"params": {"epsilon": [1e-8]}, "input": {"mean": [1e4, 1e2], "std": [1e-3]}},
        {"params": {"scale": [True], "center": [True], "epsilon": [1e-5, 1e-3]},
         "input": {"mean": [3.0, -1.0], "std": [1.0]}}],
    "variance-sum-of-squares": [{"dtype": ["float32", "float64"], "params": {"epsilon": [1e-5, 1e-3]},
                                 "input": {"mean": [1e4, 1e2], "std": [1e-3]}}],
}
# The input of a region whose rule names a zero-variance channel (When.zero_variance): every channel
# constant at one of these, with eps 0. A value with a full mantissa, so that a float32 or float16
# mean of its copies may round (3.2: TF's mean of 48 copies is 6 ulps off); the draws never give a
# constant channel otherwise. In batches of ZERO_VARIANCE_ROWS rows: a mean of few copies is exact
# (TF's float32 tf.nn.moments of n copies in 3 channels, measured: 3.2 and -0.7 round from n = 7 on,
# 1e4 + 0.1 from n = 6, never for n of 5 or less), and a region's first draw has the fewest. With a
# gamma of a full mantissa (ZERO_VARIANCE_GAMMAS): with gamma 1 and a residue d of a power-of-two
# number of ulps, the folded x·inv and mean·inv (inv = gamma/|d|) are exact and the output is beta ±
# gamma, which the reference accepts. Measured on the tf_keras exports' zero-variance rule
# (adapters/known/tf-export.yaml, unfused 2-D and 3-D input): the region's first draw, float32 [8, 2]
# copies of 3.2, passed every adapter with gamma 1 and shows the rule on all five with 1.3; of six
# draws, the three of rank 2 or 3 showed it.
ZERO_VARIANCE_MEANS = (3.2, -0.7, 1e4 + 0.1)
ZERO_VARIANCE_ROWS = (8,)
ZERO_VARIANCE_GAMMAS = (1.3, -0.7)


def rule_regions(rule: Any) -> list[dict[str, Any]]:
    """`rule_region` for each way the rule's variant shows (VARIANT_REGION) in a dtype the rule allows,
    or its conditions alone. A zero-variance rule's conditions say where its variant shows (constant
    channels at eps 0), and their constant input would replace each entry's: it gets one region, its
    own."""
    dtypes = rule.when.dtype
    allowed = None if dtypes is None else {dtypes} if isinstance(dtypes, str) else set(dtypes)
    entries = [] if rule.when.zero_variance else [
        shows for shows in VARIANT_REGION.get(rule.explained_by, [])
        if allowed is None or "dtype" not in shows or allowed & set(shows["dtype"])]
    return [rule_region(rule, shows) for shows in entries] or [rule_region(rule)]


def rule_region(rule: Any, shows: dict[str, Any] | None = None) -> dict[str, Any]:
    """A known rule's conditions as a region case_strategy can draw in: every condition given, as a
    list of the values it allows, and the checks it covers (`ids` and `tags` are not drawn); with
    `shows` (a VARIANT_REGION entry), where its variant shows, as far as the conditions leave open."""
    when = rule.when.model_dump(exclude_none=True)
    shows = shows or {}
    region: dict[str, Any] = {"checks": list(rule.checks), **shows}
    for key in ("dtype", "rank", "steps", "values_per_channel", "channels"):
        if key in when:
            region[key] = when[key] if isinstance(when[key], list) else [when[key]]
    if "params" in when:
        region["params"] = {**shows.get("params", {}),
                            **{k: v if isinstance(v, list) else [v] for k, v in when["params"].items()}}
    for key in ("multi_step", "features"):
        if key in when:
            region[key] = when[key]
    if when.get("zero_variance"):  # constant channels (std 0) of a value whose sum of copies rounds
        params = region.get("params", {})
        if not params.keys() & {"scale", "gamma"}:  # unless the rule names them
            params = {"scale": [True], "gamma": list(ZERO_VARIANCE_GAMMAS), **params}
        region["params"] = {**params, "epsilon": [0.0]}
        region["input"] = {"std": [0.0], "mean": list(ZERO_VARIANCE_MEANS)}
        region["rows"] = list(ZERO_VARIANCE_ROWS)
    return region


def focus_of(features: list[frozenset[str]]) -> frozenset[str]:
    """What a process's adapters need drawn more often (case_strategy): replicas where every one of
    them runs replica cases only, a preceding layer where one of them folds or exports it."""
    focus = set()
    if features and all("replicas" in f for f in features):
        focus.add("replicas")
    if any("preceding" in f for f in features):
        focus.add("preceding")
    return frozenset(focus)


class Worker:
    """One process group's fuzzing: adapters loaded once, cases evaluated in-process."""

    def __init__(self, ids: list[str], seed: int, progress: Path | None = None):
        from conformance.known import load as load_rules

        self.adapters = {i: registry.load(i) for i in ids}
        self.focus = focus_of([a.capabilities.features for a in self.adapters.values()])
        self.rules = load_rules()
        # the rules these adapters can meet here (not those of another device or release)
        self.reachable = [r for r in self.rules.rules
                          if any(r.reachable_by(a) for a in self.adapters.values())]
        # each region once (rules of one variant and conditions share one), none that they cannot
        # state, with the sources of the rules it is drawn for
        regions: dict[str, tuple[dict[str, Any], set[str]]] = {}
        for rule in self.reachable:
            for region in filter(None, (self.region(rule, r) for r in rule_regions(rule))):
                regions.setdefault(json.dumps(region, sort_keys=True), (region, set()))[1].add(rule.source)
        self.regions = tuple(region for region, _ in regions.values())
        self.region_rules = tuple(sources for _, sources in regions.values())
        self.seed = seed
        self.progress = progress
        self.found: dict[str, dict[str, Any]] = {}  # signature -> {"doc", "count", "record"}
        self.rules_reached: dict[str, int] = {}  # rule source -> checks it explained (while exploring)
        self.explaining: dict[str, list[str]] = {}  # the last case's known signatures -> those rules
        self.tried = self.checks = self.checks_run = 0  # checks_run: those not found not expressible
        self.started = time.monotonic()

    def region(self, rule: Any, region: dict[str, Any]) -> dict[str, Any] | None:
        """A region of the rule (`rule_regions`), narrowed to what the rule's adapters here can state
        (Capabilities): their dtypes (VARIANT_REGION's among them) and ranks where the rule names
        none, the checks they run, replicas where they run replica cases only, a preceding layer
        more often where they all fold or export one. None where they state none of its dtypes."""
        region = dict(region)
        caps = [self.adapters[a].capabilities for a in rule.adapters if a in self.adapters]
        if not caps:
            return region
        # in the order a case draws them (DRAWN_DTYPES): a region's first draw is float32 where it can be
        dtypes = [d for d in DRAWN_DTYPES if any(d in c.dtypes for c in caps)]
        if "dtype" not in region and len(dtypes) < len(DTYPES):
            region["dtype"] = dtypes
        elif "dtype" in region:  # the rule's or VARIANT_REGION's: those they state, else none
            region["dtype"] = [d for d in region["dtype"] if d in dtypes]
            if not region["dtype"]:
                return None
        # the checks they state (torch-fuse: training and inference of a rule that names none)
        region["checks"] = [c for c in region["checks"] if any(c in cap.checks for cap in caps)] or \
            region["checks"]
        low, high = min(c.min_rank for c in caps), max(c.max_rank or 5 for c in caps)
        if "rank" not in region and (low, high) != (1, 5):
            region["rank"] = list(range(low, high + 1))
        if all("replicas" in c.features for c in caps):
            region["features"] = [*region.get("features", []), "replicas"]
        if all("preceding" in c.features for c in caps):
            region["often"] = ["preceding"]
        # the optional features none of them states: a case with one is not expressible for any
        region["without"] = sorted(f for f in FEATURES if not any(f in c.features for c in caps))
        return region

    def signatures(self, doc: dict[str, Any]) -> dict[str, Record]:
        """The differences this case shows, by signature (an invalid draw shows none)."""
        from conformance.evaluate import Outcome, evaluate
        from conformance.generate import filled
        from conformance.loader import LoadedCase
        from conformance.plugin import case_summary
        from conformance.schema import Case

        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                full = filled({**doc, "tags": []}, Path("fuzz.yaml"))
        except Exception:  # the draw broke a rule of the format (CaseErrors): not a case
            return {}
        loaded = LoadedCase(Case.model_validate(full), Path("fuzz.yaml"), 1)  # `filled` validated it
        out: dict[str, Record] = {}
        self.explaining = {}
        for adapter_id, adapter in self.adapters.items():
            for check in loaded.case.checks:
                self.checks += 1
                outcome = Outcome()
                try:
                    evaluate(adapter, loaded.case, check, outcome, self.rules)  # type: ignore[arg-type]
                except Exception as exc:
                    outcome.status, outcome.reason = Status.ERROR, f"{type(exc).__name__}: {exc}"
                self.checks_run += outcome.status != Status.NOT_EXPRESSIBLE
                if outcome.status in (Status.PASS, Status.NOT_EXPRESSIBLE):
                    continue
                record = outcome.fill(Record(case=None, file="", adapter=adapter_id, check=check,
                                             family=registry.ADAPTERS[adapter_id].family,
                                             case_info=case_summary(loaded)))
                out[signature(record)] = record
                if outcome.status == Status.KNOWN:
                    self.explaining[signature(record)] = explaining_rules(
                        outcome.explained_by, self.rules.for_check(adapter, loaded.case, check))
        return out

    def explore(self, seconds: float, max_cases: int | None) -> None:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hypothesis_seed

        deadline = time.monotonic() + seconds
        limit = max_cases or 10**9

        class Enough(Exception):
            pass

        def evaluate(doc: dict[str, Any]) -> None:
            if time.monotonic() > deadline or self.tried >= limit:
                raise Enough
            self.tried += 1
            for sig, record in self.signatures(doc).items():
                entry = self.found.setdefault(sig, {"doc": doc, "count": 0, "record": record})
                entry["count"] += 1
                for source in self.explaining.get(sig, ()):
                    self.rules_reached[source] = self.rules_reached.get(source, 0) + 1
            self.report(deadline)

        def run(strategy: Any, examples: int, seed: int, test: Any = evaluate) -> None:
            @hypothesis_seed(seed)
            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(strategy)
            def one(doc: dict[str, Any]) -> None:
                test(doc)

            with contextlib.suppress(Enough):
                one()

        # each region first: SWEEP cases of each (a Hypothesis run of its own, seeded by the region's
        # place, drawn before any is evaluated), evaluated a case of every region in turn, so that a
        # short run draws in every region, and none of a region whose rules are all reached already;
        # then the cases everywhere with one in three in a region
        sweep: list[list[dict[str, Any]]] = [[] for _ in self.regions]
        for i, region in enumerate(self.regions):
            run(case_strategy(self.focus, (region,), always=True), SWEEP, self.seed * 1000 + i + 1,
                sweep[i].append)
        with contextlib.suppress(Enough):
            for turn in itertools.zip_longest(*sweep):
                for doc, rules in zip(turn, self.region_rules, strict=True):
                    if doc is not None and not rules <= self.rules_reached.keys():
                        evaluate(doc)
        if self.tried < limit and time.monotonic() <= deadline:
            run(case_strategy(self.focus, self.regions), limit - self.tried, self.seed)

    def shrink(self, seconds: float) -> None:
        """A minimal case per signature, by Hypothesis: `find` a case with that signature, each group
        within an equal part of the time left, so that the whole ends within `seconds` but for the
        one evaluation under way at a deadline."""
        from hypothesis import HealthCheck, find, settings
        from hypothesis.errors import Flaky, NoSuchExample

        end = time.monotonic() + seconds
        todo = sorted(self.found.items())
        for i, (sig, entry) in enumerate(todo):
            entry["shrunk"] = False  # unless a case with this signature is found again in time
            deadline = time.monotonic() + (end - time.monotonic()) / (len(todo) - i)
            if deadline <= time.monotonic():
                continue
            seen: dict[str, Record | None] = {}  # the same case, the same answer, also past the deadline

            def has(doc: dict[str, Any], sig: str = sig, deadline: float = deadline,
                    seen: dict[str, Record | None] = seen) -> bool:
                key = json.dumps(doc, sort_keys=True)
                if key not in seen:
                    seen[key] = self.signatures(doc).get(sig) if time.monotonic() < deadline else None
                return seen[key] is not None

            try:
                doc = find(case_strategy(self.focus, self.regions), has, random=Random(self.seed),
                           settings=settings(max_examples=200, deadline=None, database=None,
                                             suppress_health_check=list(HealthCheck)))
            except (NoSuchExample, Flaky):  # not found again within its share: keep the case as found
                continue
            entry["doc"], entry["shrunk"] = doc, True
            entry["record"] = seen.get(json.dumps(doc, sort_keys=True)) or entry["record"]

    def report(self, deadline: float) -> None:
        if self.progress is not None:
            text = json.dumps({"cases": self.tried, "groups": len(self.found),
                               "left_s": round(max(0.0, deadline - time.monotonic()), 1)})
            tmp = self.progress.with_name(f".{self.progress.name}.tmp")
            tmp.write_text(text)
            tmp.replace(self.progress)


def signature(record: Record) -> str:
    """adapter x check x status x explanation: what a group of differences has in common."""
    if record.rule:  # known: the rule's variant (and its partner's, for a pair)
        rules = [record.rule, *record.rule.get("with", [])]
        why = "+".join(r["explained_by"] for r in rules)
    elif record.explained_by:
        why = record.explained_by[0]  # the sharpest explanation (diagnose orders them)
    elif record.closest:
        why = f"unexplained (closest {record.closest['variant']})"
    else:
        why = "unexplained" if record.status != Status.ERROR else record.reason.split(":")[0]
    return f"{record.adapter} {record.check} {record.status} {why}"


def worker_main(args: argparse.Namespace) -> int:
    ids = registry.resolve(args.framework)
    os.environ.update(registry.environment_for(ids))
    worker = Worker(ids, args.seed, args.progress)
    explore_s = args.budget * (1 - SHRINK_SHARE)
    worker.explore(explore_s, args.max_cases)
    explored = time.monotonic() - worker.started
    checks, checks_run = worker.checks, worker.checks_run  # the exploration's; shrinking evaluates more
    # what is left, but no more than its share where --max-cases ended the exploration early
    worker.shrink(max(1.0, min(args.budget - explored, args.budget * SHRINK_SHARE)))
    groups = {sig: {"count": e["count"], "shrunk": e.get("shrunk", False), "doc": e["doc"],
                    "record": e["record"].to_json()} for sig, e in worker.found.items()}
    write_atomically(args.out, {"adapters": ids, "cases": worker.tried, "checks": checks,
                                "checks_run": checks_run,
                                "focus": sorted(worker.focus), "budget_s": args.budget,
                                "startup_s": round(worker.started - STARTED, 1),
                                "seconds": round(time.monotonic() - worker.started, 1),
                                "explore_seconds": round(explored, 1), "groups": groups,
                                "rules_reached": worker.rules_reached,
                                "rules_reachable": [r.source for r in worker.reachable]})
    return 0


def group_budgets(names: list[str], wall: float, jobs: int) -> dict[str, float]:
    """Seconds per process group so that the run ends within `wall`: shares proportional to WEIGHTS
    (1 for the others), scaled by the largest unit for which the processes, started largest share
    first `jobs` at a time as families.run_each starts them (each taking STARTUP_S plus its share),
    finish by wall - FINISH_S. Never below MIN_S. The same names, wall and jobs give the same shares."""
    weights = {n: WEIGHTS.get(n, 1.0) for n in names}
    order = sorted(names, key=lambda n: (-weights[n], n))

    def makespan(unit: float) -> float:
        ends = [0.0] * max(1, jobs)
        for n in order:  # each process starts on the first free slot
            ends[ends.index(min(ends))] += STARTUP_S + max(MIN_S, unit * weights[n])
        return max(ends)

    low, high = 0.0, max(wall, MIN_S)
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if makespan(mid) <= wall - FINISH_S else (low, mid)
    return {n: max(MIN_S, math.floor(low * weights[n] * 10) / 10) for n in names}  # 0.1 s, never over


def main(args: argparse.Namespace) -> int:
    """Every selected process group fuzzes in its own process; then the groups, cases and summary."""
    from conformance.families import groups_for, run_each, tail
    from conformance.generate import dump, filled

    out = Path(args.out).resolve()
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    groups = groups_for(args.framework)
    jobs = args.jobs or os.cpu_count() or 1
    budgets = group_budgets([g.name for g in groups], args.budget, jobs)
    for g in groups:
        (work / f"{g.name}.json").unlink(missing_ok=True)

    def command(g: Any) -> list[str]:
        return [sys.executable, "-m", "conformance.fuzz", "--worker",
                f"--framework={','.join(g.adapter_ids)}",
                f"--budget={budgets[g.name]}", f"--seed={args.seed}", f"--out={work / g.name}.json",
                f"--progress={work / g.name}.progress.json",
                *([f"--max-cases={args.max_cases}"] if args.max_cases else [])]

    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(5):
            parts = []
            for g in groups:
                try:
                    p = json.loads((work / f"{g.name}.progress.json").read_text())
                    parts.append(f"{g.name} {p['cases']} cases, {p['groups']} groups, "
                                 f"{p['left_s']:.0f} s left")
                except (OSError, ValueError):
                    continue
            if parts:
                print("fuzz: " + "; ".join(parts), flush=True)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        run_each(groups, command, work / "logs", jobs, timeout=max(budgets.values()) * 3 + 600,
                 first=lambda g: (-budgets[g.name], g.name))
    finally:
        stop.set()
        watcher.join()
    summary: dict[str, Any] = {"seed": args.seed, "budget_s": args.budget, "jobs": jobs, "families": {},
                               "groups": []}
    reached: dict[str, int] = {}
    reachable: set[str] = set()
    records = []
    for g in groups:
        try:
            data = json.loads((work / f"{g.name}.json").read_text())
        except (OSError, ValueError):
            summary["families"][g.name] = {"problem": g.problem or f"exit {g.returncode}",
                                           "log_tail": tail(g.log)}
            continue
        for source, n in data["rules_reached"].items():
            reached[source] = reached.get(source, 0) + n
        reachable.update(data["rules_reachable"])
        explore_s = max(data["explore_seconds"], 1e-9)
        summary["families"][g.name] = {
            "cases": data["cases"], "checks": data["checks"], "checks_run": data["checks_run"],
            "budget_s": data["budget_s"], "startup_s": data["startup_s"], "focus": data["focus"],
            "seconds": data["seconds"], "explore_seconds": data["explore_seconds"],
            "cases_per_s": round(data["cases"] / explore_s, 1),
            "checks_per_s": round(data["checks"] / explore_s, 1),  # not-expressible checks included
            "checks_run_per_s": round(data["checks_run"] / explore_s, 1)}
        for sig, group in sorted(data["groups"].items()):
            name = slug(sig)
            doc = {**group["doc"], "id": name, "title": f"fuzz: {sig}", "tags": ["fuzz"]}
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                text = dump(filled(doc, out / f"{name}.yaml"))
            (out / f"{name}.yaml").write_text(f"# python -m conformance fuzz --seed {args.seed}: {sig}\n"
                                              f"{text}", encoding="utf-8")
            record = Record.from_json(group["record"])
            record.case, record.file = name, str(out / f"{name}.yaml")
            records.append(record)
            summary["groups"].append({"signature": sig, "family": g.name, "count": group["count"],
                                      "shrunk": group["shrunk"], "case": f"{name}.yaml"})
    summary["groups"].sort(key=lambda s: ("unexplained" not in s["signature"], -s["count"]))
    summary["rules"] = rules_summary(reached, {a for g in groups for a in g.adapter_ids}, reachable)
    write_atomically(out / "summary.json", summary)
    write_atomically(out / "results.json", Results({"selection": "fuzz", "adapters": {}}, records))
    subprocess.run([sys.executable, "-m", "reports", str(out / "results.json"), "-o",
                    str(out / "report.html")], capture_output=True, check=False)
    for s in summary["groups"]:
        print(f"{s['count']:>6}  {s['signature']}  -> {s['case']}")
    for name, fam in summary["families"].items():
        print(f"{name}: " + (f"{fam['cases']} cases, {fam['checks']} checks ({fam['checks_run']} run, the "
                             f"others not expressible) in {fam['explore_seconds']} s: {fam['checks_per_s']} "
                             f"checks/s, {fam['checks_run_per_s']} run/s" if "cases" in fam
                             else f"failed: {fam['problem']}"))
    rules = summary["rules"]
    total = len(rules["reached"]) + len(rules["not_reached"])
    print(f"known rules reached: {len(rules['reached'])} of the selected adapters' {total} reachable here"
          + "".join(f"\n  not reached: {r}" for r in rules["not_reached"])
          + (f"\n  ({len(rules['elsewhere'])} more for another device or release)"
             if rules["elsewhere"] else ""))
    print(f"{len(summary['groups'])} groups -> {out} (wall {time.monotonic() - STARTED:.0f} s)")
    return 1 if any("problem" in f for f in summary["families"].values()) else 0


def rules_summary(reached: dict[str, int], adapter_ids: set[str],
                  reachable: set[str]) -> dict[str, Any]:
    """Which rules of adapters/known/ the run's cases were known by (cases each), which rules of
    the selected adapters none was, and which no case of this machine can be (`reachable`: what the
    workers' adapters can meet; a CUDA rule on a CPU run, a rule for another release)."""
    from conformance.known import load as load_rules

    rules = [r for r in load_rules().rules if adapter_ids & set(r.adapters)]

    def line(r: Any) -> str:
        return f"{r.source} {r.explained_by} {','.join(r.adapters)}"

    return {"reached": {r.source: reached[r.source] for r in rules if r.source in reached},
            "not_reached": [line(r) for r in rules if r.source not in reached and r.source in reachable],
            "elsewhere": [line(r) for r in rules if r.source not in reachable]}


def slug(sig: str) -> str:
    """A case id (and file name) for a signature: readable, and unique through a short hash."""
    readable = re.sub(r"[^a-z0-9.]+", "-", sig.lower())[:90].strip("-.")
    return f"fuzz-{readable}-{hashlib.sha1(sig.encode()).hexdigest()[:8]}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m conformance fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", default=None, help="families or adapter ids (default: all)")
    parser.add_argument("--budget", type=float, default=600.0,
                        help="seconds of wall-clock time for the whole run, shared among the process groups "
                             "by weight (a worker's own budget with --worker)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-cases", type=int, default=None, help="stop exploring after this many cases")
    parser.add_argument("--out", type=Path, default=Path("results/fuzz"))
    parser.add_argument("-j", "--jobs", type=int, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    sys.exit(worker_main(arguments) if arguments.worker else main(arguments))
