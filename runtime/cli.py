"""The `sparsa` command line."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from sparsa import knobs
from sparsa.ir.diagnostics import SparsaError


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise SparsaError(f"cannot read {path}: {e.strerror}") from None


def _write(text: str, path: str | None) -> None:
    if path is None or path == "-":
        sys.stdout.write(text)
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def cmd_opt(args: argparse.Namespace, options: knobs.DebugOptions) -> int:
    """`sparsa opt FILE.sir --passes P1,P2`: textual IR in, passes, textual IR out (like mlir-opt)."""
    from sparsa.ir import parse_module, print_module, verify_module
    from sparsa.passes import PassManager

    text = _read(args.file)
    module = parse_module(text, "<stdin>" if args.file == "-" else args.file)
    pm = PassManager(args.passes or "", options) if args.passes else None
    if pm is None:
        if not options.no_verify:
            verify_module(module)
    else:
        pm.run(module)
    _write(print_module(module), args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsa", description="A compiler for sparse neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("opt", help="run passes on textual IR (.sir) and print the result")
    opt.add_argument("file", help="a .sir file, or - for standard input")
    opt.add_argument("--passes", help="pipeline, e.g. canonicalize,cse,dce (default: parse and verify only)")
    opt.add_argument("-o", "--output", help="write the IR here instead of standard output")
    knobs.add_arguments(opt)
    opt.set_defaults(func=cmd_opt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print a positioned message and exit 1; never a traceback unless --debug."""
    args = build_parser().parse_args(argv)
    options = knobs.DebugOptions.from_env().update_from_args(args)
    try:
        return args.func(args, options)
    except SparsaError as e:
        print(str(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # an internal error: say so plainly, show the trace only on request
        if options.debug:
            traceback.print_exc()
        else:
            print(f"sparsa: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
                  file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
