"""MLIR -> LLVM -> native code with the ExecutionEngine of the MLIR Python bindings, and calls through the
C interface with NumPy arrays (memref descriptors written by `_packed_args`)."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from torch_mlir import execution_engine, ir, passmanager
from torch_mlir.dialects.transform import interpreter

from sparsa.backends.cpu import cache
from sparsa.backends.cpu.kernels import Kernels
from sparsa.backends.cpu.moe import PANEL
from sparsa.backends.cpu.signature import Kernel
from sparsa.backends.reference.interpreter import Interpreter
from sparsa.ir.analysis import weight_only_ops
from sparsa.ir.core import Operation
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import moe as M
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.types import numpy_dtype

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

# LLVM's optimization level for the JIT. O3 took 4.8 s on the sliding-window model (its extra loop passes on
# the attention kernel's scalar loops) against 0.3 s at O2, for the same vector code in the scheduled tiles.
OPT_LEVEL = 2

# Register tile of a matmul: TILE_M x TILE_N accumulators updated by one outer product per step of k, kept
# in registers over the k loop. On this machine (AVX-512, one core), x @ w at 512x512x2048: 8x32 148
# GFLOP/s, 6x64 196, 12x32 164, 4x64 127 (OpenBLAS 89-105). 8x32 divides the 64-row attention blocks and
# grouped-GEMM chunks with no scalar remainder, and the MoE layers ran as fast with it as with 6x64.
TILE_M, TILE_N = 8, 32
# A matmul with more rows runs in blocks of BLOCK_M rows, each block's rows staying in cache while every
# TILE_N-wide column panel of B passes over them.
BLOCK_M = 64
# Work (elements touched; a matmul's multiply-adds / 32, as vectorized) below which an op runs on one thread:
# handing half of it to another thread costs ~0.15 ms here (silu of 256x1024: 0.16 ms on one thread, 0.27 on
# two; 4096x1024: 1.95 and 1.13; a router's 1024x512 @ 512x8: 0.46 and 0.75).
SPLIT_WORK = 1 << 20


def tiles(kind: str, shape: tuple) -> list[int]:
    """Tile sizes of a scheduled op's loops: the last two output dims by TILE_M x TILE_N (the last by TILE_N
    for a vector), 1 for leading dims, and 1 for a matmul's reduction. A last dim known to be narrower than
    TILE_N (a router's 8 experts) is one tile wide: peeled, it would all be the scalar remainder."""
    rank, last = len(shape), shape[-1] if shape else None
    width = last if isinstance(last, int) and 0 < last < TILE_N else TILE_N
    out = [1] * max(0, rank - 2) + ([TILE_M, width] if rank >= 2 else [width])
    return out + [1] if kind == "matmul" else out


def interchange(kind: str, rank: int) -> list[int]:
    """The order of a scheduled op's tile loops, outermost first. A matmul walks its column panels outside
    its row tiles: one TILE_N-wide panel of B (k x TILE_N) stays in cache while every row tile of A passes
    over it, instead of all of B streaming past each row tile."""
    order = list(range(rank + (kind == "matmul")))
    if kind == "matmul" and rank >= 2:
        order[rank - 2], order[rank - 1] = rank - 1, rank - 2
    return order


def schedule(ops: list[tuple[str, str, tuple, str, tuple]]) -> str:
    """The transform-dialect script run on the lowered module (kept as the `schedule` stage).

    Matmuls, elementwise ops and reductions are tiled (`tiles`); where a tiled dim is not a known multiple of its tile,
    the loop is peeled so that every full tile has a static shape (the remainder runs as scalar loops).
    The full tiles (matched by their static result type) are vectorized, the accumulators are hoisted out
    of the k loop so they stay in registers, the module is bufferized and contractions become outer
    products. Other ops stay loops for now: vectorizing a whole untiled op would unroll it into one huge
    vector.
    """
    lines = ["module attributes {transform.with_named_sequence} {",
             "  transform.named_sequence @__transform_main(%root: !transform.any_op {transform.consumed}) {"]
    loop = '!transform.op<"scf.for">'
    for i, (tag, kind, shape, _, _) in enumerate(ops):
        sizes = tiles(kind, shape)
        lines.append(f"    %op{i} = transform.structured.match attributes{{{tag}}} in %root "
                     f": (!transform.any_op) -> !transform.any_op")
        order = interchange(kind, len(shape))
        target, rows = f"%op{i}", len(shape) - 2 if len(shape) >= 2 else None
        blocked = kind == "matmul" and rows is not None and (shape[rows] is None or shape[rows] > BLOCK_M)
        if blocked:  # row blocks of BLOCK_M first, the register tiles inside each
            outer = [0] * (len(shape) + 1)
            outer[rows] = BLOCK_M
            lines.append(f"    %b{i}, %bl{i} = transform.structured.tile_using_for %op{i} tile_sizes "
                         f"[{', '.join(map(str, outer))}] : (!transform.any_op) -> (!transform.any_op, {loop})")
            target = f"%b{i}"
        lines.append(f"    %t{i}, %l{i}:{len(sizes)} = transform.structured.tile_using_for {target} tile_sizes "
                     f"[{', '.join(map(str, sizes))}] interchange = [{', '.join(map(str, order))}] "
                     f": (!transform.any_op) -> (!transform.any_op{f', {loop}' * len(sizes)})")
        for axis in sorted(range(max(0, len(shape) - 2), len(shape)), key=order.index, reverse=True):
            extent = shape[axis]
            if blocked and axis == rows:  # a block's rows: BLOCK_M, or fewer in the last block
                extent = BLOCK_M if extent is not None and extent % BLOCK_M == 0 else None
            if extent is None or extent % sizes[axis]:  # inner loops first: peeling clones them
                lines.append(f"    %p{i}_{axis}, %r{i}_{axis} = transform.loop.peel %l{i}#{order.index(axis)} "
                             f": ({loop}) -> (!transform.any_op, !transform.any_op)")
    lines += [
        "    %f = transform.structured.match ops{[\"func.func\"]} in %root : (!transform.any_op) -> !transform.any_op",
        "    transform.apply_patterns to %f { transform.apply_patterns.canonicalization } : !transform.any_op"]
    for i, (tag, kind, shape, dtype, out_dims) in enumerate(ops):
        sizes = tiles(kind, shape)
        tile = "x".join(str(sizes[d]) if d >= 0 else "1" for d in out_dims)
        # a reduction's result does not show whether its reduced dim is a full tile: its operands do
        operands = "" if kind != "reduction" else (
            f" filter_operand_types = [tensor<{'x'.join(map(str, sizes))}x{dtype}>, tensor<{tile}x{dtype}>]")
        lines += [f"    %v{i} = transform.structured.match attributes{{{tag}}} filter_result_type = "
                  f"tensor<{tile}x{dtype}>{operands} in %root : (!transform.any_op) -> !transform.any_op",
                  f"    transform.structured.vectorize %v{i} : !transform.any_op"]
    lines += [
        "    transform.apply_patterns to %f {",
        "      transform.apply_patterns.vector.reduction_to_contract",
        "      transform.apply_patterns.vector.transfer_permutation_patterns",
        "      transform.apply_patterns.canonicalization",
        "    } : !transform.any_op",
        # the accumulator tile's read and write out of the k loop, on tensors (after bufferization the
        # tile is a subview, a view the buffer hoisting refuses to move): it stays in registers
        "    %loops = transform.structured.match ops{[\"scf.for\"]} in %root "
        ": (!transform.any_op) -> !transform.any_op",
        "    transform.foreach %loops : !transform.any_op {",
        "    ^bb0(%lp: !transform.any_op):",
        "      transform.loop.hoist_loop_invariant_subsets %lp : !transform.any_op",
        "    }",
        # then the k loop still carries the accumulator's tensor and its slice unchanged; folding those
        # iter_args away lets bufferization write the tile in place (else: a copy in and out per tile)
        "    transform.apply_patterns to %f { transform.apply_patterns.canonicalization } : !transform.any_op",
        # a result computed into a fresh tensor and then stored into the output buffer is computed there
        "    transform.bufferization.eliminate_empty_tensors %f : !transform.any_op",
        "    %b = transform.bufferization.one_shot_bufferize %root {"
        "memcpy_op = \"linalg.copy\", allow_return_allocs_from_loops = true} "
        ": (!transform.any_op) -> !transform.any_op",
        "    %f2 = transform.structured.match ops{[\"func.func\"]} in %b : (!transform.any_op) -> !transform.any_op",
        "    transform.apply_cse to %f2 : !transform.any_op  // then a tile written back in place is no copy",
        "    transform.apply_patterns to %f2 {",
        '      transform.apply_patterns.vector.lower_contraction lowering_strategy = "outerproduct"',
        "      transform.apply_patterns.vector.transfer_permutation_patterns",
        "      transform.apply_patterns.canonicalization",
        "    } : !transform.any_op",
        "    %f3 = transform.structured.match ops{[\"func.func\"]} in %b : (!transform.any_op) -> !transform.any_op",
        "    transform.apply_patterns to %f3 {",
        "      transform.apply_patterns.vector.lower_outerproduct",
        '      transform.apply_patterns.vector.reorder_multi_reduction_dims lowering_strategy = "innerreduction"',
        '      transform.apply_patterns.vector.multi_reduction_flattening lowering_strategy = "innerreduction"',
        '      transform.apply_patterns.vector.multi_reduction_unrolling lowering_strategy = "innerreduction"',
        "      transform.apply_patterns.vector.lower_transfer max_transfer_rank = 1",
        "      transform.apply_patterns.vector.lower_transpose",
        "      transform.apply_patterns.vector.lower_broadcast",
        "      transform.apply_patterns.vector.lower_masks",
        "    } : !transform.any_op  // canonicalized by the pipeline: with these patterns it can cycle",
        "    transform.yield",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
_CTYPES = {"f32": ctypes.c_float, "f64": ctypes.c_double, "i64": ctypes.c_int64, "i32": ctypes.c_int32,
           "i8": ctypes.c_int8, "i1": ctypes.c_bool}
# Ops the host does itself: weights, views (no data moves), block maps of data masks (the interval
# classification of attn_blocks.py, O(blocks) per call), and sparse layouts of values that are not weights
# (a layout check, and packings whose sizes depend on the data; the weights' are packed once and cached).
HOST_OPS = {"func.param", "tensor.reshape", "tensor.expand_dims", "tensor.squeeze", "tensor.split",
            "tensor.broadcast_to", "tensor.slice", "attn.block_map", "sparse.convert", "sparse.pack_bsr",
            "sparse.pack_nm"}
_pool: ThreadPoolExecutor | None = None


def num_threads() -> int:
    """Threads the kernels split their work over: SPARSA_NUM_THREADS, default every core."""
    value = os.environ.get("SPARSA_NUM_THREADS", "")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise SparsaError(f"SPARSA_NUM_THREADS must be a whole number, got {value!r}") from None
    return _cores()


@functools.cache
def _cores() -> int:
    return os.cpu_count() or 1  # it reads /sys each time (24 us)


def _threads(n: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sparsa-cpu")
    return _pool


def _work(op: Operation, ins: list[np.ndarray], out: np.ndarray) -> int:
    """An op's work in the units of SPLIT_WORK: elements touched; a matmul's multiply-adds / 32 (they are
    vectorized); a topk's compares (its input times k); a router's compares and exps."""
    if isinstance(op, S.MatmulOp):
        return out.size * ins[0].shape[-1] // 32
    if isinstance(op, R.TopkOp):
        return ins[0].size * op.k
    if isinstance(op, M.RouteOp):  # an exp (float64) costs about as much as 16 compares
        return ins[0].size * (op.k + 16)
    return max(a.size for a in ins + [out])


def _together(jobs: list) -> None:
    """Run the jobs at once: all but the last on the pool, the last on this thread (a wake-up fewer)."""
    pending = [_threads(len(jobs)).submit(j) for j in jobs[:-1]]
    jobs[-1]()
    for f in pending:
        f.result()


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


def _build(func_op: Operation, constant_args: frozenset[int], weight_only: set[int]) -> tuple:
    """(module, builder, kernel of each op): the MLIR module of func_op's kernels, in the current context."""
    block = func_op.regions[0].block
    fixed = {id(a) for i, a in enumerate(block.args) if i in constant_args}
    fixed |= {id(r) for op in block.ops if id(op) in weight_only for r in op.results}
    module = ir.Module.create()
    builder = Kernels(module, fixed)
    kernels = {id(op): builder.kernel(op) for op in block.ops[:-1]
               if op.NAME not in HOST_OPS and id(op) not in weight_only}
    return module, builder, kernels


def check_lowering(func_op: Operation) -> None:
    """CpuLoweringError (naming the op and its line) unless every op of func_op has a kernel: the kernels are
    built, nothing is compiled (the torch backend compiles at the first call, knowing which inputs are weights)."""
    with ir.Context(), ir.Location.unknown():
        _build(func_op, frozenset(), weight_only_ops(func_op, frozenset()))


class CpuFunction:
    """A Sparsa function compiled to native code: one kernel per op in one MLIR module, run in order by a
    small host (the views, weights and block maps of data masks are the host's); `stages` keeps the MLIR
    text at each step (`mlir`, `schedule`, `loops`, `llvm`)."""

    def __init__(self, func_op: Operation, constant_args: frozenset[int] = frozenset()):
        """`constant_args`: inputs the caller keeps the same between calls (see __call__); what only they and
        the weights feed runs on the host once, and the kernels may take it packed (expert weights)."""
        self.func_op = func_op
        self.constant_args = constant_args
        self.context = ir.Context()
        self.weight_only = weight_only_ops(func_op, constant_args)
        self._constant_sets: dict[frozenset[int], set[int]] = {constant_args: self.weight_only}
        with self.context, ir.Location.unknown():
            module, builder, self.kernels = _build(func_op, constant_args, self.weight_only)
            self.stages = {"mlir": str(module), "schedule": schedule(builder.tiled)}
            symbols = ["_mlir_ciface_" + k.name for k in self.kernels.values()]
            name = cache.key(self.stages["mlir"], self.stages["schedule"], PIPELINE, str(OPT_LEVEL))
            hit = cache.load(name)
            self.cached = hit is not None
            if hit is not None:
                self.engine, stages = hit
                self.stages.update(stages)
            else:
                script = ir.Module.parse(self.stages["schedule"])
                interpreter.apply_named_sequence(module.operation, script.body.operations[0], script)
                self.stages["loops"] = str(module)  # tiled, vectorized and bufferized: vectors and loops
                passmanager.PassManager.parse(PIPELINE).run(module.operation)
                self.stages["llvm"] = str(module)
                self.engine = execution_engine.ExecutionEngine(module, opt_level=OPT_LEVEL)
        packed = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
        self.entries = {k.name: packed(self.engine.raw_lookup("_mlir_ciface_" + k.name)) for k in self.kernels.values()}
        if not self.cached and symbols:  # an engine without functions has no object code to dump (it crashes)
            cache.store(name, self.engine, {k: self.stages[k] for k in ("loops", "llvm")}, symbols)

    def __call__(self, inputs: Sequence[np.ndarray], params: dict[str, np.ndarray] | None = None,
                 cache: dict | None = None, constant_args: frozenset[int] = frozenset()) -> Any:
        """Run on NumPy inputs (in order) and weights (by name); one array, or a tuple for several results.
        `cache` holds the weight-only results (packed sparse weights) between calls with the same weights;
        `constant_args` are inputs the caller keeps the same while it keeps `cache` (a torch model's
        parameters): what only they and the weights feed is computed once too."""
        if constant_args not in self._constant_sets:
            self._constant_sets[constant_args] = weight_only_ops(self.func_op, constant_args)
        weight_only = self._constant_sets[constant_args]
        if not weight_only >= self.weight_only:
            raise SparsaError("cpu function: built for constant inputs "
                              f"{sorted(self.constant_args)}, called with {sorted(constant_args)}")
        host = _Host(self, params or {}, cache if cache is not None else {}, weight_only)
        outs = host.run(list(inputs))
        outs = [np.array(o, copy=True) if not o.flags.owndata or not o.flags.c_contiguous else o for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def call(self, k: Kernel, arrays: list[np.ndarray], part: int | None = None, parts: int | None = None) -> None:
        packed, _keep = _packed_args(arrays, () if part is None else (part, parts))
        self.entries[k.name](packed.ctypes.data)

    def launch(self, k: Kernel, host: _Host) -> list[np.ndarray]:
        """Allocate k's outputs, run it (split over threads where it can be) and return its results."""
        op = k.op
        packed = {i: host.cache.get(("panels", id(k.inputs[i]))) for i in k.panels}
        ins = [packed[i][0] if packed.get(i) else np.asarray(host.values[id(v)], order="C")
               for i, v in enumerate(k.inputs)]
        kind = type(op).__name__
        n = num_threads()
        if kind == "DispatchOp":
            t, kk = ins[0].shape
            e = op.num_experts
            if ins[0].size and (ins[0].min() < 0 or ins[0].max() >= e):
                raise SparsaError(f"moe.dispatch: expert id outside 0..{e - 1}", op.loc)
            perm, offsets = np.empty(t * kk + e * (op.block - 1), np.int64), np.empty(e + 1, np.int64)
            self.call(k, ins + [perm, offsets])
            return [perm[: offsets[-1]], offsets]
        if kind in ("BsrMatmulOp", "NmMatmulOp"):
            shape = host.shape_of(op.result.type)
            x = ins[0].reshape(-1, ins[0].shape[-1])
            out = np.empty((x.shape[0], shape[-1]), numpy_dtype(op.result.type.dtype))
            self.rows(k, [x] + ins[1:], out, [True] + k.rows[1:], n)
            return [out.reshape(shape)]
        if kind == "LinearAttentionOp":
            lead = np.broadcast_shapes(*(a.shape[:-1] for a in ins[:3]), ins[3].shape)
            flat = [np.ascontiguousarray(np.broadcast_to(a, lead + a.shape[-1:])).reshape(-1, *lead[-1:], a.shape[-1])
                    for a in ins[:3]]
            flat.append(np.ascontiguousarray(np.broadcast_to(ins[3], lead)).reshape(-1, lead[-1]))
            out = np.empty(flat[0].shape[:2] + ins[2].shape[-1:], numpy_dtype(op.result.type.dtype))
            self.parts(k, flat + [out], n)
            return [out.reshape(lead + ins[2].shape[-1:])]
        if kind == "AttentionOp":
            ins[1] = np.ascontiguousarray(np.swapaxes(ins[1], -1, -2))  # the kernel reads K^T
        weight_n = host.values[id(k.inputs[3])].shape[2] if kind in ("GroupedMatmulOp", "GroupedMatmulCombineOp") \
            else 0
        for i in k.panels:  # weights packed in panels, once per loaded weights (kept with the weight-only results)
            if not packed[i]:
                host.cache[("panels", id(k.inputs[i]))] = (pack_panels(ins[i]),)
                ins[i] = host.cache[("panels", id(k.inputs[i]))][0]
        if kind == "GroupedMatmulCombineOp":
            rt_ = op.result.type
            width = rt_.shape[1] if isinstance(rt_.shape[1], int) else weight_n
            out = np.empty((n, ins[4].shape[0], width), numpy_dtype(rt_.dtype))  # each part zeroes its slice
            self.parts(k, ins + [out, np.zeros(1, np.int64)], n)
            total = out[0] if n == 1 else np.add(out[0], out[1])  # the parts' sum, into a new array
            for p in range(2, n):
                total += out[p]
            return [total]
        if kind == "GroupedMatmulOp":
            rt_ = op.result.type
            width = rt_.shape[1] if isinstance(rt_.shape[1], int) else weight_n
            out = np.empty((ins[1].shape[0], width), numpy_dtype(rt_.dtype))
            self.parts(k, ins + [out, np.zeros(1, np.int64)], n)
            out[ins[1] < 0] = 0  # the segments' padding rows, which the kernel skips
            return [out]
        if kind == "GatherOp":  # the kernel reads without checking
            try:
                op.check_indices(ins[0].shape, ins[1:])
            except IndexError as e:
                raise SparsaError(f"'{op.NAME}' failed at run time: {e}", op.loc) from None
        outs = [np.empty(shape, numpy_dtype(r.type.dtype)) for r, shape in zip(k.outputs, op.result_shapes(host, ins),
                                                                               strict=True)]
        if k.split == "parts":
            small = isinstance(op, R.TopkOp | M.RouteOp) and _work(op, ins, outs[0]) < SPLIT_WORK
            self.parts(k, ins + outs, 1 if small else n)
        elif k.split == "rows":
            self.rows(k, ins, outs[0], k.rows, n)
        else:
            self.call(k, ins + outs)
        return outs

    def parts(self, k: Kernel, arrays: list[np.ndarray], n: int) -> None:
        if n == 1:
            self.call(k, arrays, 0, 1)
            return
        _together([lambda p=p: self.call(k, arrays, p, n) for p in range(n)])

    def rows(self, k: Kernel, ins: list[np.ndarray], out: np.ndarray, cut: list[bool], n: int) -> None:
        """Run on n slabs of dim 0 at once (inputs that share the dim are cut with the output)."""
        m = out.shape[0]
        if n == 1 or m < 2 * n or _work(k.op, ins, out) < SPLIT_WORK:
            self.call(k, ins + [out])
            return
        bounds = [m * p // n for p in range(n + 1)]
        slabs = [[a[lo:hi] if c else a for a, c in zip(ins, cut, strict=True)] + [out[lo:hi]]
                 for lo, hi in zip(bounds, bounds[1:], strict=False)]
        _together([lambda s=s: self.call(k, s) for s in slabs])


def pack_panels(w: np.ndarray) -> np.ndarray:
    """[E, K, N] -> [E, ceil(N / PANEL), K, PANEL], zero-padded: each panel one contiguous [K, PANEL] block."""
    E, K, N = w.shape
    NP = -(-N // PANEL)
    out = np.zeros((E, NP, K, PANEL), w.dtype)
    for j in range(NP):
        cols = w[:, :, j * PANEL:(j + 1) * PANEL]
        out[:, j, :, :cols.shape[2]] = cols
    return out


class _Host(Interpreter):
    """Runs the function's ops in order: kernels for computing ops, the interpreter's own handling for
    weights, views, cached weight-only results and block maps of data masks."""

    def __init__(self, fn: CpuFunction, params: dict[str, np.ndarray], cache: dict, weight_only: set[int]):
        super().__init__(fn.func_op, params, cache, weight_only)
        self.fn = fn

    def _compute(self, op: Operation) -> None:
        k = self.fn.kernels.get(id(op))
        if k is None:
            super()._compute(op)
            if id(op) in self.weight_only and op.NAME != "func.param":  # computed once: stored as kernels read it
                for r in op.results:
                    self.values[id(r)] = np.asarray(self.values[id(r)], order="C")
            return
        for r, o in zip(op.results, self.fn.launch(k, self), strict=True):
            self.values[id(r)] = o
