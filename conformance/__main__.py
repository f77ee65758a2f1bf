"""`python -m conformance`: fill, validate, list, schema, semantics, fuzz, port, run.

Imports no framework: `run` starts one pytest process per family for that.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conformance import DEFAULT_CASES, RESULTS_DIR
from conformance.loader import CaseErrors, load_folders
from conformance.schema import schema_text

SCHEMA_PATH = DEFAULT_CASES / "schema.json"


def cmd_validate(args: argparse.Namespace) -> int:
    folders = args.dirs or [DEFAULT_CASES]
    cases, errors = load_folders(folders)
    for error in errors:
        print(error)
    files = {str(e.path) for e in errors}
    print(f"{len(cases)} valid case(s); {len(errors)} error(s) in {len(files)} file(s)",
          file=sys.stderr)
    return 1 if errors else 0


def cmd_fill(args: argparse.Namespace) -> int:
    from conformance.fill import fill_file

    status = 0
    for path in args.files:
        try:
            written = fill_file(path)
            print(f"{path}: {written} expected field(s) written")
        except CaseErrors as exc:
            print(exc, file=sys.stderr)
            status = 1
    return status


def cmd_list(args: argparse.Namespace) -> int:
    cases, errors = load_folders(args.dirs or [DEFAULT_CASES])
    for loaded in sorted(cases, key=lambda c: c.case.id):
        c = loaded.case
        print(f"{c.id:<40} {','.join(c.checks) or '-':<30} {','.join(c.tags)}")
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


def cmd_schema(args: argparse.Namespace) -> int:
    SCHEMA_PATH.write_text(schema_text(), encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


def cmd_semantics(args: argparse.Namespace) -> int:
    from conformance.probes import semantics_main

    return semantics_main(args.framework, args.json, args.jobs)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from conformance import fuzz

    return fuzz.main(fuzz.parse(args.rest))


def cmd_port(args: argparse.Namespace) -> int:
    from conformance.port import main as port_main

    return port_main(args.rest)


def cmd_run(args: argparse.Namespace) -> int:
    from conformance.run import main as run_main

    return run_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="schema-check case files; exit 1 on any error")
    p.add_argument("dirs", nargs="*", type=Path)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("fill", help="write expected values from the float64 reference")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(func=cmd_fill)
    p = sub.add_parser("list", help="case ids, checks and tags")
    p.add_argument("dirs", nargs="*", type=Path)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("schema", help="regenerate cases/schema.json from the case model")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("semantics", help="measure every adapter's defaults and pitfalls (probes)")
    p.add_argument("--framework", default=None, help="families or adapter ids (default: every family)")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of the text table")
    p.add_argument("-j", "--jobs", type=int, default=None)
    p.set_defaults(func=cmd_semantics)
    p = sub.add_parser("fuzz", add_help=False,
                       help="generated cases on every family, differences grouped and shrunk "
                            "(python -m conformance fuzz --help)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_fuzz)
    p = sub.add_parser("port", add_help=False,
                       help="a porting recipe for two adapters, from measurements "
                            "(python -m conformance port --from torch --to keras)")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_port)
    p = sub.add_parser("run", help="every family in its own process, then the HTML report")
    p.add_argument("--framework", default=None,
                   help="families or adapter ids, comma-separated (default: every family)")
    p.add_argument("-j", "--jobs", type=int, default=None, help="processes at once (default: cores)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--cases", action="append", type=Path, metavar="DIR")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per family process")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "gpu"),
                   help="where the torch and JAX families compute (default cpu); recorded in the results")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--progress-every", type=float, default=5.0, metavar="SECONDS",
                   help="print each family's items done / total / failed this often while running")
    p.set_defaults(func=cmd_run)
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["fuzz"]:  # its own parser, --help included
        return cmd_fuzz(argparse.Namespace(rest=given[1:]))
    if given[:1] == ["port"]:
        return cmd_port(argparse.Namespace(rest=given[1:]))
    args = parser.parse_args(given)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
