"""The text of a native host program (`host.HostProgram`) in MLIR's LLVM dialect: `sparsa_main`, a region
function per split kernel that claims work items from a shared counter, and `sparsa_parallel`, which runs a
region on the OpenMP team (or on the calling thread). Kernels are declared with the signature MLIR gives a
function of memrefs (each memref: allocated and aligned pointers, offset, sizes, strides), and `merge` checks
the declarations against the compiled kernels before the program joins their module."""

from __future__ import annotations

import time
from typing import Any

from torch_mlir import ir

PARALLEL = """\
// fn(frame) on the OpenMP team (GOMP_parallel at `pool`), or on this thread alone
llvm.func @sparsa_parallel(%fn: !llvm.ptr, %frame: !llvm.ptr, %team: i64, %pool: !llvm.ptr) {
  %null = llvm.mlir.zero : !llvm.ptr
  %one = llvm.mlir.constant(1 : i64) : i64
  %no_pool = llvm.icmp "eq" %pool, %null : !llvm.ptr
  %alone = llvm.icmp "sle" %team, %one : i64
  %here = llvm.or %no_pool, %alone : i1
  llvm.cond_br %here, ^here, ^team
^here:
  llvm.call %fn(%frame) : !llvm.ptr, (!llvm.ptr) -> ()
  llvm.return
^team:
  %threads = llvm.trunc %team : i64 to i32
  %flags = llvm.mlir.constant(0 : i32) : i32
  llvm.call %pool(%fn, %frame, %threads, %flags) : !llvm.ptr, (!llvm.ptr, !llvm.ptr, i32, i32) -> ()
  llvm.return
}
"""


LIBC = {"clock_gettime"}  # what the program calls in the C library (declared, resolved when it is loaded)

NOW = """\
// nanoseconds on the monotonic clock (SPARSA_PROFILE=1: each launch's time is added to its argv slot)
llvm.func @clock_gettime(i32, !llvm.ptr) -> i32
llvm.func @sparsa_now() -> i64 {{
  %one = llvm.mlir.constant(1 : i64) : i64
  %ts = llvm.alloca %one x !llvm.array<2 x i64> : (i64) -> !llvm.ptr
  %clock = llvm.mlir.constant({clock} : i32) : i32
  %r = llvm.call @clock_gettime(%clock, %ts) : (i32, !llvm.ptr) -> i32
  %s = llvm.load %ts : !llvm.ptr -> i64
  %at = llvm.getelementptr %ts[1] : (!llvm.ptr) -> !llvm.ptr, i64
  %ns = llvm.load %at : !llvm.ptr -> i64
  %giga = llvm.mlir.constant(1000000000 : i64) : i64
  %whole = llvm.mul %s, %giga : i64
  %t = llvm.add %whole, %ns : i64
  llvm.return %t : i64
}}
"""


CHECK = """\
// whether every one of `count` i{bits} indices at %p lies in low..n-1
llvm.func @sparsa_indices_ok_i{bits}(%p: !llvm.ptr, %count: i64, %low: i64, %n: i64) -> i1 {{
  %zero = llvm.mlir.constant(0 : i64) : i64
  %one = llvm.mlir.constant(1 : i64) : i64
  llvm.br ^next(%zero : i64)
^next(%i: i64):
  %more = llvm.icmp "slt" %i, %count : i64
  llvm.cond_br %more, ^check, ^good
^check:
  %at = llvm.getelementptr %p[%i] : (!llvm.ptr, i64) -> !llvm.ptr, i{bits}
  %raw = llvm.load %at : !llvm.ptr -> i{bits}
  {widen}
  %under = llvm.icmp "slt" %x, %low : i64
  %over = llvm.icmp "sge" %x, %n : i64
  %out = llvm.or %under, %over : i1
  %after = llvm.add %i, %one : i64
  llvm.cond_br %out, ^bad, ^next(%after : i64)
^good:
  %yes = llvm.mlir.constant(true) : i1
  llvm.return %yes : i1
^bad:
  %no = llvm.mlir.constant(false) : i1
  llvm.return %no : i1
}}
"""


SUM_PARTS = """\
// dst = src[0] + src[1] + ... + src[parts - 1], `count` {t} each, added in that order
llvm.func @sparsa_sum_parts_{t}(%dst: !llvm.ptr, %src: !llvm.ptr, %parts: i64, %count: i64) {{
  %zero = llvm.mlir.constant(0 : i64) : i64
  %one = llvm.mlir.constant(1 : i64) : i64
  %size = llvm.mlir.constant({size} : i64) : i64
  %bytes = llvm.mul %count, %size : i64
  "llvm.intr.memcpy"(%dst, %src, %bytes) <{{isVolatile = false}}> : (!llvm.ptr, !llvm.ptr, i64) -> ()
  llvm.br ^part(%one : i64)
^part(%p: i64):
  %more = llvm.icmp "slt" %p, %parts : i64
  llvm.cond_br %more, ^start, ^done
^start:
  %base = llvm.mul %p, %count : i64
  %from = llvm.getelementptr %src[%base] : (!llvm.ptr, i64) -> !llvm.ptr, {t}
  llvm.br ^add(%zero : i64)
^add(%i: i64):
  %inner = llvm.icmp "slt" %i, %count : i64
  llvm.cond_br %inner, ^body, ^next
^body:
  %d = llvm.getelementptr %dst[%i] : (!llvm.ptr, i64) -> !llvm.ptr, {t}
  %s = llvm.getelementptr %from[%i] : (!llvm.ptr, i64) -> !llvm.ptr, {t}
  %a = llvm.load %d : !llvm.ptr -> {t}
  %b = llvm.load %s : !llvm.ptr -> {t}
  %sum = llvm.fadd %a, %b : {t}
  llvm.store %sum, %d : {t}, !llvm.ptr
  %i1 = llvm.add %i, %one : i64
  llvm.br ^add(%i1 : i64)
^next:
  %p1 = llvm.add %p, %one : i64
  llvm.br ^part(%p1 : i64)
^done:
  llvm.return
}}
"""


class _Function:
    """One LLVM function's body being written: fresh SSA names, argv loads made once."""

    def __init__(self, argv: str):
        self.argv = argv
        self.lines: list[str] = []
        self.count = 0
        self.loaded: dict[tuple, str] = {}

    def emit(self, text: str, hint: str = "v") -> str:
        self.count += 1
        name = f"%{hint}{self.count}"
        self.lines.append(f"  {name} = {text}")
        return name

    def do(self, text: str) -> None:
        self.lines.append(f"  {text}")

    def const(self, n: int, type_: str = "i64") -> str:
        key = ("const", n, type_)
        if key not in self.loaded:
            self.loaded[key] = self.emit(f"llvm.mlir.constant({n} : {type_}) : {type_}", "c")
        return self.loaded[key]

    def at(self, base: str, index: str | int, elem: str = "i64") -> str:
        if isinstance(index, int):
            return self.emit(f"llvm.getelementptr {base}[{index}] : (!llvm.ptr) -> !llvm.ptr, {elem}", "p")
        return self.emit(f"llvm.getelementptr {base}[{index}] : (!llvm.ptr, i64) -> !llvm.ptr, {elem}", "p")

    def at_unshared(self, base: str, index: int) -> str:
        """A pointer to base[index] for one block's use (left out of the loads made once: it dominates nothing)."""
        self.count += 1
        name = f"%q{self.count}"
        self.lines.append(f"  {name} = llvm.getelementptr {base}[{index}] : (!llvm.ptr) -> !llvm.ptr, i64")
        return name

    def arg(self, slot: int, ptr: bool = False, hint: str = "a") -> str:
        """argv[slot], as an i64 or a pointer (loaded once per function)."""
        key = (slot, ptr)
        if key not in self.loaded:
            where = self.argv if slot == 0 else self.at(self.argv, slot)
            self.loaded[key] = self.emit(f"llvm.load {where} : !llvm.ptr -> {'!llvm.ptr' if ptr else 'i64'}", hint)
        return self.loaded[key]

    def binary(self, op: str, a: str, b: str) -> str:
        return self.emit(f"llvm.{op} {a}, {b} : i64")


def _memref_types(rank: int) -> list[str]:
    return ["!llvm.ptr", "!llvm.ptr", "i64"] + ["i64"] * (2 * rank)


def _signature(launch: Any) -> list[str]:
    """The LLVM argument types of a launch's kernel: each memref's, then (part, parts) where it splits so."""
    types = [t for v in launch.args for t in _memref_types(v.type.rank)]
    return types + (["i64", "i64"] if launch.kernel.split == "parts" else [])


class _Writer:
    """Writes the program of `prog` (a HostProgram)."""

    def __init__(self, prog: Any):
        self.prog = prog

    def address(self, f: _Function, ws: str, v: Any) -> str:
        place = self.prog.places[id(v)]
        if place.kind == "view":
            place = self.prog.places[id(place.source)]
        if place.kind in ("arg", "planned"):
            return f.arg(place.ptr, ptr=True, hint="ptr")
        return f.at(ws, f.arg(place.ptr, hint="off"), "i8")

    def memref(self, f: _Function, ws: str, v: Any) -> list[str]:
        """A value's memref arguments: its address twice, offset 0, its dims and strides from argv."""
        place = self.prog.places[id(v)]
        ptr = self.address(f, ws, v)
        shape = [f.arg(place.dims + i, hint="d") for i in range(2 * place.rank)]
        return [ptr, ptr, f.const(0), *shape]

    def call(self, f: _Function, launch: Any, args: list[str]) -> None:
        f.do(f"llvm.call @{launch.kernel.name}({', '.join(args)}) : ({', '.join(_signature(launch))}) -> ()")

    def region(self, index: int, launch: Any) -> tuple[str, str]:
        """The region function of a split kernel: claim work items until none is left."""
        k = launch.kernel
        f = _Function("%argv")
        f.lines.append("  %argv = llvm.load %frame : !llvm.ptr -> !llvm.ptr")
        ws = f.emit(f"llvm.load {f.at('%frame', 1)} : !llvm.ptr -> !llvm.ptr", "ws")
        counter = f.at("%frame", 2)
        items = f.arg(launch.slot, hint="items")
        args = [self.memref(f, ws, v) for v in launch.args]
        bounds = f.arg(launch.slot + 2, hint="bounds") if k.split == "rows" else None
        one = f.const(1)
        f.do("llvm.br ^claim")
        f.lines.append("^claim:")
        item = f.emit(f"llvm.atomicrmw add {counter}, {one} monotonic : !llvm.ptr, i64", "item")
        done = f.emit(f"llvm.icmp \"sge\" {item}, {items} : i64", "done")
        f.do(f"llvm.cond_br {done}, ^exit, ^work")
        f.lines.append("^work:")
        if k.split == "parts":
            self.call(f, launch, [a for m in args for a in m] + [item, items])
        else:  # rows lo..hi of the output and of the inputs cut with it
            at = f.binary("add", bounds, item)
            lo = f.emit(f"llvm.load {f.at('%argv', at)} : !llvm.ptr -> i64", "lo")
            hi = f.emit(f"llvm.load {f.at('%argv', f.binary('add', at, one))} : !llvm.ptr -> i64", "hi")
            rows = f.binary("sub", hi, lo)
            cut = list(k.rows) + [True] * len(k.outputs)
            cut_1 = list(k.rows_1) + [1] * len(k.outputs) if k.rows_1 is not None else [None] * len(cut)
            second = None  # (the plan cut dim 1: dim 0 is 1)
            if any(a is not None for a in cut_1):
                second = f.emit(f"llvm.icmp \"ne\" {f.arg(launch.slot + 3, hint='dim')}, {f.const(0)} : i64", "second")
            sliced = []
            for v, m, c, c1 in zip(launch.args, args, cut, cut_1, strict=True):
                size, rank = self.prog.places[id(v)].itemsize, v.type.rank

                def at_row(axis: int, m: list[str] = m, size: int = size, rank: int = rank) -> str:
                    step = f.binary("mul", lo, m[3 + rank + axis])  # elements before row lo along that axis
                    return f.at(m[0], f.binary("mul", step, f.const(size)), "i8")

                first = list(m)  # cut along dim 0 (where it is cut)
                if c:
                    first[0] = first[1] = at_row(0)
                    first[3] = rows
                if second is None or c1 is None and not c:
                    sliced += first
                    continue
                other = list(m)  # cut along dim 1 (where the plan chose it: dim 0 is 1)
                if c1 is not None:
                    other[0] = other[1] = at_row(c1)
                    other[3 + c1] = rows
                ptr = f.emit(f"llvm.select {second}, {other[0]}, {first[0]} : i1, !llvm.ptr", "p")
                sliced += [ptr, ptr, m[2]] + [
                    x if x == y else f.emit(f"llvm.select {second}, {y}, {x} : i1, i64", "n")
                    for x, y in zip(first[3:], other[3:], strict=True)]
            self.call(f, launch, sliced)
        f.do("llvm.br ^claim")
        f.lines.append("^exit:")
        f.do("llvm.return")
        name = f"host_{k.name}_{index}"
        head = f"// {k.op.NAME}: {k.split} split, work items claimed from frame[2]\n"
        return name, head + f"llvm.func @{name}(%frame: !llvm.ptr) {{\n" + "\n".join(f.lines) + "\n}\n"

    def main(self, regions: dict[int, str]) -> str:
        prog = self.prog
        f = _Function("%argv")
        pool = f.arg(1, ptr=True, hint="pool")
        ws = f.arg(2, ptr=True, hint="ws")
        frame = f.emit(f"llvm.alloca {f.const(3)} x i64 : (i64) -> !llvm.ptr", "frame")
        f.do(f"llvm.store %argv, {frame} : !llvm.ptr, !llvm.ptr")
        f.do(f"llvm.store {ws}, {f.at(frame, 1)} : !llvm.ptr, !llvm.ptr")
        counter = f.at(frame, 2)
        for i, launch in enumerate(prog.launches):
            k = launch.kernel
            f.lines.append(f"  // {k.op.NAME} ({k.name})")
            start = f.emit("llvm.call @sparsa_now() : () -> i64", "t") if prog.profile_slot is not None else None
            for n, (index, _, slot) in enumerate(launch.checks):
                f.lines.append(f"  // index tensor {n}: argv[{slot}] indices, each in argv[{slot + 1}].."
                               f"argv[{slot + 2}]-1")
                width = index.type.dtype[1:]
                ok = f.emit(f"llvm.call @sparsa_indices_ok_i{width}({self.address(f, ws, index)}, {f.arg(slot)}, "
                            f"{f.arg(slot + 1)}, {f.arg(slot + 2)}) : (!llvm.ptr, i64, i64, i64) -> i1", "ok")
                f.do(f"llvm.cond_br {ok}, ^ok{i}_{n}, ^bad{i}_{n}")
                f.lines.append(f"^bad{i}_{n}:")
                f.do(f"%status{i}_{n} = llvm.mlir.constant({i + 1} : i64) : i64")
                f.do(f"llvm.store %status{i}_{n}, {f.at_unshared('%argv', 3)} : i64, !llvm.ptr")
                f.do("llvm.return")
                f.lines.append(f"^ok{i}_{n}:")
            for zero in launch.zeroed:
                f.do(f'"llvm.intr.memset"({self.address(f, ws, zero)}, {f.const(0, "i8")}, '
                     f'{f.arg(prog.zeroed[id(zero)], hint="bytes")}) <{{isVolatile = false}}> : '
                     "(!llvm.ptr, i8, i64) -> ()")
            if k.split == "none":
                self.call(f, launch, [a for v in launch.args for a in self.memref(f, ws, v)])
            else:
                f.do(f"llvm.store {f.const(0)}, {counter} : i64, !llvm.ptr")
                fn = f.emit(f"llvm.mlir.addressof @{regions[i]} : !llvm.ptr", "fn")
                team = f.arg(launch.slot + 1, hint="team")
                f.do(f"llvm.call @sparsa_parallel({fn}, {frame}, {team}, {pool}) : "
                     "(!llvm.ptr, !llvm.ptr, i64, !llvm.ptr) -> ()")
            for j, (src, dst) in enumerate(launch.sum_parts):
                f.lines.append("  // the parts' slices summed into the result")
                at = launch.sum_slot + 2 * j
                f.do(f"llvm.call @sparsa_sum_parts_{dst.type.dtype}({self.address(f, ws, dst)}, "
                     f"{self.address(f, ws, src)}, {f.arg(at)}, {f.arg(at + 1)}) : "
                     "(!llvm.ptr, !llvm.ptr, i64, i64) -> ()")
            if start is not None:
                f.lines.append(f"  // its time, added to argv[{prog.profile_slot + i}]")
                took = f.binary("sub", f.emit("llvm.call @sparsa_now() : () -> i64", "t"), start)
                slot = f.at_unshared("%argv", prog.profile_slot + i)
                total = f.binary("add", f.emit(f"llvm.load {slot} : !llvm.ptr -> i64", "ns"), took)
                f.do(f"llvm.store {total}, {slot} : i64, !llvm.ptr")
        for out, v, slot in prog.copies:
            f.lines.append(f"  // result {out}: copied (an input, a weight, a view or a value returned twice)")
            dst = f.arg(prog.out_slots[out], ptr=True, hint="out")
            f.do(f'"llvm.intr.memcpy"({dst}, {self.address(f, ws, v)}, {f.arg(slot, hint="bytes")}) '
                 "<{isVolatile = false}> : (!llvm.ptr, !llvm.ptr, i64) -> ()")
        f.do("llvm.return")
        return "llvm.func @sparsa_main(%argv: !llvm.ptr) {\n" + "\n".join(f.lines) + "\n}\n"


def program_text(prog: Any) -> str:
    """The whole program: kernel declarations, sparsa_parallel, the region functions, sparsa_main."""
    w = _Writer(prog)
    declared: dict[str, str] = {}
    for launch in prog.launches:
        declared.setdefault(launch.kernel.name, ", ".join(_signature(launch)))
    regions, bodies = {}, []
    for i, launch in enumerate(prog.launches):
        if launch.kernel.split != "none":
            regions[i], text = w.region(i, launch)
            bodies.append(text)
    decls = "".join(f"llvm.func @{name}({types})\n" for name, types in declared.items())
    widths = sorted({int(c[0].type.dtype[1:]) for launch in prog.launches for c in launch.checks})
    checks = "".join(CHECK.format(bits=b, widen=f"%x = llvm.sext %raw : i{b} to i64" if b < 64 else
                                  "%x = llvm.add %raw, %zero : i64") + "\n" for b in widths)
    sums = sorted({dst.type.dtype for launch in prog.launches for _, dst in launch.sum_parts})
    checks += "".join(SUM_PARTS.format(t=t, size={"f32": 4, "f64": 8}[t]) + "\n" for t in sums)
    if prog.profile_slot is not None:
        checks += NOW.format(clock=time.CLOCK_MONOTONIC) + "\n"
    return (legend(prog) + "\n// the kernels this host calls (compiled in the same module)\n" + decls + "\n" + PARALLEL
            + "\n" + checks + "\n".join(bodies) + "\n" + w.main(regions))


def legend(prog: Any) -> str:
    """Comment lines naming argv's slots: the header, each pointer, each value's dims and strides."""

    def name(v: Any) -> str:
        owner = getattr(v, "defining_op", None)
        if owner is not None and owner.NAME == "func.param":
            return f"weight '{owner.attributes['name']}'"
        hint = getattr(v, "name_hint", None)
        return f"'{hint}'" if hint else f"a result of {owner.NAME}" if owner is not None else "a value"

    lines = ["// argv: [0] threads, [1] GOMP_parallel, [2] workspace, [3] status"]
    pointers = {p.ptr: p for p in prog.places.values() if p.kind == "arg"}
    lines += [f"//   [{slot}] {name(p.value)}" + (f" (result {prog.out_slots.index(slot)})" if slot in prog.out_slots
                                                  else "") for slot, p in sorted(pointers.items())]
    lines += [f"//   [{i}] result {n} (copied)" for n, i in enumerate(prog.out_slots) if i not in pointers]
    lines += [f"//   [{p.dims}..{p.dims + 2 * p.rank - 1}] dims and strides of {name(p.value)} ({p.kind})"
              for p in prog.places.values() if p.rank and p.kind != "virtual"]
    return "\n".join(lines) + "\n"


def merge(text: str, module: ir.Module) -> None:
    """Parse the program and move its functions into `module` (the kernels lowered to LLVM), after checking
    that each kernel it declares has that signature there."""
    host = ir.Module.parse(text)
    compiled = {op.attributes["sym_name"].value: op for op in module.body.operations
                if op.operation.name == "llvm.func"}
    for op in list(host.body.operations):
        name = op.attributes["sym_name"].value
        if len(op.regions[0].blocks) == 0 and name not in LIBC:  # a kernel's declaration
            have = compiled.get(name)
            if have is None or str(have.attributes["function_type"]) != str(op.attributes["function_type"]):
                raise RuntimeError(f"native host: kernel @{name} is not {op.attributes['function_type']} "
                                   f"({'missing' if have is None else have.attributes['function_type']})")
            continue
        module.body.append(op)
