"""The cpu backend's lowering context and tables: what every dialect module's lowerings share while one
function's kernels are built into one MLIR module.

- `KERNELS`: op class -> the kernel (one MLIR function) computing the op, or `host` for the ops the host runs
  itself (weights, views, per-call block maps, sparse layouts of values that are not weights).
- `LOWERINGS`: op class -> its values inside a kernel body, as `linalg` on tensors (tagged for the schedule to
  tile and vectorize) or, in scalar mode, as scalars (mask and score regions inlined into loops). An op with
  a lowering and no kernel gets a generic one (`KernelContext.dense`).
- `SCALARS`: elementwise op class -> its scalar arith, from which both forms above follow.
- `LAUNCHES`: op class -> how the host allocates and runs the op's kernel, where that is more than the
  generic (`CpuFunction.run`); `HOSTED`: the same for the native host (`host.py`), as data it generates code from.

A kernel takes its operands, then its outputs, as memrefs (symbolic dims dynamic); kernels that split their
work take two more index arguments (part, parts) and do every parts-th work item from `part`, so the host
(jit.py) can run them on several threads at once. Outputs are allocated by the host.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, scf, tensor

from sparsa.backends.cpu import CpuLoweringError, refused_dtype
from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.signature import Kernel
from sparsa.backends.cpu.target import CpuTarget, host_target
from sparsa.backends.table import LoweringTable
from sparsa.ir.core import Operation, Region, Value
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.func import ParamOp
from sparsa.ir.dims import Dim, same
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import TensorType, is_float

PARALLEL = "#linalg.iterator_type<parallel>"
REDUCTION = "#linalg.iterator_type<reduction>"

KERNELS = LoweringTable("cpu kernels")
LOWERINGS = LoweringTable("cpu lowerings")
SCALARS = LoweringTable("cpu scalar rules")
# op class -> rule(fn, kernel, host, inputs) -> outputs: how the host runs the op's kernel where that is more
# than outputs of `op.result_shapes` and the kernel's own split (jit.py, CpuFunction.run)
LAUNCHES = LoweringTable("cpu host launches")
# op class -> rule(cx, op, kernel) -> signature.Hosted: how the native host (host.py) does what the op's LAUNCHES
# rule does in Python; an op with a LAUNCHES rule and none here keeps its function on the Python host
HOSTED = LoweringTable("cpu native host launches")


def host(cx: KernelContext, op: Operation) -> None:
    """The rule of the ops the host runs itself (no kernel)."""
    return None


KERNELS.lowers(ParamOp)(host)  # weights: bound by the host


def element_type(dtype: str) -> ir.Type:
    table = {"f32": ir.F32Type.get, "f64": ir.F64Type.get, "f16": ir.F16Type.get, "bf16": ir.BF16Type.get,
             "i64": lambda: ir.IntegerType.get_signless(64), "i32": lambda: ir.IntegerType.get_signless(32),
             "i8": lambda: ir.IntegerType.get_signless(8), "i1": lambda: ir.IntegerType.get_signless(1)}
    return table[dtype]()


def tensor_type(t: TensorType) -> ir.RankedTensorType:
    dims = [d if isinstance(d, int) else ir.ShapedType.get_dynamic_size() for d in t.shape]
    return ir.RankedTensorType.get(dims, element_type(t.dtype))


def memref_type(t: TensorType) -> ir.MemRefType:
    return ir.MemRefType.get([d if isinstance(d, int) else B.DYN() for d in t.shape], element_type(t.dtype))


def is_integer_type(et: ir.Type) -> bool:
    try:
        ir.IntegerType(et)
    except ValueError:
        return False
    return True


def scalar_constant(et: ir.Type, value: float | int) -> ir.Value:
    """A constant of element type et (a float or an integer type)."""
    if is_integer_type(et):
        return arith.ConstantOp(et, ir.IntegerAttr.get(et, int(value))).result
    return arith.ConstantOp(et, ir.FloatAttr.get(et, float(value))).result


def dtype_of(et: ir.Type) -> str:
    return {"f32": "f32", "f64": "f64", "f16": "f16", "bf16": "bf16"}[str(et)]


def carried(d: Dim, along: Dim) -> bool:
    """Whether an operand's dim `d` is the dim `along` the host cuts (so its rows are cut with it), not one
    broadcast along it: the same size written otherwise (`1+s-1` and `2+s-2`), or a dim of unknown size on either
    side, which is the other at run time (only a dim typed 1 broadcasts: `check_unknown_dims`)."""
    return same(d, along) or d != 1 and (d is None or along is None)


class KernelContext:
    """Builds the kernels of one function into `module`: the state a lowering reads and writes (values
    built so far, ops tagged for the schedule, scalar mode, dims built as other sizes) and the helpers
    every dialect's lowerings share."""

    def __init__(self, module: ir.Module, fixed: set[int] | None = None, target: CpuTarget | None = None):
        """`fixed`: ids of the values that are the same on every call (weights, constant inputs and what
        only they feed); `target`: the machine the kernels are for (default: this one)."""
        self.module = module
        self.fixed = fixed or set()
        self.target = target or host_target()
        self.kernels: list[Kernel] = []
        self.compiled: dict[tuple, str] = {}  # a kernel's code (its name and tags left out) -> its function's name
        self.last: func.FuncOp | None = None
        self.values: dict[int, ir.Value] = {}
        # the ops the schedule (jit.py) tiles and vectorizes: (tag, "matmul" | "elementwise" | "reduction",
        # the shape of the dims it tiles (None where unknown at compile time), element type, and for each
        # result dim the tiled dim it comes from (-1: a kept size-1 dim))
        self.tiled: list[tuple[str, str, tuple, str, tuple]] = []
        # In scalar mode (a mask or score region inlined into a loop body) values are scalars and every
        # elementwise op is its arith body alone.
        self.scalar_mode = False
        self.untiled = False
        # Dims (by value) built as another size: a kernel that runs a region on slices of its inputs sets
        # them — the fused scan's channel blocks (None: dynamic), a grouped GEMM's panels (PANEL columns).
        self.dim_map: dict = {}
        self.packed: set[int] = set()  # views no kernel makes (packed_views): the pack kernels read through them

    # ---- kernels ------------------------------------------------------------------------------------------
    def kernel(self, op: Operation) -> Kernel | None:
        """The kernel computing `op`, or None for an op the host runs (CpuLoweringError, naming the op and its
        line, if there is neither)."""
        self.check_dtypes([op])
        rule = KERNELS.find(op)
        if rule is host:
            return None
        start = len(self.tiled)
        k = rule(self, op) if rule is not None else self.dense(op)
        if k is None:  # the rule leaves this op to the host (a block map made once per set of shapes)
            return None
        k = self.reuse(k, start)
        self.kernels.append(k)
        return k

    def reuse(self, k: Kernel, start: int) -> Kernel:
        """k, or an earlier kernel with the same code (a model's layers repeat their ops at the same shapes):
        k's function is then dropped, with its schedule entries (tiled[start:]), and never compiled."""
        fn = self.last  # k's function, the one `function` made last
        tags = {t[0]: f"sparsa.tile#{i}" for i, t in enumerate(self.tiled[start:])}
        text = re.sub(r"sparsa\.tile\d+\b", lambda m: tags.get(m.group(0), m.group(0)),
                      fn.operation.get_asm(assume_verified=True).replace(f"@{k.name}(", "@kernel(", 1))
        key = (text, tuple(t[1:] for t in self.tiled[start:]))
        same = self.compiled.setdefault(key, k.name)
        if same == k.name:
            return k
        fn.operation.erase()
        del self.tiled[start:]
        return dataclasses.replace(k, name=same)

    def extra(self, k: Kernel, start: int) -> Kernel:
        """A kernel a HOSTED rule built (its schedule entries from tiled[start:]): an earlier one of the same code
        if there is one, and counted, so that the next kernel gets a name of its own."""
        k = self.reuse(k, start)
        self.kernels.append(k)
        return k

    def function(self, op: Operation, types: list[TensorType], parts: bool, label: str = "") -> tuple:
        """An empty kernel function for `op` over memrefs of `types` (operands, then outputs), with
        (part, parts) index arguments when it splits its work; `label` names it instead of the op."""
        name = f"k{len(self.kernels)}_{label or op.NAME.replace('.', '_')}"
        args = [memref_type(t) for t in types] + [ir.IndexType.get()] * (2 if parts else 0)
        with ir.InsertionPoint(self.module.body):
            fn = self.last = func.FuncOp(name, ir.FunctionType.get(args, []))
            fn.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
            entry = fn.add_entry_block()
        return name, entry

    def dense(self, op: Operation) -> Kernel:
        """An op of Lowering, on tensor views of its memrefs; written straight into the output."""
        if op.regions and any(not r.empty for r in op.regions):
            hint = " (run the fuse-moe-gating and fuse-moe-dispatch passes first)" if op.NAME == "moe.moe" else " yet"
            raise CpuLoweringError(f"'{op.NAME}' is not supported by the cpu backend{hint}", op.loc)
        inputs = list(op.operands)
        split, cut = self.row_split(op)
        rows_1 = self.dim1_cut(op.results[0].type, inputs) if split == "rows" and isinstance(op, Elementwise) else None
        rows = op.results[0].type.shape[0] if split == "rows" else None
        if isinstance(rows, int):  # a static dim 0 the host cuts: dynamic in the kernel
            self.dim_map = {rows: None}
        if rows_1 is not None and isinstance(op.results[0].type.shape[1], int):  # and dim 1 where it may cut it
            self.dim_map[op.results[0].type.shape[1]] = None
        types = [t.with_shape(self.shape(t)) for t in [v.type for v in inputs] + [r.type for r in op.results]]
        name, entry = self.function(op, types, False)
        with ir.InsertionPoint(entry):
            for v, m in zip(inputs, entry.arguments, strict=False):
                self.values[id(v)] = B.read(m)
            self.lower(op)
            for r, m in zip(op.results, entry.arguments[len(inputs):], strict=True):
                B.write(self.get(r), m)
            func.ReturnOp([])
        self.dim_map = {}
        return Kernel(name, op, inputs, list(op.results), split, cut, rows_1=rows_1)

    @staticmethod
    def check_dtypes(ops: list[Operation]) -> None:
        """CpuLoweringError (naming the op and its line) for the first op of a dtype the backend refuses."""
        for op in ops:
            why = refused_dtype(op)
            if why:
                raise CpuLoweringError(f"'{op.NAME}' is not supported by the cpu backend ({why})", op.loc)

    def scalar_chain(self, inputs: list[Value], scalars: Sequence[ir.Value], ops: list[Operation],
                     result: Value) -> ir.Value:
        """`result`'s scalar, `ops` lowered in turn by their scalar rules on the `inputs`' `scalars` (the body of
        a fused chain's loop nest, or of a matmul epilogue's tile)."""
        saved, self.scalar_mode = self.scalar_mode, True
        try:
            for v, s in zip(inputs, scalars, strict=True):
                self.values[id(v)] = s
            for op in ops:
                self.lower(op)
            return self.get(result)
        finally:
            self.scalar_mode = saved

    def fused(self, ops: list[Operation], inputs: list[Value]) -> Kernel:
        """Elementwise ops that only feed one another, ending in `ops[-1]` (`fused_groups`), as one kernel: one
        loop nest over the last op's result whose body is each op's scalar rule in turn, so the intermediate
        values stay in registers instead of a pass over memory each; split by rows like one elementwise op."""
        self.check_dtypes(ops)
        root = ops[-1]
        result = root.results[0]
        out = result.type
        summed = isinstance(root, R.SumOp)  # the chain's value summed over axes as it is made (never stored)
        space = root.x.type if summed else out  # the loop nest's dims
        axes = {a % space.rank for a in root.axes} if summed else set()
        split, cut = "none", []
        if space.rank and space.shape[0] not in (0, 1) and 0 not in axes and (out.rank or not summed):
            split = "rows"
            cut = [v.type.rank == space.rank and carried(v.type.shape[0], space.shape[0]) for v in inputs]
        if isinstance(space.shape[0] if space.rank else None, int) and split == "rows":
            self.dim_map = {space.shape[0]: None}  # a static dim 0 the host cuts: dynamic in the kernel
        rows_1 = self.dim1_cut(space, inputs) if split == "rows" and not summed else None
        if rows_1 is not None and isinstance(space.shape[1], int):  # and dim 1 where it may cut it
            self.dim_map[space.shape[1]] = None
        start = len(self.tiled)
        types = [t.with_shape(self.shape(t)) for t in [v.type for v in inputs] + [out]]
        names = [op.NAME.split(".")[-1] for op in ops]
        label = "fused_" + "_".join(names[:4]) + (f"_and_{len(names) - 4}_more" if len(names) > 4 else "")
        name, entry = self.function(root, types, False, label)
        with ir.InsertionPoint(entry):
            operands = [(B.read(m), v.type) for v, m in zip(inputs, entry.arguments, strict=False)]
            d = [ir.AffineDimExpr.get(i) for i in range(space.rank)]

            def spread(i: int, n: Any, lead: int) -> bool:  # read broadcast along loop dim lead + i
                return n == 1 and space.shape[lead + i] != 1

            # (a dim of size 1 everywhere is read by its index: a reduction over a dim no operand indexes
            # crashes the transform interpreter)
            ins = [(t, [ir.AffineConstantExpr.get(0) if spread(i, n, space.rank - vt.rank)
                        else d[space.rank - vt.rank + i] for i, n in enumerate(vt.shape)]) for t, vt in operands]
            sources = self.out_sources(space, operands)

            def body(*scalars: ir.Value) -> ir.Value:
                return self.scalar_chain(inputs, scalars, ops[:-1] if summed else ops, root.x if summed else result)

            if not summed:
                init = self.empty_like_dims(out, sources)
                value = self.generic(out, ins, init, [PARALLEL] * out.rank, d, lambda *a: body(*a[:-1]))
                if out.rank:
                    self.tag(value, "elementwise", out)
            else:
                kept = [i for i in range(space.rank) if i not in axes]
                keep = root.keepdim
                out_exprs = [ir.AffineConstantExpr.get(0) if i in axes else d[i] for i in range(space.rank)] if keep \
                    else [d[i] for i in kept]
                init = self.zero_filled(out, [sources[i] for i in (range(space.rank) if keep else kept)], 0.0)
                add = arith.AddFOp if is_float(out.dtype) else arith.AddIOp
                kinds = [REDUCTION if i in axes else PARALLEL for i in range(space.rank)]
                value = self.generic(out, ins, init, kinds, out_exprs,
                                     lambda *a: add(a[-1], body(*a[:-1])).result)
                if out.rank:
                    dims = tuple(-1 if i in axes else i for i in range(space.rank)) if keep else tuple(kept)
                    lead = [space.rank - vt.rank for _, vt in operands]
                    reads = ";".join(",".join(str(-1 if spread(j, n, lo) else j + lo) for j, n in enumerate(vt.shape))
                                     for (_, vt), lo in zip(operands, lead, strict=True))
                    self.tag(value, "reduction:" + reads, space, dims)
            B.write(value, entry.arguments[len(inputs)])
            func.ReturnOp([])
        self.dim_map = {}
        return self.extra(Kernel(name, root, list(inputs), [result], split, cut, rows_1=rows_1), start)

    @staticmethod
    def dim1_cut(space: TensorType, inputs: list[Value]) -> list[int | None] | None:
        """For an elementwise kernel over `space`: each input's axis along space's dim 1 where it has that dim whole
        (None where it lacks it or has 1), so the host may cut dim 1 when dim 0 is 1; None where space has no such
        dim."""
        if space.rank < 2 or space.shape[1] in (0, 1):
            return None
        axes = [1 - (space.rank - v.type.rank) for v in inputs]
        return [p if p >= 0 and carried(v.type.shape[p], space.shape[1]) else None
                for p, v in zip(axes, inputs, strict=True)]

    def row_split(self, op: Operation) -> tuple[str, list[bool]]:
        """Whether the host may cut this op along dim 0 (a dim it only carries through)."""
        out = op.results[0].type if len(op.results) == 1 else None
        if out is None or out.rank == 0 or out.shape[0] in (0, 1):
            return "none", []
        cut = [v.type.rank == out.rank and carried(v.type.shape[0], out.shape[0]) for v in op.operands]
        if isinstance(op, Elementwise):  # every operand that has the dim is cut along it (a dim known only at
            return "rows", cut  # run time too: an elementwise op's operands have the result's, or 1 where typed 1)
        if out.shape[0] is None:
            return "none", []
        if isinstance(op, S.MatmulOp):
            if out.rank == 2:
                cut = [cut[0], False]
            return "rows", cut
        if isinstance(op, R.ReduceOp) and 0 not in {a % op.x.type.rank for a in op.axes}:
            return "rows", cut
        if isinstance(op, R.SoftmaxOp | R.RmsNormOp | R.LayerNormOp) and op.x.type.rank > 1 and \
                (getattr(op, "axis", -1) % op.x.type.rank) != 0:
            return "rows", [cut[0]] + [False] * (len(cut) - 1)
        return "none", []

    def plain(self, op: Operation, inputs: list[Value], build: Callable[..., None], parts: bool = False) -> Kernel:
        """A kernel of `op` reading `inputs` and writing its results; `build(*memrefs)` makes the body."""
        name, entry = self.function(op, [v.type for v in inputs] + [r.type for r in op.results], parts)
        with ir.InsertionPoint(entry):
            build(*entry.arguments)
            func.ReturnOp([])
        return Kernel(name, op, inputs, list(op.results), "parts" if parts else "none")

    # ---- values in a kernel body ------------------------------------------------------------------------
    def lower(self, op: Operation) -> None:
        """op's values from its operands' (already built), by its LOWERINGS rule."""
        rule = LOWERINGS.find(op)
        if rule is None:
            raise CpuLoweringError(f"'{op.NAME}' is not supported by the cpu backend", op.loc)
        out = rule(self, op)
        results = out if isinstance(out, tuple) else (out,)
        for r, v in zip(op.results, results, strict=True):
            self.values[id(r)] = v

    def get(self, v: Value) -> ir.Value:
        x = self.values[id(v)]
        if self.scalar_mode and isinstance(x.type, ir.RankedTensorType) and x.type.rank == 0:
            return tensor.ExtractOp(x, []).result  # a 0-d value from outside the region (a length), as a scalar
        return x

    def elementwise(self, op: Operation, fn: Any) -> ir.Value:
        if self.scalar_mode:
            return fn(*[self.get(v) for v in op.operands])
        out = op.results[0].type
        operands = [(self.get(v), v.type) for v in op.operands]
        init = self.empty_like_dims(out, self.out_sources(out, operands))
        ins = [(v, self.broadcast_exprs(t, out.rank)) for v, t in operands]
        ident = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
        result = self.generic(out, ins, init, [PARALLEL] * out.rank, ident, lambda *a: fn(*a[:-1]))
        if out.rank:
            self.tag(result, "elementwise", out)
        return result

    def dim(self, v: ir.Value, i: int) -> ir.Value:
        return tensor.DimOp(v, arith.ConstantOp(ir.IndexType.get(), i).result).result

    def empty_like_dims(self, t: TensorType, sources: list[tuple[ir.Value, int]]) -> ir.Value:
        """tensor.empty of type t; each dynamic dim is read from (source value, source axis)."""
        shape = self.shape(t)
        dyn = [self.dim(src, axis) for d, (src, axis) in zip(shape, sources, strict=True) if not isinstance(d, int)]
        it = iter(dyn)
        return tensor.EmptyOp([d if isinstance(d, int) else next(it) for d in shape], element_type(t.dtype)).result

    def shape(self, t: TensorType) -> tuple:
        """t's shape as built (`dim_map` applied)."""
        return tuple(self.dim_map.get(d, d) for d in t.shape)

    def out_sources(self, out: TensorType, operands: list[tuple[ir.Value, TensorType]]) -> list[tuple[ir.Value, int]]:
        """For each output axis, an operand axis of the same (broadcast) size to read a dynamic size from."""
        sources = []
        for axis in range(out.rank):
            found = None
            for v, t in operands:
                a = axis - (out.rank - t.rank)
                if a >= 0 and t.shape[a] != 1:
                    found = (v, a)
                    break
            sources.append(found or (operands[0][0], 0))
        return sources

    def generic(self, out: TensorType, inputs: list[tuple[ir.Value, list]], init: ir.Value, kinds: list[str],
                out_exprs: list, body: Any) -> ir.Value:
        rank = len(kinds)
        op = linalg.GenericOp([tensor_type(out.with_shape(self.shape(out)))], [v for v, _ in inputs], [init],
                              B.maps(rank, [e for _, e in inputs] + [out_exprs]), B.iterators(kinds))
        args = [ir.RankedTensorType(v.type).element_type for v, _ in inputs] + [element_type(out.dtype)]
        block = op.regions[0].blocks.append(*args)
        with ir.InsertionPoint(block):
            linalg.YieldOp([body(*block.arguments)])
        return op.result

    def broadcast_exprs(self, t: TensorType, out_rank: int) -> list:
        """Affine exprs reading operand type t inside an out_rank iteration space (NumPy broadcasting)."""
        lead = out_rank - t.rank
        return [ir.AffineConstantExpr.get(0) if d == 1 else ir.AffineDimExpr.get(lead + i)
                for i, d in enumerate(t.shape)]

    def tag(self, result: ir.Value, kind: str, space: TensorType, out_dims: tuple | None = None) -> None:
        """Mark the op of `result` for the schedule (jit.py) to tile and vectorize over `space`'s dims.
        Not inside a kernel's own loops (`untiled`): there, tiling every op and peeling its tails makes
        bufferization's analysis take seconds per kernel."""
        if self.untiled:
            return
        owner = result.owner
        if any(isinstance(v.type, ir.ShapedType) and v.type.element_type == ir.IntegerType.get_signless(1)
               for v in list(owner.operands) + list(owner.results)):
            return  # bool tiles stay scalar loops: a vector of i1 is stored bit-packed, a bool array a byte each
        if any(isinstance(v.type, ir.ShapedType) and 0 in ir.ShapedType(v.type).shape
               for v in list(owner.operands) + list(owner.results)):
            return  # nothing to tile in an empty operand or result (the transform interpreter crashed tiling one)
        tag = f"sparsa.tile{len(self.tiled)}"
        result.owner.attributes[tag] = ir.UnitAttr.get()
        shape = tuple(d if isinstance(d, int) else None for d in self.shape(space))
        dims = tuple(range(space.rank)) if out_dims is None else out_dims
        self.tiled.append((tag, kind, shape, str(element_type(space.dtype)), dims))

    def zero_filled(self, t: TensorType, sources: list[tuple[ir.Value, int]], value: float | int = 0.0) -> ir.Value:
        init = self.empty_like_dims(t, sources)
        return linalg.fill(scalar_constant(element_type(t.dtype), value), outs=[init])

    def inline(self, region: Region, args: list[ir.Value], scalar: bool) -> list[ir.Value]:
        """The values a region yields, its ops lowered here on `args` (scalars in scalar mode)."""
        saved = self.scalar_mode
        self.scalar_mode = scalar
        try:
            for a, v in zip(region.block.args, args, strict=True):
                self.values[id(a)] = v
            for op in region.block.ops:
                if op.TERMINATOR:
                    return [self.get(v) for v in op.operands]
                self.lower(op)
        finally:
            self.scalar_mode = saved
        raise CpuLoweringError("region without a terminator")

    def matmul_tile(self, a: ir.Value, b: ir.Value, m: ir.Value, n: ir.Value, et: ir.Type,
                    init: ir.Value | None = None, transpose_a: bool = False) -> ir.Value:
        """a [m, k] @ b [k, n] (a given as [k, m] with `transpose_a`: the register tile reads a's elements one at
        a time, so either layout runs alike) as a tagged linalg matmul the schedule tiles."""
        if init is None:
            init = linalg.fill(B.c_float(0.0, et), outs=[B.empty([m, n], et)])
        d = [ir.AffineDimExpr.get(i) for i in range(3)]
        res_t = init.type
        a_map = [d[2], d[0]] if transpose_a else [d[0], d[2]]
        g = linalg.GenericOp([res_t], [a, b], [init], B.maps(3, [a_map, [d[2], d[1]], [d[0], d[1]]]),
                             B.iterators([PARALLEL, PARALLEL, REDUCTION]))
        block = g.regions[0].blocks.append(et, et, et)
        with ir.InsertionPoint(block):
            x, y, acc = block.arguments
            linalg.YieldOp([arith.AddFOp(acc, arith.MulFOp(x, y).result).result])
        shape = tuple(s if s != B.DYN() else None for s in ir.RankedTensorType(res_t).shape)
        self.tag(g.result, "matmul", TensorType(dtype_of(et), shape))
        return g.result

    def packed_matmul_tile(self, ap: ir.Value, b: ir.Value, et: ir.Type, init: ir.Value | None = None) -> ir.Value:
        """a @ b [k, n] with a's rows packed by register tile (`ap` [tiles, k, TILE_M]: ap[t, :, r] is row
        t * TILE_M + r), as [tiles, TILE_M, n]: a register tile then reads TILE_M consecutive floats of a per
        step of k, one stream, instead of TILE_M rows a row's length apart (rows 4 KiB apart share L1 sets)."""
        tiles, m = B.mdim(ap, 0), ir.RankedTensorType(ap.type).shape[2]
        n = ir.RankedTensorType(b.type).shape[1]
        if init is None:  # else accumulated onto [tiles, m, n]
            init = linalg.fill(B.c_float(0.0, et), outs=[B.empty([tiles, m, n if n != B.DYN() else B.mdim(b, 1)],
                                                                  et)])
        d = [ir.AffineDimExpr.get(i) for i in range(4)]
        g = linalg.GenericOp([init.type], [ap, b], [init], B.maps(4, [[d[0], d[3], d[1]], [d[3], d[2]],
                                                                      [d[0], d[1], d[2]]]),
                             B.iterators([PARALLEL, PARALLEL, PARALLEL, REDUCTION]))
        block = g.regions[0].blocks.append(et, et, et)
        with ir.InsertionPoint(block):
            x, y, acc = block.arguments
            linalg.YieldOp([arith.AddFOp(acc, arith.MulFOp(x, y).result).result])
        self.tag(g.result, "matmul", TensorType(dtype_of(et), (None, m, n if n != B.DYN() else None)))
        return g.result

    def tile_map(self, inputs: list[tuple[ir.Value, list]], sizes: list[ir.Value], et: ir.Type, body,
                 tag: bool = False) -> ir.Value:
        """An elementwise generic over a tile of `sizes` (inputs with their affine exprs)."""
        rank = len(sizes)
        d = [ir.AffineDimExpr.get(i) for i in range(rank)]
        init = B.empty(sizes, et)
        g = linalg.GenericOp([init.type], [v for v, _ in inputs], [init], B.maps(rank, [e for _, e in inputs] + [d]),
                             B.iterators([PARALLEL] * rank))
        block = g.regions[0].blocks.append(*[ir.RankedTensorType(v.type).element_type for v, _ in inputs], et)
        with ir.InsertionPoint(block):
            linalg.YieldOp([body(*block.arguments[:-1])])
        if tag:  # (its static sizes as built: a dim known to be a multiple of the tile is not peeled)
            shape = tuple(None if d == B.DYN() else d for d in ir.RankedTensorType(g.result.type).shape)
            self.tag(g.result, "elementwise", TensorType(dtype_of(et), shape))
        return g.result

    def row_reduce(self, x: ir.Value, start: float, combine, tag: bool = False) -> ir.Value:
        """[n, m] -> [n]: combine(acc, v) over each row."""
        et = ir.RankedTensorType(x.type).element_type
        init = linalg.fill(B.c_float(start, et), outs=[B.empty([B.mdim(x, 0)], et)])
        d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
        g = linalg.GenericOp([init.type], [x], [init], B.maps(2, [[d0, d1], [d0]]), B.iterators([PARALLEL, REDUCTION]))
        block = g.regions[0].blocks.append(et, et)
        with ir.InsertionPoint(block):
            v, acc = block.arguments
            linalg.YieldOp([combine(acc, v)])
        if tag:
            self.tag(g.result, "reduction", TensorType(dtype_of(et), (None, None)), (0,))
        return g.result

    def recurrence(self, out: ir.Value, axis: int, operands: list[tuple[ir.Value, TensorType]],
                   h0: tuple[ir.Value, TensorType] | None, start: float | int,
                   step: Callable[..., ir.Value], reverse: bool = False, ahead: tuple[int, ...] = ()) -> None:
        """out[t] = step(operands at t..., out[t-1]) along `axis`, with out[-1] = h0 (or `start`). The
        operands broadcast to out (NumPy rules); each step is one generic over the other axes. With `reverse`,
        from the last step back (out[t+1] is the previous one), the operands in `ahead` read at t+1."""
        rank = ir.MemRefType(out.type).rank
        d = [ir.AffineDimExpr.get(i) for i in range(rank)]
        kinds = [PARALLEL] * rank
        et = ir.MemRefType(out.type).element_type
        sizes = B.sizes_of(out)
        sizes[axis] = 1
        n = B.mdim(out, axis)
        f = B.loop(0, n)
        with ir.InsertionPoint(f.body):
            i = f.induction_variable
            t = B.sub(B.sub(n, B.c_index(1)), i) if reverse else i
            ins = [self.step_view(m, tt, axis, rank, t) for m, tt in operands]
            cur = B.subview(out, [t if i == axis else 0 for i in range(rank)], sizes)
            first = B.if_(B.cmpi("eq", i, B.c_index(0)), has_else=True)
            with ir.InsertionPoint(first.then_block):
                if h0 is None:
                    B.memref_generic(ins, cur, d, kinds, lambda *a: step(*a[:-1], scalar_constant(et, start)))
                else:
                    state = [i for i in range(rank) if i != axis]
                    lead = len(state) - h0[1].rank
                    exprs = [ir.AffineConstantExpr.get(0) if s == 1 else d[state[lead + j]]
                             for j, s in enumerate(h0[1].shape)]
                    B.memref_generic(ins + [(h0[0], exprs)], cur, d, kinds, lambda *a: step(*a[:-1]))
                scf.YieldOp([])
            with ir.InsertionPoint(first.else_block):
                before = B.add(t, B.c_index(1)) if reverse else B.sub(t, B.c_index(1))
                prev = B.subview(out, [before if i == axis else 0 for i in range(rank)], sizes)
                ins = [self.step_view(m, tt, axis, rank, before) if k in ahead else v
                       for k, ((m, tt), v) in enumerate(zip(operands, ins, strict=True))]
                B.memref_generic(ins + [(prev, d)], cur, d, kinds, lambda *a: step(*a[:-1]))
                scf.YieldOp([])
            scf.YieldOp([])

    def step_view(self, m: ir.Value, t: TensorType, axis: int, rank: int, step: ir.Value) -> tuple[ir.Value, list]:
        """Step `step` along `axis` of an operand right-aligned to a rank-`rank` output, with its exprs
        (an operand without the axis is the same at every step)."""
        exprs = self.broadcast_exprs(t, rank)
        pos = axis - (rank - t.rank)
        if pos < 0 or t.shape[pos] == 1:
            return m, exprs
        sizes = B.sizes_of(m)
        sizes[pos] = 1
        return B.subview(m, [step if i == pos else 0 for i in range(t.rank)], sizes), exprs
