"""Porting recipes from measurements: for one pair of adapters, what to set, what no parameter
changes, and how big each difference is on a typical case.

    python -m conformance port --from torch --to keras [--results FILE...]

Without `--results`, each of the two adapters is measured in a process of its own family (as the
probes are): every semantic probe, the adapter's translations and the harness's diagnosis of a
typical case (one training step of a [8, 1, 1, 3] NHWC batch, m 0.9, eps 1e-3, in float32 and
float16), and the raw state a default layer (on the same 8 x 3 values) and the translated layer
leave after that step. With `--results`,
the probes, declarations and divergence groups of existing results files are used instead.
Nothing about an API is written here: names come from each adapter's declared `names`, defaults
and conventions from the probes and the diagnosis. `reports` builds the report's pair picker with
`recipe`, so this module imports only the standard library at module level.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from conformance.results import Record, Status

BATCH = 8
# The typical case: one training step of a batch of 8 in NHWC with 1x1 spatial dims (a dense or 1x1
# convolution's output), so 4-D kernels (TF's fused one) run and each channel averages 8 values.
TYPICAL = {"id": "port-typical", "title": "One training step of a batch of 8, NHWC 1x1, three channels",
           "tags": [], "dtype": "float32",
           "input": {"shape": [BATCH, 1, 1, 3], "random": {"seed": 0, "mean": 0.5, "std": 1.5}},
           "params": {"axis": -1, "momentum": 0.9, "epsilon": 1.0e-3},
           "training": {"steps": 1, "expected": {}}, "inference": {"expected": {}}}
HALF = {**TYPICAL, "id": "port-typical-float16", "dtype": "float16",
        "title": "The typical case in float16"}

# what a person porting asks about, each answered by probes (values measured per adapter)
PARAMETERS = [  # (topic, canonical name(s) in `names`, probe giving the measured default)
    ("momentum", ("momentum",), "default_momentum"),
    ("epsilon", ("epsilon",), "default_epsilon"),
    ("channel axis and layout", ("axis",), "default_axis"),
    ("center / scale", ("center", "scale"), None),
    ("gamma / beta", ("gamma", "beta"), None),
    ("moving statistics", ("moving_mean", "moving_variance"), None),
    ("mode", ("mode",), "default_mode"),
]
CONVENTIONS = [  # (topic, probes): what no parameter changes
    ("moving variance estimator", ("moving_variance_estimator",)),
    ("variance algorithm", ("variance_algorithm", "large_mean_output_std_rel_error")),
    ("compute dtype", ("float16_output_dtype", "float16_moving_stats_dtype")),
    ("mode defaults", ("default_mode", "trainable_false_forces_inference")),
    ("moving statistics update (UPDATE_OPS)", ("stats_update_without_extra_step",)),
    ("batch of one", ("batch_of_one_training",)),
    ("momentum null (cumulative average)", ("momentum_none",)),
    ("epsilon 0, constant channel", ("eps_zero_constant_channel",)),
    ("several channel axes", ("multi_axis",)),
    ("out-of-range axis", ("axis_equal_rank", "axis_minus_rank_minus_one")),
]


@dataclass
class Side:
    """One adapter as measured: probes, declared names and variants, the typical case's records
    (translations and diagnosis) and raw outputs, or, from results files, its divergence groups."""

    adapter: str
    names: dict[str, str] = field(default_factory=dict)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    declared: list[str] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)  # the typical cases, or a run's records
    raw: dict[str, dict[str, list[float] | None]] = field(default_factory=dict)  # typical: state by run

    def probe(self, name: str) -> Any:
        return (self.probes.get(name) or {}).get("value")

    @cached_property
    def translation_counts(self) -> Counter:
        return Counter(t for r in self.records for t in r.translations)

    @cached_property
    def by_case(self) -> dict[str, list[Record]]:
        out: dict[str, list[Record]] = defaultdict(list)
        for r in self.records:
            out[str(r.case)].append(r)
        return out

    def translation(self, *words: str) -> str:
        """The most frequent translation line about one of `words` (the typical case's, measured)."""
        for line, _ in self.translation_counts.most_common():
            text = line.lower()
            if any(text.startswith(w) or f" {w}" in text[:40] for w in words):
                return line
        return ""

    def groups(self) -> dict[str, tuple[int, float | None]]:
        """explanation -> (records, largest max relative error of a failing output)."""
        out: dict[str, list] = defaultdict(lambda: [0, None])
        for r in self.records:
            if r.status in (Status.FAIL, Status.KNOWN):
                key = ", ".join(r.explained_by) or "unexplained"
                out[key][0] += 1
                for m in r.metrics:
                    rel = _float(m.get("max_rel"))
                    if not m.get("passed") and rel is not None:
                        out[key][1] = rel if out[key][1] is None else max(out[key][1], rel)
        return {k: (n, e) for k, (n, e) in out.items()}


@dataclass
class Line:
    topic: str
    source: str
    target: str
    differs: bool
    note: str = ""  # what to do, and the measured size of the difference


@dataclass
class Recipe:
    source: str
    target: str
    origin: str
    parameters: list[Line]
    conventions: list[Line]
    divergences: list[Line] = field(default_factory=list)  # from results files: each side's groups

    @property
    def differences(self) -> int:
        return sum(line.differs for line in self.parameters + self.conventions)


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def shown(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _ratio(a: list[float] | None, b: list[float] | None) -> float | None:
    """Median of b / a over channels (None where either is missing)."""
    if not a or not b or len(a) != len(b):
        return None
    values = sorted(y / x for x, y in zip(a, b, strict=True) if x)
    return values[len(values) // 2] if values else None


def _max_rel(a: list[float] | None, b: list[float] | None) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return max(abs(y - x) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def _raw(side: Side, run: str, name: str) -> list[float] | None:
    return (side.raw.get(run) or {}).get(name)  # type: ignore[return-value]


def _max_abs(a: list[float] | None, b: list[float] | None) -> float | None:
    if not a or not b or len(a) != len(b):
        return None
    return max(abs(y - x) for x, y in zip(a, b, strict=True))


def _metric(side: Side, case: str, output: str) -> float | None:
    for r in side.by_case.get(case, []):
        for m in r.metrics:
            if m.get("name") == output:
                return _float(m.get("max_rel"))
    return None


def _diagnosis(side: Side, case: str) -> str:
    """What the harness named for a typical case on this side: its status and variants."""
    parts = []
    for r in side.by_case.get(case, []):
        why = ", ".join(r.explained_by) or ("unexplained" if r.status is Status.FAIL else "")
        parts.append(f"{r.check} {r.status}{f' ({why})' if why else ''}")
    return "; ".join(parts)


def parameter_lines(a: Side, b: Side) -> list[Line]:
    out = []
    for topic, keys, probe in PARAMETERS:
        def spelled(side: Side, keys: tuple[str, ...] = keys, probe: str | None = probe) -> str:
            names = " / ".join(dict.fromkeys(side.names.get(k, "?") for k in keys))
            return f"{names} (default {shown(side.probe(probe))})" if probe else names

        sa, sb = spelled(a), spelled(b)
        note = ""
        if topic == "momentum":
            ta, tb = a.translation("momentum"), b.translation("momentum")
            note = f"{a.adapter}: {ta or '?'}; {b.adapter}: {tb or '?'}"
            moved = _ratio(_raw(a, "default", "moving_mean"), _raw(b, "default", "moving_mean"))
            if moved is not None and abs(moved - 1) > 1e-3:
                note += (f". With each default, the moving mean after one step of batch {BATCH} is "
                         f"{moved:.3g}x {a.adapter}'s ({b.adapter}/{a.adapter})")
        elif topic == "epsilon":
            rel = _max_rel(_raw(a, "default", "inference"), _raw(b, "default", "inference"))
            note = f"set {b.names.get('epsilon', 'epsilon')}= to {a.adapter}'s value"
            if rel is not None:
                note += f"; with each default, inference outputs differ by {rel:.2g} (max relative)"
        elif topic == "channel axis and layout":
            ta, tb = a.translation("channel axis", "axis"), b.translation("channel axis", "axis")
            note = "; ".join(f"{s.adapter}: {t}" for s, t in ((a, ta), (b, tb)) if t)
        elif topic == "mode":
            gap = _max_abs(_raw(a, "default", "fresh"), _raw(b, "default", "fresh"))
            if gap is not None and a.probe(probe) != b.probe(probe):
                note = (f"on the typical batch, fresh layers called without a mode give outputs up to "
                        f"{gap:.3g} apart: pass {b.names.get('mode', 'the mode')} explicitly")
        differs = sa != sb
        out.append(Line(topic, sa, sb, differs, note))
    return out


def convention_lines(a: Side, b: Side) -> list[Line]:
    out = []
    for topic, probes in CONVENTIONS:
        va = ", ".join(shown(a.probe(p)) for p in probes)
        vb = ", ".join(shown(b.probe(p)) for p in probes)
        differs = va != vb
        note = ""
        if topic == "moving variance estimator":
            da = ", ".join(a.declared) or "none"
            db = ", ".join(b.declared) or "none"
            ratio = _ratio(_raw(a, "canonical", "moving_variance"), _raw(b, "canonical", "moving_variance"))
            note = f"declared variants: {a.adapter} {da}; {b.adapter} {db}"
            if ratio is not None:
                m = TYPICAL["params"]["momentum"]
                va_, vb_ = (s.raw["canonical"]["moving_variance"] for s in (a, b))
                implied = _ratio([(v - m) / (1 - m) for v in va_], [(v - m) / (1 - m) for v in vb_])
                note += (f". Same translated parameters, one step of batch {BATCH} (m {m}, moving variance 1 "
                         f"before): moving variance {b.adapter}/{a.adapter} = {ratio:.4g}, the batch "
                         f"variance it averaged in {shown(implied)}x")
                differs = differs or abs(ratio - 1) > 1e-4
        elif topic == "variance algorithm":
            ea, eb = (_float(s.probe("large_mean_output_std_rel_error")) for s in (a, b))
            va, vb = shown(a.probe("variance_algorithm")), shown(b.probe("variance_algorithm"))
            differs = va != vb
            if ea is not None and eb is not None:
                note = (f"probe large_mean_output_std_rel_error (float32, large channel mean): output std "
                        f"off the float64 reference's by {ea:.2g} ({a.adapter}) and {eb:.2g} ({b.adapter})")
        elif topic == "compute dtype":
            ra, rb = _metric(a, HALF["id"], "output"), _metric(b, HALF["id"], "output")
            parts = [f"{s.adapter}: output max rel. error {shown(r)}, {_diagnosis(s, HALF['id'])}"
                     for s, r in ((a, ra), (b, rb)) if r is not None or _diagnosis(s, HALF["id"])]
            note = ("float16 typical case: " + "; ".join(parts)) if parts else ""
            differs = differs or _diagnosis(a, HALF["id"]) != _diagnosis(b, HALF["id"])
        if differs and not note:  # how each side's probe measured it, in the probe's own words
            note = "; ".join(f"{s.adapter}: {detail}" for s in (a, b)
                             if (detail := (s.probes.get(probes[0]) or {}).get("detail")))
        out.append(Line(topic, va, vb, differs, note))
    return out


def divergence_lines(a: Side, b: Side) -> list[Line]:
    """Each side's failing and known records grouped by explanation (records of a run, not the
    typical case): what this run measured where the two differ from the reference."""
    out = []
    for side in (a, b):
        for why, (n, rel) in sorted(side.groups().items()):
            note = f"{n} records" + (f", max rel. error {rel:.3g}" if rel is not None else "")
            source, target = (side.adapter, "") if side is a else ("", side.adapter)
            out.append(Line(why, source, target, True, note))
    return out


def recipe(a: Side, b: Side, origin: str, groups: bool = False) -> Recipe:
    """`groups`: add each side's divergence groups (records from a run rather than the typical case)."""
    return Recipe(a.adapter, b.adapter, origin, parameter_lines(a, b), convention_lines(a, b),
                  divergence_lines(a, b) if groups else [])


def text(r: Recipe) -> str:
    """The recipe as printed: what to translate, what no parameter changes, what is the same."""
    width = max(12, *(len(line.source) for line in r.parameters + r.conventions))
    topic = max(len(line.topic) for line in r.parameters + r.conventions)
    rows = [f"Porting {r.source} -> {r.target}", f"({r.origin})", "",
            "Parameters to translate:"]
    for line in r.parameters:
        rows.append(f"  {line.topic:<{topic}} {line.source:<{width}}  ->  {line.target}")
        if line.note:
            rows.append(f"  {'':<{topic}} {line.note}")
    rows += ["", "Conventions no parameter changes (measured; * differs):"]
    same = []
    for line in r.conventions:
        if not line.differs:
            same.append(f"{line.topic} ({line.source})")
            continue
        rows.append(f"* {line.topic:<{topic}} {line.source:<{width}}  vs  {line.target}")
        if line.note:
            rows.append(f"  {'':<{topic}} {line.note}")
    for line in r.conventions:
        if not line.differs and line.note:
            rows.append(f"  {line.topic:<{topic}} same; {line.note}")
    if same:
        rows += ["", "Same in both: " + "; ".join(same)]
    if r.divergences:
        rows += ["", "Divergences in these results (failing and known records by explanation):"]
        rows += [f"  {line.source or line.target}: {line.topic}: {line.note}" for line in r.divergences]
    return "\n".join(rows)


# ---------------------------------------------------------------- sides from results files


def sides_from_results(paths: list[Path]) -> dict[str, Side]:
    from conformance.results import read

    sides: dict[str, Side] = {}
    for path in paths:
        data = read(path)
        env = data.environment if isinstance(data.environment, dict) else {}
        for adapter_id, info in (env.get("adapters") or {}).items():
            side = sides.setdefault(adapter_id, Side(adapter_id))
            info = info if isinstance(info, dict) else {}
            side.names = dict(info.get("names") or side.names)
            side.declared = list((info.get("conventions") or {}).get("variants") or side.declared)
        for adapter_id, entries in (data.probes or {}).items():
            sides.setdefault(adapter_id, Side(adapter_id)).probes.update(entries or {})
        for record in data.records:
            if record.adapter:
                sides.setdefault(str(record.adapter), Side(str(record.adapter))).records.append(record)
    return sides


# ---------------------------------------------------------------- measuring (one process per family)


def measure_side(adapter_id: str) -> dict[str, Any]:
    """Probes, the typical cases through the harness, and the raw state after one step."""
    import numpy as np

    import adapters as registry
    from conformance import probes
    from conformance.evaluate import Outcome, evaluate, execute
    from conformance.generate import filled
    from conformance.known import load as load_rules
    from conformance.loader import LoadedCase
    from conformance.plugin import case_summary
    from conformance.problem import build
    from conformance.schema import Case

    adapter = registry.load(adapter_id)
    rules = load_rules()
    out: dict[str, Any] = {"names": dict(adapter.names), "declared": list(adapter.conventions.variants),
                           "probes": {name: probes.measure(adapter, name) for name in probes.PROBES},
                           "records": [], "raw": {}}
    for doc in (TYPICAL, HALF):
        case = Case.model_validate(filled(doc, Path(f"{doc['id']}.yaml")))
        loaded = LoadedCase(case, Path(f"{doc['id']}.yaml"), 1)
        for check in case.checks:
            outcome = Outcome()
            try:
                evaluate(adapter, case, check, outcome, rules)  # type: ignore[arg-type]
            except Exception as exc:
                outcome.status, outcome.reason = Status.ERROR, f"{type(exc).__name__}: {exc}"
            record = outcome.fill(Record(case=case.id, file="", adapter=adapter_id, check=check,
                                         family=registry.ADAPTERS[adapter_id].family,
                                         case_info=case_summary(loaded)))
            out["records"].append(record.to_json())
        if doc is TYPICAL:
            problem = build(case, "training")
            try:
                got = execute(adapter, problem, "training")
                out["raw"]["canonical"] = {k: np.ravel(v).tolist() for k, v in got.items()
                                           if k in ("moving_mean", "moving_variance") and v is not None}
            except Exception as exc:
                out["raw"]["canonical_error"] = f"{type(exc).__name__}: {exc}"
            x = problem.batches[0].reshape(BATCH, -1)  # [8, 3]: channels at 1 = -1, every default axis
            default: dict[str, Any] = {}
            for key in ("train", "inference", "fresh"):
                try:
                    layer = adapter.default_layer(x.shape)
                    obs = layer.train_step(x) if key == "train" else layer.call(
                        x, "inference" if key == "inference" else None)
                except Exception:  # no default layer, or the API refuses: the probes say why
                    continue
                if key == "train":
                    default["moving_mean"] = np.ravel(obs.moving_mean).tolist()
                    default["moving_variance"] = np.ravel(obs.moving_variance).tolist()
                else:
                    default[key] = np.ravel(obs.output).tolist()
            out["raw"]["default"] = default
    return out


def worker_main(argv: list[str]) -> int:
    import os

    import adapters as registry

    parser = argparse.ArgumentParser(prog="python -m conformance.port measure")
    parser.add_argument("--framework", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    ids = registry.resolve(args.framework)
    os.environ.update(registry.environment_for(ids))
    from conformance.results import write_atomically

    write_atomically(args.out, {i: measure_side(i) for i in ids})
    return 0


def measured_sides(ids: list[str]) -> dict[str, Side]:
    """Each adapter measured in its own family's process, as the probes are."""
    from conformance.families import Group, groups_for, run_each, tail

    groups = groups_for(",".join(ids))
    sides: dict[str, Side] = {}
    with tempfile.TemporaryDirectory(prefix="bnconform-port-") as tmp:
        folder = Path(tmp)
        def command(g: Group) -> list[str]:
            return [sys.executable, "-m", "conformance.port", "measure", f"--out={folder}/{g.name}.json",
                    f"--framework={','.join(g.adapter_ids)}"]

        run_each(groups, command, folder / "logs", timeout=900)
        for g in groups:
            try:
                data = json.loads((folder / f"{g.name}.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                raise SystemExit(f"measuring {','.join(g.adapter_ids)} failed "
                                 f"({g.problem or f'exit {g.returncode}'}):\n{tail(g.log, 15)}") from None
            for adapter_id, m in data.items():
                sides[adapter_id] = Side(adapter_id, m["names"], m["probes"], m["declared"],
                                         [Record.from_json(r) for r in m["records"]], m["raw"])
    return sides


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["measure"]:
        return worker_main(given[1:])
    parser = argparse.ArgumentParser(prog="python -m conformance port", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, help="adapter id you port from")
    parser.add_argument("--to", dest="target", required=True, help="adapter id you port to")
    parser.add_argument("--results", nargs="+", type=Path, metavar="FILE",
                        help="read probes and records from results files instead of measuring")
    parser.add_argument("--json", action="store_true", help="the recipe as JSON")
    args = parser.parse_args(given)
    if args.results:
        sides = sides_from_results(args.results)
        origin = f"from results files {', '.join(map(str, args.results))}: their probes and records"
    else:
        sides = measured_sides([args.source, args.target])
        origin = (f"measured now, each adapter in its own family's process: every probe, and the typical "
                  f"case (one step of a [{BATCH}, 1, 1, 3] NHWC batch, m 0.9, eps 1e-3, float32 and float16) "
                  f"through the harness and its diagnosis")
    missing = [i for i in (args.source, args.target) if i not in sides]
    if missing:
        known = ", ".join(sorted(sides))
        print(f"no measurements of {', '.join(missing)} (adapters: {known})", file=sys.stderr)
        return 2
    r = recipe(sides[args.source], sides[args.target], origin, groups=bool(args.results))
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(r), indent=1))
    else:
        print(text(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
