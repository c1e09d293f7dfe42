"""The `sparsa` command line."""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from typing import Any

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


def _write(text: str | bytes, path: str | None) -> None:
    """Text, or bytes (object code: to a file or a pipe, never a terminal), to `path` or standard output."""
    binary = isinstance(text, bytes)
    if path is None or path == "-":
        if binary and sys.stdout.isatty():
            raise SparsaError("object code is binary: write it to a file with -o FILE.o")
        (sys.stdout.buffer if binary else sys.stdout).write(text)
        return
    with open(path, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
        f.write(text)


def _target_name(choices: Sequence[str]) -> Any:
    """An argparse type for --target: one of `choices`, or `NAME:<variant>` for a backend that takes one
    (cpu:x86-64-v3, cpu:aarch64, ...), checked when the backend is made."""
    from sparsa.backends import base as backends

    def check(name: str) -> str:
        base, colon, variant = name.partition(":")
        if name in choices or (colon and variant and base in backends.REGISTRY and backends.REGISTRY[base].VARIANT):
            return name
        raise argparse.ArgumentTypeError(f"invalid choice: '{name}' (choose from "
                                         f"{', '.join([*choices, *backends.variant_names()])})")

    return check


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


def _input_array(spec: str, name: str, model: object, seed: int) -> object:
    """`randn:64,512`, `randint:HIGH:2,16`, `zeros:4,8` or a `.npy` path, typed like the model's input."""
    import numpy as np

    from sparsa.ir.types import numpy_dtype

    names = model.input_names
    if name not in names:
        raise SparsaError(f"model '{model.name}' has no input '{name}' (inputs: {', '.join(names)})")
    dtype = numpy_dtype(model.input_types[names.index(name)].dtype)
    if spec.endswith(".npy"):
        try:
            return np.load(spec)
        except OSError as e:
            raise SparsaError(f"cannot read {spec}: {e}") from None
    kind, _, rest = spec.partition(":")
    high = None
    if kind == "randint":
        high_text, _, rest = rest.partition(":")
        high = _int(high_text, spec)
    try:
        shape = tuple(int(d) for d in rest.split(",")) if rest else ()
    except ValueError:
        raise SparsaError(f"bad shape in --input {name}={spec}: expected comma-separated integers") from None
    rng = np.random.default_rng(seed + names.index(name) + 1)
    if kind == "randn":
        if dtype.kind != "f":
            raise SparsaError(f"input '{name}' is {dtype}; use randint:HIGH:SHAPE for integer inputs")
        return rng.standard_normal(shape).astype(dtype)
    if kind == "randint":
        return rng.integers(0, high, size=shape).astype(dtype)
    if kind in ("zeros", "ones"):
        return (np.zeros if kind == "zeros" else np.ones)(shape, dtype=dtype)
    raise SparsaError(f"bad --input {name}={spec}: expected randn:SHAPE, randint:HIGH:SHAPE, zeros:SHAPE, "
                      f"ones:SHAPE or a .npy file")


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SparsaError(f"bad --input value {spec}: expected randint:HIGH:SHAPE") from None


def _process_group(enabled: bool) -> Any:
    """With --expert-parallel: the process group torchrun set up (gloo), and this rank's prefix for printing."""
    if not enabled:
        return None, ""
    import os

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SparsaError("--expert-parallel runs one process per rank under torchrun, e.g. torchrun "
                          "--nproc-per-node 2 --no-python sparsa run model.sp --random-weights --expert-parallel")
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.group.WORLD, f"[rank {dist.get_rank()}/{dist.get_world_size()}] "


def cmd_run(args: argparse.Namespace, options: knobs.DebugOptions) -> int:
    """`sparsa run FILE.sp`: compile, load or make weights, run on the given inputs, report shapes and time."""
    import time

    import numpy as np

    import sparsa

    group, rank = _process_group(args.expert_parallel)
    seed = args.seed + (group.rank() if group is not None else 0)  # each rank its own tokens
    t0 = time.perf_counter()
    print(f"{rank}compiling {args.file} for {args.target} ...", file=sys.stderr, flush=True)
    model = sparsa.compile(args.file, model=args.model, target=args.target, options=options,
                           expert_parallel=group)
    t1 = time.perf_counter()
    if args.weights:
        model.load_weights(args.weights, prune=args.prune)
    elif args.random_weights:
        model.init_weights(args.seed)
    elif model.specs:
        raise SparsaError(f"model '{model.name}' has {len(model.specs)} weights: pass --weights FILE or "
                          f"--random-weights")
    given = {}
    for item in args.input or []:
        name, eq, spec = item.partition("=")
        if not eq:
            raise SparsaError(f"bad --input {item!r}: expected NAME=randn:SHAPE or NAME=file.npy")
        given[name] = _input_array(spec, name, model, seed)
    missing = [n for n in model.input_names if n not in given]
    if missing:
        raise SparsaError(f"model '{model.name}' needs --input for {', '.join(missing)} "
                          f"(e.g. --input {missing[0]}=randn:64,512)")
    print(f"{rank}running {model.name} ...", file=sys.stderr, flush=True)
    t2 = time.perf_counter()
    outs = model(**given)
    t3 = time.perf_counter()
    outs = outs if isinstance(outs, tuple) else (outs,)
    for i, o in enumerate(outs):
        finite = bool(np.isfinite(o).all()) if o.dtype.kind == "f" else True
        print(f"{rank}output {i}: shape {list(o.shape)} {o.dtype}  checksum {float(np.sum(o, dtype=np.float64)):.6e}  "
              f"mean|x| {float(np.mean(np.abs(o))) if o.size else 0.0:.6e}{'' if finite else '  (non-finite values)'}")
    print(f"{rank}compile {1e3 * (t1 - t0):.1f} ms, run {1e3 * (t3 - t2):.1f} ms ({model.target})")
    if group is not None:
        a2a = model.stats()["all_to_all"]
        print(f"{rank}all_to_all: sent {a2a['sent_bytes']} B, received {a2a['received_bytes']} B to and from other "
              f"ranks, kept {a2a['local_bytes']} B, counts {a2a['count_bytes']} B")
    if args.out:
        out = args.out if group is None else args.out.replace(".npz", "") + f".rank{group.rank()}.npz"
        np.savez(out, **{f"output{i}": o for i, o in enumerate(outs)})
        print(f"{rank}wrote {out}")
    return 0


def cmd_explain(args: argparse.Namespace, options: knobs.DebugOptions) -> int:
    """`sparsa explain FILE.sp`: run once on random inputs and show where the work goes."""
    import time

    import numpy as np

    import sparsa
    from sparsa.ir.dims import evaluate
    from sparsa.ir.types import numpy_dtype
    from sparsa.runtime.explain import format_report, save_block_map_png

    group, rank = _process_group(args.expert_parallel)
    seed = args.seed + (group.rank() if group is not None else 0)
    model = sparsa.compile(args.file, model=args.model, target=args.target, options=options,
                           expert_parallel=group)
    if args.weights:
        model.load_weights(args.weights, prune=args.prune)
    else:
        model.init_weights(args.seed)
    dims: dict[str, int] = {}
    for item in args.shape or []:
        name, eq, value = item.partition("=")
        if not eq or not value.isdigit():
            raise SparsaError(f"bad --shape {item!r}: expected NAME=SIZE, e.g. --shape S=4096")
        dims[name] = int(value)
    given = {}
    for item in args.input or []:
        name, eq, spec = item.partition("=")
        given[name] = _input_array(spec, name, model, seed)
    rng = np.random.default_rng(seed)
    inputs = []
    for name, t in zip(model.input_names, model.input_types, strict=True):
        if name in given:
            inputs.append(given[name])
            continue
        try:
            shape = [evaluate(d, dims) if d is not None else 1 for d in t.shape]
        except KeyError as e:
            raise SparsaError(f"input '{name}' has symbolic size {e.args[0]}: give it with --shape "
                              f"{e.args[0]}=N (or --input {name}=...)") from None
        dt = numpy_dtype(t.dtype)
        inputs.append(rng.standard_normal(shape).astype(dt) if dt.kind == "f" else np.zeros(shape, dt))
    print(f"running {model.name} once to measure ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    model(*inputs)
    elapsed = time.perf_counter() - t0
    report = model.last_report
    if report is None:  # a native target: the same IR (its pipeline) recorded op by op by the reference
        twin = sparsa.compile(args.file, model=args.model, target="reference", passes=model.backend.PIPELINE,
                              expert_parallel=group)
        twin.load_weights(model.weights)
        twin(*inputs)
        report = twin.last_report
        print(f"{model.name} on {model.target}: one call took {1e3 * elapsed:.1f} ms (the first, compiling included "
              f"where the target compiles lazily); the figures below are the reference's run of the same IR")
    print(format_report(report, rank + model.name), end="")
    if args.block_map:
        maps = [o for o in report.ops if o.block_map is not None]
        if not maps:
            raise SparsaError(f"model '{model.name}' has no attention with a block map to draw")
        save_block_map_png(maps[0].block_map, args.block_map, f"{model.name} attention at {maps[0].where}")
        print(f"wrote {args.block_map}")
    return 0


def cmd_compile(args: argparse.Namespace, options: knobs.DebugOptions) -> int:
    """`sparsa compile FILE.sp --emit ir`: the IR after the target's pipeline, or a backend stage (cpu: mlir,
    llvm; triton: the whole generated module, or its kernels or launcher alone)."""
    import sparsa

    model = sparsa.compile(args.file, model=args.model, target=args.target, passes=args.passes, options=options,
                           expert_parallel=args.expert_parallel)
    _write(model.ir(grad=args.grad) if args.emit == "ir" else model.stage(args.emit, grad=args.grad), args.output)
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

    from sparsa.backends import base as backends

    targets = (backends.AUTO, *backends.names())
    stages = ["ir"] + list(dict.fromkeys(s for name in backends.names() for cls in [backends.REGISTRY[name]]
                                         for s in (*cls.STAGES, *cls.EMIT_ALIASES, *cls.BINARY_STAGES)))
    target = _target_name(targets)
    run = sub.add_parser("run", help="compile a .sp model and run it on given or random inputs")
    run.add_argument("file", help="a .sp file")
    run.add_argument("--model", help="which model of the file (default: the last one)")
    w = run.add_mutually_exclusive_group()
    w.add_argument("--weights", help="a .safetensors or .npz file of weights by dotted name")
    w.add_argument("--random-weights", action="store_true", help="deterministic random weights (see --seed)")
    run.add_argument("--prune", action="store_true", help="prune loaded weights to their sparse layouts")
    run.add_argument("--seed", type=int, default=0, help="seed for random weights and inputs (default 0)")
    run.add_argument("--input", action="append", metavar="NAME=SPEC",
                     help="an input: randn:SHAPE, randint:HIGH:SHAPE, zeros:SHAPE, ones:SHAPE or a .npy file")
    run.add_argument("--target", default=backends.AUTO, type=target, metavar="TARGET",
                     help="where to run (default auto: triton with an NVIDIA GPU, else cpu, else reference)")
    run.add_argument("--out", help="save the outputs to this .npz file (per rank: FILE.rankN.npz)")
    run.add_argument("--expert-parallel", action="store_true",
                     help="split the MoE experts over the ranks torchrun started (gloo); each rank runs its own inputs")
    knobs.add_arguments(run)
    run.set_defaults(func=cmd_run)

    exp = sub.add_parser("explain", help="run once and report FLOPs done vs dense, block maps, routing, kernels")
    exp.add_argument("file", help="a .sp file")
    exp.add_argument("--model", help="which model of the file (default: the last one)")
    exp.add_argument("--shape", action="append", metavar="NAME=SIZE", help="a symbolic size, e.g. S=4096")
    exp.add_argument("--input", action="append", metavar="NAME=SPEC", help="an input, as for sparsa run")
    exp.add_argument("--weights", help="weights file (default: random weights)")
    exp.add_argument("--prune", action="store_true", help="prune loaded weights to their sparse layouts")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--target", default="reference", type=target, metavar="TARGET",
                     help="the run that is explained (default: the reference interpreter, which records every op)")
    exp.add_argument("--block-map", metavar="OUT.png", help="draw the first attention block map to a PNG")
    exp.add_argument("--expert-parallel", action="store_true",
                     help="under torchrun: each rank explains its own call, tokens and bytes per rank included")
    knobs.add_arguments(exp)
    exp.set_defaults(func=cmd_explain)

    comp = sub.add_parser("compile", help="compile a .sp model and print its IR")
    comp.add_argument("file", help="a .sp file")
    comp.add_argument("--model", help="which model of the file (default: the last one)")
    comp.add_argument("--target", default=backends.AUTO, type=target, metavar="TARGET",
                      help=f"{', '.join(targets)}, or cpu:<machine> for ahead-of-time code (cpu:x86-64-v3, "
                           "cpu:x86-64-v4, cpu:aarch64, an LLVM CPU name or triple)")
    comp.add_argument("--emit", default="ir", choices=stages, help="the IR, or a stage of the target's backend")
    comp.add_argument("--passes", help="override the target's pipeline")
    comp.add_argument("--grad", action="store_true",
                      help="the backward function (reverse mode: the model's vjp) instead of the forward")
    comp.add_argument("--expert-parallel", type=int, metavar="RANKS",
                      help="compile for the MoE experts split over RANKS processes (shard-experts), to read the code")
    comp.add_argument("-o", "--output", help="write here instead of standard output")
    knobs.add_arguments(comp)
    comp.set_defaults(func=cmd_compile)
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
