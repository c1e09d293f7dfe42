"""MLIR -> LLVM -> native code with the ExecutionEngine of the MLIR Python bindings, and calls through the
C interface with NumPy arrays (memref descriptors written by `_packed_args`)."""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch_mlir import execution_engine, ir, passmanager
from torch_mlir.dialects import arith, memref
from torch_mlir.dialects.transform import interpreter

from sparsa.backends.base import Executable
from sparsa.backends.cpu import (  # noqa: F401 (their rules)
    aot,
    attn,
    attn_grad,
    block_map,
    cache,
    matmul,
    moe,
    moe_pack,
    moe_wgrad,
    scan,
    scan_grad,
    sparse,
    tensor,
    tensor_linalg,
    tensor_reduce,
    tensor_shape,
)
from sparsa.backends.cpu.context import LAUNCHES, KernelContext
from sparsa.backends.cpu.host import ALIGN, HEADER, STATUS, WORKSPACE, HostProgram, address
from sparsa.backends.cpu.host_text import merge
from sparsa.backends.cpu.outputs import aligned
from sparsa.backends.cpu.outputs import empty as pooled_empty
from sparsa.backends.cpu.schedule import schedule
from sparsa.backends.cpu.signature import Kernel
from sparsa.backends.cpu.target import CpuTarget, host_target
from sparsa.backends.cpu.threads import (
    SPLIT_WORK,
    num_threads,
    one_part_below,
    openmp_parallel,
    row_bounds,
    together,
    work,
)
from sparsa.backends.reference.interpreter import Interpreter
from sparsa.ir.analysis import weight_only_ops
from sparsa.ir.core import Operation, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import is_float, numpy_dtype
from sparsa.knobs import deterministic, native_host, profile

# After the schedule (tiled, vectorized, bufferized): free every buffer a kernel allocates (its temporaries
# would leak otherwise), then from vectors and loops to LLVM. Vector transfers are unrolled rather than staged
# through stack buffers, which inside a kernel's loops would grow the stack every iteration.
PIPELINE = ("builtin.module(ownership-based-buffer-deallocation,canonicalize,buffer-deallocation-simplification,"
            "bufferization-lower-deallocations,canonicalize,convert-vector-to-scf{full-unroll=true},"
            "convert-linalg-to-loops,expand-strided-metadata,lower-affine,convert-scf-to-cf,"
            # math on vectors to LLVM intrinsics first; what has none becomes libm calls, then vectors go
            "convert-math-to-llvm,convert-math-to-libm,convert-vector-to-llvm,finalize-memref-to-llvm,"
            "convert-func-to-llvm,convert-arith-to-llvm,convert-cf-to-llvm,convert-ub-to-llvm,"
            "reconcile-unrealized-casts)")

# The fast-math flag every float multiply and add carries (see _contract).
CONTRACT = "contract"
# LLVM's optimization level for the JIT. O3 took 4.8 s on the sliding-window model (its extra loop passes on
# the attention kernel's scalar loops) against 0.3 s at O2, for the same vector code in the scheduled tiles.
OPT_LEVEL = 2

_NO_FIXED: tuple = ([], [], ())  # the native host's weight-only arrays, addresses and shapes, when it reads none
def _packed_args(arrays: Sequence[np.ndarray], scalars: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The packed calling convention's argument array for `arrays` (memrefs) then `scalars` (index values):
    one pointer per argument, to a pointer to its memref descriptor (allocated, aligned, offset, shape,
    strides in elements: the same int64 layout for every element type) or to the scalar itself. Built in
    one int64 buffer (torch-mlir's ctypes descriptors cost 16 us each: a new Structure class per call).
    Returns (packed, storage): keep both alive over the call."""
    n = len(arrays)
    sizes = [3 + 2 * a.ndim for a in arrays]
    slots = n + len(scalars)  # descriptors' addresses, then the packed pointers, then the data
    store = np.empty(2 * slots + sum(sizes) + len(scalars), np.int64)
    base = store.ctypes.data
    at = 2 * slots
    for i, a in enumerate(arrays):
        ptr = a.ctypes.data
        store[at:at + 3] = (ptr, ptr, 0)
        store[at + 3:at + 3 + a.ndim] = a.shape
        store[at + 3 + a.ndim:at + sizes[i]] = [st // a.itemsize for st in a.strides]
        store[i] = base + 8 * at
        at += sizes[i]
    for j, v in enumerate(scalars):
        store[at + j] = v
        store[n + j] = base + 8 * (at + j)
    store[slots:2 * slots] = base + 8 * np.arange(slots)  # packed arg i: the address of slot i
    store[slots + n:2 * slots] = store[n:slots]  # a scalar's packed arg points at the value itself
    return store[slots:2 * slots], store


def _build(func_op: Operation, constant_args: frozenset[int], weight_only: set[int],
           target: CpuTarget | None = None) -> tuple:
    """(module, builder, kernel of each op): the MLIR module of func_op's kernels, in the current context."""
    block = func_op.regions[0].block
    fixed = {id(a) for i, a in enumerate(block.args) if i in constant_args}
    fixed |= {id(r) for op in block.ops if id(op) in weight_only for r in op.results}
    module = ir.Module.create()
    builder = KernelContext(module, fixed, target)
    kernels = {}
    # the grouped GEMMs' and the dense matmuls' weights packed from their sources: the transposes are never made
    views = moe_pack.packed_views(block.ops, fixed) | matmul.read_transposed(block.ops, fixed)
    builder.packed = views
    groups = fused_groups(block.ops, weight_only | views)
    tails = matmul.epilogues(block.ops, groups, weight_only | views)  # matmuls made in their epilogue's kernel
    inside = {id(op) for ops, _ in groups.values() for op in ops[:-1]}  # made in their readers' kernels
    inside |= {id(o) for mm, chain, _ in tails.values() for o in [mm, *chain[:-1]]}
    joined = moe_wgrad.joined_weight_grads(block.ops, weight_only | views | inside)  # made in place in their concat
    inside |= {id(g) for grads in joined.values() for g in grads}
    for op in block.ops[:-1]:
        if id(op) in inside:
            continue
        if id(op) in joined:
            start = len(builder.tiled)
            kernels[id(op)] = builder.extra(moe_wgrad.joined_weight_grads_kernel(builder, op, joined[id(op)]), start)
            continue
        if id(op) in tails:
            kernels[id(op)] = matmul.epilogue_kernel(builder, *tails[id(op)])
            continue
        if id(op) in groups:
            kernels[id(op)] = builder.fused(*groups[id(op)])
            continue
        k = builder.kernel(op) if id(op) not in weight_only and id(op) not in views else None
        if k is not None:
            kernels[id(op)] = k
    return module, builder, kernels, (inside, set(groups) - set(tails))


def fused_groups(ops: list[Operation], skip: set[int]) -> dict[int, tuple[list[Operation], list[Value]]]:
    """Chains of elementwise ops that become one kernel (`KernelContext.fused`): the last op's id -> (the group's
    ops in order, the values it reads from outside). An elementwise result is stored only where something other
    than an elementwise op of its shape reads it (or it is returned); otherwise each group that reads it makes it
    again in registers, as Inductor inlines pointwise ops into their readers (a backward's sigmoid read by four
    of the gradient's steps, the clamps a recomputed forward feeds to two gradients), with at most INLINED_USES
    readers. A sum may end a chain (the chain's value summed as it is made: `sum(h * c, axis=-1)` never stores
    `h * c`); a group that would read or write a bool tensor is left apart (bool tiles are not vectorized), its
    inlined operands then stored, and so is a negation a sum would end with (MLIR folds the sum's `out + -x` into
    `out - x`, which its vectorizer does not take for a reduction: `canonicalize` puts the negation after the
    sum)."""
    uses: dict[int, list[Operation]] = {}
    for op in ops:
        for inner in op.walk():
            for v in inner.operands:
                uses.setdefault(id(v), []).append(inner)
    at = {id(op): i for i, op in enumerate(ops)}

    def fusable(op: Any) -> bool:
        return isinstance(op, Elementwise) and len(op.results) == 1 and not op.regions and id(op) not in skip

    def summed(op: Operation) -> bool:
        return type(op) is R.SumOp and id(op) not in skip and is_float(op.x.type.dtype) \
            and not isinstance(op.x.defining_op, T.NegOp)

    def space(op: Operation) -> tuple:
        return op.x.type.shape if summed(op) else op.results[0].type.shape

    def inlinable(p: Operation) -> bool:  # read only by a few elementwise ops of its shape (or sums of it)
        readers = uses.get(id(p.results[0]), []) if fusable(p) else []
        return 0 < len(readers) <= INLINED_USES and all(
            id(u) in at and (fusable(u) or summed(u)) and space(u) == p.results[0].type.shape for u in readers)

    returned = {id(v.defining_op) for v in ops[-1].operands if v.defining_op is not None}
    inlined = {id(p) for p in ops if id(p) not in returned and inlinable(p)}  # made again by each reader's group
    while True:
        groups = {}
        for root in reversed(ops[:-1]):
            if not (fusable(root) or summed(root)) or id(root) in inlined or root.results[0].type.dtype == "i1" \
                    or (root.results[0].type.rank == 0 and not summed(root)):
                continue
            members, stack = {id(root): root}, [root]
            while stack:
                for v in stack.pop().operands:
                    p = v.defining_op
                    if p is not None and id(p) not in members and id(p) in inlined:
                        members[id(p)] = p
                        stack.append(p)
            group = sorted(members.values(), key=lambda op: at[id(op)])
            inputs: list[Value] = []
            for op in group:
                for v in op.operands:
                    if v.defining_op is None or id(v.defining_op) not in members:
                        if all(v is not w for w in inputs):
                            inputs.append(v)
            groups[id(root)] = (group, inputs)
        kept = {k: g for k, g in groups.items() if len(g[0]) >= 2 and not any(v.type.dtype == "i1" for v in g[1])}
        covered = {id(op) for group, _ in kept.values() for op in group}
        stored = {id(p) for p in ops if id(p) in inlined and not all(id(u) in covered for u in uses[id(p.results[0])])}
        if not stored:
            return kept
        inlined -= stored  # read by an op no group makes (left apart, or a bool result): stored after all


# An elementwise result read by more elementwise ops than this is stored rather than made again in each.
INLINED_USES = 4


def _contract(module: ir.Module) -> None:
    """Let LLVM fuse each float multiply and the add of its product into one FMA, as the vectorized tiles' outer
    products do: a matmul's remainder rows (scalar loops) then round like its full tiles, so a row's result does
    not depend on where it falls (rows of a rank's tokens against the same rows of all ranks' tokens, bitwise)."""
    flags = ir.Attribute.parse(f"#llvm.fastmath<{CONTRACT}>")

    def mark(op: ir.Operation) -> ir.WalkResult:
        if op.name in ("llvm.fmul", "llvm.fadd", "llvm.fsub"):
            op.attributes["fastmathFlags"] = flags
        return ir.WalkResult.ADVANCE

    module.operation.walk(mark)


def _scalar_reads(module: ir.Module) -> None:
    """A vector read of memory only for its elements one by one (a `vector.transfer_read` in bounds, unmasked, of the
    memref's innermost dims, or a `vector.load`, whose every use is a `vector.extract` of one element: a register
    tile's column of A in the outer products), of a number of elements that is not a power of two, becomes a scalar
    load of each element, which LLVM folds into its broadcast (vbroadcastss from memory). Left a vector of 6 (the
    AVX2 6x16 and SSE 6x8 tiles' column), LLVM split it into 4 + 2 elements and broadcast the last through a vpermps
    whose index vector had no register left: a shuffle and a reload per step of k beside the 12 FMAs (llvm-mca 14's
    models: 29 against 6 cycles a step on znver1, 6.3 against 6.1 on haswell, 6.1 both on skylake; no change was
    measured on a Zen 5). Powers of two are left as they are: x86 broadcasts their lanes from memory already, and
    AArch64 multiplies by a lane of the loaded vector (fmla by element), which scalar loads would turn into one ld1r
    per row."""
    reads: list[ir.Operation] = []

    def find(op: ir.Operation) -> ir.WalkResult:
        if (op.name == "vector.load" or op.name == "vector.transfer_read" and _plain_read(op)) \
                and not _power_of_two(math.prod(ir.VectorType(op.results[0].type).shape)):
            reads.append(op)
        return ir.WalkResult.ADVANCE

    module.operation.walk(find)
    index = ir.IndexType.get()
    for read in reads:
        uses = [u.owner for u in read.results[0].uses]
        if not uses or any(u.name != "vector.extract" or len(u.operands) != 1 or
                           isinstance(u.results[0].type, ir.VectorType) for u in uses):
            continue
        rank = ir.VectorType(read.results[0].type).rank
        base = read.operands[0]
        at = list(read.operands[1:1 + ir.MemRefType(base.type).rank])
        for use in uses:
            pos = list(ir.DenseI64ArrayAttr(use.attributes["static_position"]))
            with ir.InsertionPoint(use), use.location:
                inner = [arith.AddIOp(i, arith.ConstantOp(index, p).result).result if p else i
                         for i, p in zip(at[len(at) - rank:], pos, strict=True)]
                scalar = memref.LoadOp(base, at[:len(at) - rank] + inner).result
            use.results[0].replace_all_uses_with(scalar)
            use.erase()
        read.erase()


def _power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


def _plain_read(op: ir.Operation) -> bool:
    """A transfer_read of a memref, every dim in bounds, unmasked, of its innermost dims in order."""
    if not isinstance(op.operands[0].type, ir.MemRefType) or "in_bounds" not in op.attributes:
        return False
    if "false" in str(op.attributes["in_bounds"]):
        return False
    memory, vector = ir.MemRefType(op.operands[0].type).rank, ir.VectorType(op.results[0].type).rank
    if len(op.operands) != 2 + memory:  # source, indices, padding: no mask
        return False
    return ir.AffineMapAttr(op.attributes["permutation_map"]).value == ir.AffineMap.get_minor_identity(memory, vector)


def _for_target(module: ir.Module, target: CpuTarget) -> None:
    """Give every LLVM function a named target's CPU and features: LLVM generates each function's code for
    them (on this machine too: x86-64-v3 on an AVX-512 host). This machine's own are left to the execution
    engine, which asks its LLVM (llvmlite's, of another version, names features MLIR's does not know)."""
    if target.host or (not target.cpu and not target.features):
        return
    quoted = ", ".join(f'"{f}"' for f in target.features.split(",") if f)
    features = ir.Attribute.parse(f"#llvm.target_features<[{quoted}]>")
    for op in module.body.operations:
        if op.operation.name == "llvm.func" and "sym_name" in op.attributes:
            if target.cpu:
                op.attributes["target_cpu"] = ir.StringAttr.get(target.cpu)
            if target.features:
                op.attributes["target_features"] = features


def check_lowering(func_op: Operation) -> None:
    """CpuLoweringError (naming the op and its line) unless every op of func_op has a kernel: the kernels are
    built, nothing is compiled (the torch backend compiles at the first call, knowing which inputs are weights)."""
    with ir.Context(), ir.Location.unknown():
        _build(func_op, frozenset(), weight_only_ops(func_op, frozenset()))


class CpuFunction(Executable):
    """A Sparsa function compiled to native code: one kernel per op in one MLIR module, run in order by a
    small host (the views, weights and block maps made once per set of shapes are the host's); `stages` keeps the MLIR
    text at each step (`mlir`, `schedule`, `loops`, `llvm`)."""

    def __init__(self, func_op: Operation, constant_args: frozenset[int] = frozenset(),
                 target: CpuTarget | None = None, exchange: Any = None):
        """`constant_args`: inputs the caller keeps the same between calls (see __call__); what only they and
        the weights feed runs on the host once, and the kernels may take it packed (expert weights).
        `target`: the machine to compile for (default: this one); code for another machine is only lowered
        (its stages and `object_code()`), not loaded. `exchange`: the process group the host exchanges rows over
        (expert parallel)."""
        self.func_op = func_op
        self.exchange = exchange
        self.constant_args = constant_args
        self.target = target or host_target()
        self.context = ir.Context()
        self.weight_only = weight_only_ops(func_op, constant_args)
        self._constant_sets: dict[frozenset[int], set[int]] = {constant_args: self.weight_only}
        self.engine: Any = None
        self.cached = False
        runs = self.target.runs_here()
        with self.context, ir.Location.unknown():
            module, builder, self.kernels, (self.fused, self.fused_roots) = _build(func_op, constant_args,
                                                                                   self.weight_only, self.target)
            self.host = HostProgram(func_op, self.kernels, self.weight_only, builder,
                                    "it exchanges rows between ranks (expert parallel)" if exchange is not None
                                    else None if native_host() else "SPARSA_NATIVE_HOST=0", profile())
            self.stages = {"mlir": str(module),
                           "schedule": schedule(builder.tiled, self.target.tile, self.target.block_k,
                                                self.target.packed_rows),
                           "host": self.host.text if self.host.why_not is None else
                           f"// no native host: {self.host.why_not}; Python runs the kernels in order\n"}
            symbols = ["_mlir_ciface_" + k.name for k in self.kernels.values()]
            symbols += ["sparsa_main"] if self.host.why_not is None else []
            name = cache.key(self.stages["mlir"], self.stages["schedule"], self.stages["host"], PIPELINE, CONTRACT,
                             str(OPT_LEVEL), self.target.key())
            hit = cache.load(name) if runs else None
            self.cached = hit is not None
            if hit is not None:
                self.engine, stages = hit
                self.stages.update(stages)
            else:
                script = ir.Module.parse(self.stages["schedule"])
                interpreter.apply_named_sequence(module.operation, script.body.operations[0], script)
                _scalar_reads(module)
                self.stages["loops"] = str(module)  # tiled, vectorized and bufferized: vectors and loops
                passmanager.PassManager.parse(PIPELINE).run(module.operation)
                if self.host.why_not is None:
                    merge(self.host.text, module)
                _contract(module)
                _for_target(module, self.target)
                self.stages["llvm"] = str(module)
                if runs:
                    self.engine = execution_engine.ExecutionEngine(module, opt_level=OPT_LEVEL)
        self._scratch = threading.local()  # per calling thread: buffers reused from call to call
        packed = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        self.entries = {} if self.engine is None else {
            k.name: packed(self.engine.raw_lookup("_mlir_ciface_" + k.name)) for k in self.kernels.values()}
        self.main = None if self.engine is None or self.host.why_not is not None else \
            packed(self.engine.raw_lookup("sparsa_main"))
        self._plans: dict[tuple, Any] = {}  # by the inputs' shapes, the weights' and the threads
        self.dead_after = _last_reads(func_op, self.kernels)  # the Python host's: values it lets go after each op
        self.calls = {"native": 0, "python": 0}  # which host ran each call
        self.timings = np.zeros(len(self.host.launches), np.int64)  # SPARSA_PROFILE=1: ns per launch, all calls
        if runs and not self.cached and symbols:  # an engine without functions has no object code (it crashes)
            cache.store(name, self.engine, {k: self.stages[k] for k in ("loops", "llvm")}, symbols)

    def binary(self, stage: str) -> bytes:
        if stage != "obj":
            return super().binary(stage)
        return self.object_code()

    def object_code(self) -> bytes:
        """The kernels as a relocatable object file for the target (ELF on Linux triples; the `--emit obj`
        stage): LLVM code generation for its triple, CPU and features."""
        return aot.object_code(self.stages["llvm"], self.target, OPT_LEVEL)

    def __call__(self, inputs: Sequence[np.ndarray], params: Mapping[str, np.ndarray] | None = None,
                 cache: dict | None = None, constant_args: frozenset[int] = frozenset()) -> list[np.ndarray]:
        """Run on NumPy inputs (in order) and weights (by name); a list of results.
        `cache` holds the weight-only results (packed sparse weights) between calls with the same weights;
        `constant_args` are inputs the caller keeps the same while it keeps `cache` (a torch model's
        parameters): what only they and the weights feed is computed once too."""
        if self.engine is None:
            raise SparsaError(f"compiled ahead of time {self.target.why_not_here()}: emit its object code "
                              f"(--emit obj) instead")
        if constant_args not in self._constant_sets:
            self._constant_sets[constant_args] = weight_only_ops(self.func_op, constant_args)
        weight_only = self._constant_sets[constant_args]
        if weight_only is not self.weight_only and not weight_only >= self.weight_only:
            raise SparsaError("cpu function: built for constant inputs "
                              f"{sorted(self.constant_args)}, called with {sorted(constant_args)}")
        if self.main is not None and cache is not None and weight_only is self.weight_only:
            outs = self._native(inputs, cache)
            if outs is not None:
                self.calls["native"] += 1
                return outs
        self.calls["python"] += 1
        host = _Host(self, params or {}, cache if cache is not None else {}, weight_only)
        outs = host.run(list(inputs))
        return [np.array(o, copy=True) if not o.flags.owndata or not o.flags.c_contiguous else o for o in outs]

    def _native(self, inputs: Sequence[np.ndarray], cache: dict) -> list[np.ndarray] | None:
        """One call of the native host (`sparsa_main`), or None where this call needs the Python host first
        (the weight-only results are not in `cache` yet; inputs the signature refuses, for its error)."""
        host = self.host
        fixed = cache.get(("native host", id(self))) if host.fixed else _NO_FIXED
        if fixed is None:
            arrays = host.fixed_arrays(cache)
            if arrays is None:
                return None
            fixed = cache[("native host", id(self))] = (arrays, [address(a) for a in arrays],
                                                        tuple(a.shape for a in arrays))
        if len(inputs) != len(host.inputs):
            return None
        ins = []
        checker = None  # an input to convert: checked and converted as the interpreter does (its errors)
        for i, (a, want) in enumerate(zip(inputs, host.dtypes, strict=True)):
            if type(a) is not np.ndarray or a.dtype != want or not a.flags.c_contiguous:
                v = host.inputs[i]
                if checker is None:
                    checker = host.input_checker(inputs)
                a = np.ascontiguousarray(checker.bind(v, a, f"input '{v.name_hint or v.index}'"))
            ins.append(a)
        threads, exact = num_threads(), deterministic()
        key = (tuple(a.shape for a in ins), fixed[2], threads, exact)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 256:  # shapes that keep changing (a growing KV cache): the recent ones
                self._plans.clear()
                self._scratch.__dict__.pop("argv", None)
            plan = self._plans[key] = host.plan(key[0], fixed[2], threads, exact)
        outs = [pooled_empty(shape, dtype) for shape, dtype in plan.outputs]
        mine = self._scratch.__dict__  # this thread's workspace and argv arrays (one per plan)
        space = mine.get("workspace")
        if space is None or space[0].size < plan.workspace + ALIGN:
            buf = np.empty(plan.workspace + ALIGN, np.uint8)
            space = mine["workspace"] = (buf, address(buf) + -address(buf) % ALIGN)
        made = mine.setdefault("argv", {}).get(key)
        if made is None or made[2] is not plan:  # (another thread may have dropped the plan this argv was made from)
            argv = np.array([0, 0, *host.argv(plan, threads, openmp_parallel())], np.int64)
            made = mine["argv"][key] = (argv, address(argv), plan)  # the plan keeps its arrays alive
            argv[0], argv[1] = made[1] + 8, made[1] + 16  # packed convention: a pointer to the pointer to argv[2:]
        argv = made[0]
        at = 2 + WORKSPACE  # argv[2:] is the program's argv (the two slots before it: the packed convention)
        argv[at] = space[1]  # (slot by slot: half the time of a slice assigned from a list, 0.8 us a call)
        argv[at + 1] = 0
        at += 2
        for a in ins:
            argv[at] = address(a)
            at += 1
        for p in fixed[1]:
            argv[at] = p
            at += 1
        for a in outs:
            argv[at] = address(a)
            at += 1
        assert at == 2 + HEADER + host.pointers
        self.main(made[1])
        if host.profile_slot is not None:
            at = 2 + host.profile_slot
            self.timings += argv[at:at + len(host.launches)]
            argv[at:at + len(host.launches)] = 0
        if argv[2 + STATUS]:  # an index out of range: the Python host runs the call again and says where
            return None
        return outs

    def profile(self) -> list[tuple[str, str, float]]:
        """With SPARSA_PROFILE=1: each launch of the native host (in order) as (kernel, op and its location,
        milliseconds over every native call so far)."""
        rows = []
        for launch, ns in zip(self.host.launches, self.timings, strict=True):
            op = launch.kernel.op
            where = f"{op.loc.line}:{op.loc.col}" if getattr(op.loc, "line", None) else ""
            rows.append((launch.kernel.name, f"{op.NAME} -> {op.results[0].type if op.results else ''} {where}",
                         ns / 1e6))
        return rows

    def scratch(self, key: object, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A buffer of this calling thread's, the same one at every call with the same key and shape (fresh
        pages for a large array cost a fault each: 16 MB, about 4 ms). Its contents last until the next call."""
        buffers = self._scratch.__dict__
        buf = buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = buffers[key] = aligned(shape, dtype)
        return buf

    def call(self, k: Kernel, arrays: list[np.ndarray], part: int | None = None, parts: int | None = None) -> None:
        packed, _keep = _packed_args(arrays, () if part is None else (part, parts))
        self.entries[k.name](packed.ctypes.data)

    def launch(self, k: Kernel, host: _Host) -> list[np.ndarray]:
        """Allocate k's outputs, run it (split over threads where it can be) and return its results: by the
        op's LAUNCHES rule where it has one (its module says how its host side differs), else `run`."""
        ins = [None if i in k.panels else np.asarray(host.values[id(v)], order="C") for i, v in enumerate(k.inputs)]
        rule = LAUNCHES.find(k.op)
        if rule is not None:
            return rule(self, k, host, ins)
        for i in k.panels:  # a dense matmul's fixed w: its panels packed once, kept with the weight-only results
            ins[i] = moe_pack.cached_panels(host, k.inputs[i])
        return self.run(k, host, ins)

    def run(self, k: Kernel, host: _Host, ins: list[np.ndarray]) -> list[np.ndarray]:
        """Outputs of the shapes `op.result_shapes` gives, and the kernel run on them as it splits."""
        op = k.op
        operands = ins
        if k.work_op is not None:  # a matmul's epilogue: its result has the shape of the product of x and w (or of
            # the [N, K] w a transpose of it reads)
            n = ins[1].shape[-1 if k.inputs[1] is k.work_op.operands[1] else -2]
            operands = [np.broadcast_to(np.empty((), np.float32), (*ins[0].shape[:-1], n))] * len(op.operands)
        elif id(op) in self.fused_roots:  # a fused chain's last op: what it reads inside the chain is never made
            space = np.broadcast_to(np.empty((), np.float32), np.broadcast_shapes(*[a.shape for a in ins]))
            operands = [ins[k.inputs.index(v)] if v in k.inputs else space for v in op.operands]
        elif k.inputs != list(op.operands):  # a kernel reading through a view (a matmul's transposed w), or making
            # the values its op joins (weight gradients): their shapes
            operands = [host.values[id(v)] if id(v) in host.values else _stand_in(host, v) for v in op.operands]
        outs = [np.empty(shape, numpy_dtype(r.type.dtype)) for r, shape in zip(k.outputs,
                                                                               op.result_shapes(host, operands),
                                                                               strict=True)]
        n = num_threads()
        if k.split == "parts":
            amount = work(k.work_op or op, [a.shape for a in ins], outs[0].shape)
            small = one_part_below(op) and amount < SPLIT_WORK
            self.parts(k, ins + outs, 1 if small else n)
        elif k.split == "rows":
            self.rows(k, ins, outs[0], k.rows, n)
        else:
            self.call(k, ins + outs)
        return outs

    def parts(self, k: Kernel, arrays: list[np.ndarray], n: int, threads: int | None = None) -> None:
        """Run parts 0..n-1 of k, on `threads` threads (default n), each thread its parts in order."""
        threads = min(n, threads or n)
        if threads == 1:
            for p in range(n):
                self.call(k, arrays, p, n)
            return
        together([lambda t=t: [self.call(k, arrays, p, n) for p in range(t, n, threads)] for t in range(threads)])

    def rows(self, k: Kernel, ins: list[np.ndarray], out: np.ndarray, cut: list[bool], n: int) -> None:
        """Run on n slabs of dim 0 at once (inputs that share the dim are cut with the output); of dim 1 where
        dim 0 is 1 and the kernel allows it (`Kernel.rows_1`: an elementwise kernel at batch 1)."""
        axis = 1 if out.shape[0] == 1 and k.rows_1 is not None else 0
        m = out.shape[axis]
        if n == 1 or m < 2 * n or work(k.work_op or k.op, [a.shape for a in ins], out.shape) < SPLIT_WORK:
            self.call(k, ins + [out])
            return
        bounds = row_bounds(m, n, deterministic())
        axes = [0 if c else None for c in cut] if axis == 0 else list(k.rows_1)

        def slab(a: np.ndarray, at: int | None, lo: int, hi: int) -> np.ndarray:
            return a if at is None else a[(slice(None),) * at + (slice(lo, hi),)]

        slabs = [[slab(a, at, lo, hi) for a, at in zip(ins, axes, strict=True)] + [slab(out, axis, lo, hi)]
                 for lo, hi in zip(bounds, bounds[1:], strict=False)]
        together([lambda s=s: self.call(k, s) for s in slabs])


def _stand_in(host: Any, v: Value) -> np.ndarray:
    """An array of v's shape and no data, for a value its reader's kernel makes itself: from its op's operands."""
    op = v.defining_op
    shape = op.result_shapes(host, [host.values[id(u)] for u in op.operands])[op.results.index(v)]
    return np.broadcast_to(np.empty((), numpy_dtype(v.type.dtype)), shape)


def _last_reads(func_op: Operation, kernels: dict[int, Kernel] | None = None) -> dict[int, list[int]]:
    """Op index -> the values (ids) no later op reads (in its regions either), except what the function returns.
    A fused kernel reads its group's inputs where it runs: at the position of the group's last op."""
    ops = func_op.regions[0].block.ops
    at = {id(op): i for i, op in enumerate(ops)}
    last: dict[int, int] = {}
    for i, op in enumerate(ops[:-1]):
        for inner in op.walk():
            for v in inner.operands:
                last[id(v)] = i
    for k in (kernels or {}).values():
        for v in k.inputs:
            last[id(v)] = max(last.get(id(v), 0), at[id(k.op)])
    for v in ops[-1].operands:
        last.pop(id(v), None)
    dead: dict[int, list[int]] = {}
    for v, i in last.items():
        dead.setdefault(i, []).append(v)
    return dead


class _Host(Interpreter):
    """Runs the function's ops in order: kernels for computing ops, the interpreter's own handling for
    weights, views, cached weight-only results and block maps made once per set of shapes."""

    def __init__(self, fn: CpuFunction, params: dict[str, np.ndarray], cache: dict, weight_only: set[int]):
        super().__init__(fn.func_op, params, cache, weight_only, fn.exchange)
        self.fn = fn

    def _run_block(self, ops: list[Operation]) -> list[np.ndarray]:
        """The function's ops in order, each value let go after the last op that reads it: its memory is then
        reused by the next arrays instead of fresh pages (a page fault per 4 KiB, ~1.6 ms per 8 MB)."""
        if ops is not self.func.regions[0].block.ops:
            return super()._run_block(ops)
        dead = self.fn.dead_after
        for i, op in enumerate(ops):
            if op.TERMINATOR:
                return [self.values[id(v)] for v in op.operands]
            self._run_op(op)
            self.check(op)
            for v in dead.get(i, ()):
                self.values.pop(v, None)
        return []

    def _compute(self, op: Operation) -> None:
        k = self.fn.kernels.get(id(op))
        if k is None and id(op) in self.fn.fused:  # computed inside the kernel of the elementwise op it feeds
            return
        if k is None:
            super()._compute(op)
            if id(op) in self.weight_only and op.NAME != "func.param":  # computed once: stored as kernels read it
                for r in op.results:
                    self.values[id(r)] = np.asarray(self.values[id(r)], order="C")
            return
        for r, o in zip(op.results, self.fn.launch(k, self), strict=True):
            self.values[id(r)] = o
