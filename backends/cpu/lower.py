"""Sparsa IR -> upstream MLIR (`linalg`, `arith`, `math`, `tensor`) built with the MLIR Python bindings that
torch-mlir ships: the dense ops (elementwise with NumPy broadcasting, batched matmul, reductions, softmax,
rmsnorm/layernorm, transpose, gather) as `linalg.generic`s on static or symbolic shapes, tagged for the
schedule (jit.py) to tile and vectorize. In scalar mode the same handlers inline mask and score regions into
a loop body. Any other op is an error naming it, the backend and its source line.
"""

from __future__ import annotations

import math
from typing import Any

from torch_mlir import ir
from torch_mlir.dialects import arith, linalg, tensor
from torch_mlir.dialects import math as mmath

from sparsa.backends.cpu import build as B
from sparsa.ir.core import Operation, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.types import TensorType, is_float

PARALLEL = "#linalg.iterator_type<parallel>"
REDUCTION = "#linalg.iterator_type<reduction>"


class CpuLoweringError(SparsaError):
    """An op the cpu backend cannot lower yet."""


def element_type(dtype: str) -> ir.Type:
    table = {"f32": ir.F32Type.get, "f64": ir.F64Type.get, "f16": ir.F16Type.get, "bf16": ir.BF16Type.get,
             "i64": lambda: ir.IntegerType.get_signless(64), "i32": lambda: ir.IntegerType.get_signless(32),
             "i8": lambda: ir.IntegerType.get_signless(8), "i1": lambda: ir.IntegerType.get_signless(1)}
    return table[dtype]()


def tensor_type(t: TensorType) -> ir.RankedTensorType:
    dims = [d if isinstance(d, int) else ir.ShapedType.get_dynamic_size() for d in t.shape]
    return ir.RankedTensorType.get(dims, element_type(t.dtype))


def _maps(out_rank: int, exprs: list[list[ir.AffineExpr]]) -> ir.ArrayAttr:
    return ir.ArrayAttr.get([ir.AffineMapAttr.get(ir.AffineMap.get(out_rank, 0, e)) for e in exprs])


def _iterators(kinds: list[str]) -> ir.ArrayAttr:
    return ir.ArrayAttr.get([ir.Attribute.parse(k) for k in kinds])


class Lowering:
    """Builds one MLIR function from a Sparsa `func.func` (the insertion point is the function body)."""

    def __init__(self) -> None:
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

    # ---- helpers ------------------------------------------------------------------------------------
    def dim(self, v: ir.Value, i: int) -> ir.Value:
        return tensor.DimOp(v, arith.ConstantOp(ir.IndexType.get(), i).result).result

    def empty_like_dims(self, t: TensorType, sources: list[tuple[ir.Value, int]]) -> ir.Value:
        """tensor.empty of type t; each dynamic dim is read from (source value, source axis)."""
        shape = self.shape(t)
        dyn = [self.dim(src, axis) for d, (src, axis) in zip(shape, sources, strict=True) if not isinstance(d, int)]
        return tensor.EmptyOp([d if isinstance(d, int) else dv for d, dv in _pair(shape, dyn)],
                              element_type(t.dtype)).result

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
                              _maps(rank, [e for _, e in inputs] + [out_exprs]), _iterators(kinds))
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

    # ---- the ops ----------------------------------------------------------------------------------------
    def lower(self, op: Operation) -> None:
        handler = getattr(self, "op_" + type(op).__name__, None)
        if handler is None:
            for base in type(op).__mro__[1:]:
                handler = getattr(self, "op_" + base.__name__, None)
                if handler is not None:
                    break
        if handler is None:
            raise CpuLoweringError(f"'{op.NAME}' is not supported by the cpu backend yet", op.loc)
        out = handler(op)
        results = out if isinstance(out, tuple) else (out,)
        for r, v in zip(op.results, results, strict=True):
            self.values[id(r)] = v

    def get(self, v: Value) -> ir.Value:
        return self.values[id(v)]

    def op_ConstantOp(self, op: Operation) -> ir.Value:
        t = op.result.type
        et = element_type(t.dtype)
        attr = ir.FloatAttr.get(et, float(op.value)) if is_float(t.dtype) else ir.IntegerAttr.get(et, int(op.value))
        scalar = arith.ConstantOp(et, attr).result
        if self.scalar_mode:
            return scalar
        if t.rank == 0:
            return tensor.FromElementsOp(tensor_type(t), [scalar]).result
        if not t.is_static():
            raise CpuLoweringError("a constant of symbolic shape is not supported by the cpu backend yet", op.loc)
        return linalg.fill(scalar, outs=[tensor.EmptyOp(list(t.shape), et).result])

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
        tag = f"sparsa.tile{len(self.tiled)}"
        result.owner.attributes[tag] = ir.UnitAttr.get()
        shape = tuple(d if isinstance(d, int) else None for d in self.shape(space))
        dims = tuple(range(space.rank)) if out_dims is None else out_dims
        self.tiled.append((tag, kind, shape, str(element_type(space.dtype)), dims))

    def op_UnaryOp(self, op: Operation) -> ir.Value:
        floats = {T.LogOp: mmath.LogOp, T.SqrtOp: mmath.SqrtOp, T.RsqrtOp: mmath.RsqrtOp,
                  T.TanhOp: mmath.TanhOp, T.SinOp: mmath.SinOp, T.CosOp: mmath.CosOp}
        dt = op.result.type.dtype
        et = element_type(dt)

        def zero() -> ir.Value:
            return arith.ConstantOp(et, ir.FloatAttr.get(et, 0.0) if is_float(dt) else ir.IntegerAttr.get(et, 0)).result

        def one() -> ir.Value:
            return arith.ConstantOp(et, ir.FloatAttr.get(et, 1.0)).result

        def sigmoid(x: ir.Value) -> ir.Value:
            return arith.DivFOp(one(), arith.AddFOp(one(), exp(arith.NegFOp(x).result)).result).result

        def softplus(x: ir.Value) -> ir.Value:  # max(x, 0) + log1p(exp(-|x|)): no overflow
            tail = mmath.Log1pOp(exp(arith.NegFOp(mmath.AbsFOp(x).result).result)).result
            return arith.AddFOp(arith.MaximumFOp(x, zero()).result, tail).result

        def gelu(x: ir.Value) -> ir.Value:  # x * Phi(x) with the error function
            phi = erf(arith.MulFOp(x, B.c_float(math.sqrt(0.5), et)).result, et)
            return arith.MulFOp(arith.MulFOp(x, B.c_float(0.5, et)).result, arith.AddFOp(one(), phi).result).result

        def gelu_tanh(x: ir.Value) -> ir.Value:
            cube = arith.MulFOp(arith.MulFOp(x, x).result, x).result
            inner = arith.AddFOp(x, arith.MulFOp(cube, B.c_float(0.044715, et)).result).result
            th = mmath.TanhOp(arith.MulFOp(inner, B.c_float(math.sqrt(2.0 / math.pi), et)).result).result
            return arith.MulFOp(arith.MulFOp(x, B.c_float(0.5, et)).result, arith.AddFOp(one(), th).result).result

        t = type(op)
        if t is T.ExpOp:
            return self.elementwise(op, exp)
        if t in floats:
            return self.elementwise(op, lambda x: floats[t](x).result)
        if t is T.NegOp:
            return self.elementwise(op, lambda x: arith.NegFOp(x).result if is_float(dt)
                                    else arith.SubIOp(zero(), x).result)
        if t is T.AbsOp:
            return self.elementwise(op, lambda x: mmath.AbsFOp(x).result if is_float(dt) else mmath.AbsIOp(x).result)
        if t is T.ReluOp:
            return self.elementwise(op, lambda x: arith.MaximumFOp(x, zero()).result if is_float(dt)
                                    else arith.MaxSIOp(x, zero()).result)
        if t is T.SigmoidOp:
            return self.elementwise(op, sigmoid)
        if t is T.SiluOp:
            return self.elementwise(op, lambda x: arith.MulFOp(x, sigmoid(x)).result)
        if t in (T.SoftplusOp, T.GeluOp, T.GeluTanhOp):
            fn = {T.SoftplusOp: softplus, T.GeluOp: gelu, T.GeluTanhOp: gelu_tanh}[t]
            return self.elementwise(op, fn)
        raise CpuLoweringError(f"'{op.NAME}' on {dt} is not supported by the cpu backend yet", op.loc)

    def op_BinaryOp(self, op: Operation) -> ir.Value:
        dt = op.result.type.dtype
        fl = {T.AddOp: arith.AddFOp, T.SubOp: arith.SubFOp, T.MulOp: arith.MulFOp, T.DivOp: arith.DivFOp,
              T.MaximumOp: arith.MaximumFOp, T.MinimumOp: arith.MinimumFOp, T.PowOp: mmath.PowFOp}
        it = {T.AddOp: arith.AddIOp, T.SubOp: arith.SubIOp, T.MulOp: arith.MulIOp, T.MaximumOp: arith.MaxSIOp,
              T.MinimumOp: arith.MinSIOp, T.AndOp: arith.AndIOp, T.OrOp: arith.OrIOp}
        if type(op) is T.FloorDivOp:
            fl[T.FloorDivOp] = lambda a, b: mmath.FloorOp(arith.DivFOp(a, b).result)
            it[T.FloorDivOp] = arith.FloorDivSIOp
        if type(op) is T.ModOp:  # Python's sign convention: the result has the divisor's sign
            it[T.ModOp] = lambda a, b: arith.SubIOp(a, arith.MulIOp(arith.FloorDivSIOp(a, b).result, b).result)
            fl[T.ModOp] = lambda a, b: arith.SubFOp(a, arith.MulFOp(
                mmath.FloorOp(arith.DivFOp(a, b).result).result, b).result)
        table = fl if is_float(dt) else it
        if type(op) not in table:
            raise CpuLoweringError(f"'{op.NAME}' on {dt} is not supported by the cpu backend yet", op.loc)
        return self.elementwise(op, lambda a, b: table[type(op)](a, b).result)

    def op_CmpOp(self, op: Operation) -> ir.Value:
        dt = op.lhs.type.dtype
        if is_float(dt):
            pred = {"eq": 1, "gt": 2, "ge": 3, "lt": 4, "le": 5, "ne": 6}[op.pred]  # ordered predicates
            return self.elementwise(op, lambda a, b: arith.CmpFOp(pred, a, b).result)
        pred = {"eq": 0, "ne": 1, "lt": 2, "le": 3, "gt": 4, "ge": 5}[op.pred]  # signed predicates
        return self.elementwise(op, lambda a, b: arith.CmpIOp(pred, a, b).result)

    def op_WhereOp(self, op: Operation) -> ir.Value:
        return self.elementwise(op, lambda c, a, b: arith.SelectOp(c, a, b).result)

    def op_NotOp(self, op: Operation) -> ir.Value:
        i1 = element_type("i1")
        true = ir.IntegerAttr.get(i1, 1)
        return self.elementwise(op, lambda x: arith.XOrIOp(x, arith.ConstantOp(i1, true).result).result)

    def op_CastOp(self, op: Operation) -> ir.Value:
        src, dst = op.x.type.dtype, op.to
        et = element_type(dst)
        if dst == "i1":  # nonzero is true (NaN too, as in NumPy)
            zero = scalar_constant(element_type(src), 0)
            if is_float(src):
                return self.elementwise(op, lambda x: arith.CmpFOp(13, x, zero).result)  # une
            return self.elementwise(op, lambda x: arith.CmpIOp(1, x, zero).result)
        if is_float(src) and is_float(dst):
            wider = ir.FloatType(et).width > ir.FloatType(element_type(src)).width
            if src == dst:
                return self.elementwise(op, lambda x: x)
            return self.elementwise(op, lambda x: (arith.ExtFOp if wider else arith.TruncFOp)(et, x).result)
        if not is_float(src) and is_float(dst):
            return self.elementwise(op, lambda x: (arith.UIToFPOp if src == "i1" else arith.SIToFPOp)(et, x).result)
        if is_float(src):
            return self.elementwise(op, lambda x: arith.FPToSIOp(et, x).result)
        w_src, w_dst = ir.IntegerType(element_type(src)).width, ir.IntegerType(et).width
        if w_src == w_dst:
            return self.elementwise(op, lambda x: x)
        ext = arith.ExtUIOp if src == "i1" else arith.ExtSIOp
        return self.elementwise(op, lambda x: (ext if w_dst > w_src else arith.TruncIOp)(et, x).result)

    def op_MatmulOp(self, op: Operation) -> ir.Value:
        return self.matmul(op, op.lhs, op.rhs)

    def op_SparseMatmulOp(self, op: Operation) -> ir.Value:
        """x @ w for a sparse-layout w that is not a weight (lower-sparse-weights packs the weights): the
        value is the dense product."""
        return self.matmul(op, op.x, op.w)

    def matmul(self, op: Operation, lhs: Value, rhs: Value) -> ir.Value:
        """NumPy's matmul: batch dims broadcast; a 1-D lhs is a row and a 1-D rhs a column, dropped from the
        result. Tagged for the register-tiled schedule when both sides are matrices."""
        a, b = lhs.type, rhs.type
        out = op.result.type
        if a.rank < 1 or b.rank < 1 or not is_float(out.dtype):
            raise CpuLoweringError("cpu matmul needs float operands of rank >= 1", op.loc)
        has_m, has_n = a.rank >= 2, b.rank >= 2
        nb = out.rank - has_m - has_n
        d = [ir.AffineDimExpr.get(i) for i in range(out.rank + 1)]
        m, n, k = d[nb], d[nb + has_m], d[out.rank]
        ba, bb = a.shape[:-2], b.shape[:-2]
        batch_a = [ir.AffineConstantExpr.get(0) if s == 1 else d[nb - len(ba) + i] for i, s in enumerate(ba)]
        batch_b = [ir.AffineConstantExpr.get(0) if s == 1 else d[nb - len(bb) + i] for i, s in enumerate(bb)]
        av, bv = self.get(lhs), self.get(rhs)
        sources = self.out_sources(TensorType(out.dtype, out.shape[:nb]), [(av, a.with_shape(ba)),
                                                                          (bv, b.with_shape(bb))])
        sources += [(av, a.rank - 2)] * has_m + [(bv, b.rank - 1)] * has_n
        init = self.zero_filled(out, sources)
        result = self.generic(out, [(av, batch_a + [m] * has_m + [k]), (bv, batch_b + [k] + [n] * has_n)], init,
                              [PARALLEL] * out.rank + [REDUCTION], d[:out.rank],
                              lambda x, y, acc: arith.AddFOp(acc, arith.MulFOp(x, y).result).result)
        if has_m and has_n:
            self.tag(result, "matmul", out)
        return result

    def zero_filled(self, t: TensorType, sources: list[tuple[ir.Value, int]], value: float | int = 0.0) -> ir.Value:
        init = self.empty_like_dims(t, sources)
        return linalg.fill(scalar_constant(element_type(t.dtype), value), outs=[init])

    def reduce(self, x: ir.Value, t: TensorType, axes: set[int], keepdim: bool, out: TensorType, start: float | int,
               combine: Any) -> ir.Value:
        d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
        out_exprs = [ir.AffineConstantExpr.get(0) if i in axes else d[i] for i in range(t.rank)] if keepdim else [
            d[i] for i in range(t.rank) if i not in axes]
        kept = [i for i in range(t.rank) if i not in axes]
        sources = [(x, i) for i in (range(t.rank) if keepdim else kept)]
        init = self.zero_filled(out, sources, start)
        kinds = [REDUCTION if i in axes else PARALLEL for i in range(t.rank)]
        result = self.generic(out, [(x, d)], init, kinds, out_exprs, lambda v, acc: combine(v, acc))
        if out.rank:
            dims = tuple(-1 if i in axes else i for i in range(t.rank)) if keepdim else tuple(kept)
            self.tag(result, "reduction", t, dims)
        return result

    def op_ReduceOp(self, op: Operation) -> ir.Value:
        t = op.x.type
        axes = {a % t.rank for a in op.axes}
        x = self.get(op.x)
        kind = type(op)
        fl = is_float(t.dtype)
        if kind is R.SumOp:
            add = arith.AddFOp if fl else arith.AddIOp
            return self.reduce(x, t, axes, op.keepdim, op.result.type, 0.0 if fl else 0, lambda v, a: add(a, v).result)
        if kind is R.MeanOp:
            total = self.reduce(x, t, axes, op.keepdim, op.result.type, 0.0, lambda v, a: arith.AddFOp(a, v).result)
            et = element_type(t.dtype)
            count = arith.ConstantOp(et, ir.FloatAttr.get(et, 1.0)).result
            for a in sorted(axes):  # the number of elements averaged, read at run time for symbolic dims
                n = t.shape[a]
                size = arith.ConstantOp(et, ir.FloatAttr.get(et, float(n))).result if isinstance(n, int) else \
                    arith.SIToFPOp(et, arith.IndexCastOp(ir.IntegerType.get_signless(64), self.dim(x, a)).result).result
                count = arith.MulFOp(count, size).result
            inv = arith.DivFOp(arith.ConstantOp(et, ir.FloatAttr.get(et, 1.0)).result, count).result
            return self.map(total, op.result.type, lambda v: arith.MulFOp(v, inv).result)
        if kind in (R.MaxOp, R.MinOp):
            if fl:
                start = float("-inf") if kind is R.MaxOp else float("inf")
                pick = arith.MaximumFOp if kind is R.MaxOp else arith.MinimumFOp
            else:
                bits = ir.IntegerType(element_type(t.dtype)).width
                start = -(1 << (bits - 1)) if kind is R.MaxOp else (1 << (bits - 1)) - 1
                pick = arith.MaxSIOp if kind is R.MaxOp else arith.MinSIOp
            return self.reduce(x, t, axes, op.keepdim, op.result.type, start, lambda v, a: pick(a, v).result)
        if kind is R.LogSumExpOp:
            return self.logsumexp(x, t, axes, op.keepdim, op.result.type)
        raise CpuLoweringError(f"'{op.NAME}' is not supported by the cpu backend yet", op.loc)

    def map(self, x: ir.Value, t: TensorType, fn: Any) -> ir.Value:
        """fn applied to every element of x (of type t)."""
        d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
        init = self.empty_like_dims(t, [(x, i) for i in range(t.rank)])
        return self.generic(t, [(x, d)], init, [PARALLEL] * t.rank, d, lambda v, _: fn(v))

    def logsumexp(self, x: ir.Value, t: TensorType, axes: set[int], keepdim: bool, out: TensorType) -> ir.Value:
        """log(sum(exp(x - m))) + m with m the max (0 where the max is not finite, as the reference)."""
        et = element_type(t.dtype)
        kept = TensorType(t.dtype, tuple(1 if i in axes else s for i, s in enumerate(t.shape)))
        m = self.reduce(x, t, axes, True, kept, float("-inf"), lambda v, a: arith.MaximumFOp(a, v).result)

        def finite(v: ir.Value) -> ir.Value:
            inf = B.c_float(float("inf"), et)
            return arith.SelectOp(arith.CmpFOp(4, mmath.AbsFOp(v).result, inf).result, v, B.c_float(0.0, et)).result

        m = self.map(m, kept, finite)
        d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
        bcast = [ir.AffineConstantExpr.get(0) if i in axes else d[i] for i in range(t.rank)]
        init = self.empty_like_dims(t, [(x, i) for i in range(t.rank)])
        e = self.generic(t, [(x, d), (m, bcast)], init, [PARALLEL] * t.rank, d,
                         lambda v, mx, _: exp(arith.SubFOp(v, mx).result))
        s = self.reduce(e, t, axes, True, kept, 0.0, lambda v, a: arith.AddFOp(a, v).result)
        init = self.empty_like_dims(kept, [(s, i) for i in range(t.rank)])
        dk = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
        result = self.generic(kept, [(s, dk), (m, dk)], init, [PARALLEL] * t.rank, dk,
                              lambda v, mx, _: arith.AddFOp(mmath.LogOp(v).result, mx).result)
        if keepdim:
            return result
        kept_axes = [i for i in range(t.rank) if i not in axes]
        do = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
        src = [ir.AffineConstantExpr.get(0) if i in axes else do[kept_axes.index(i)] for i in range(t.rank)]
        init = self.empty_like_dims(out, [(result, i) for i in kept_axes])
        return self.generic(out, [(result, src)], init, [PARALLEL] * out.rank, do, lambda v, _: v)

    def op_SoftmaxOp(self, op: Operation) -> ir.Value:
        t = op.x.type
        axis = op.axis % t.rank
        x = self.get(op.x)
        kept = TensorType(t.dtype, tuple(1 if i == axis else d for i, d in enumerate(t.shape)))
        m = self.reduce(x, t, {axis}, True, kept, float("-inf"), lambda v, a: arith.MaximumFOp(a, v).result)
        d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
        bcast = [ir.AffineConstantExpr.get(0) if i == axis else d[i] for i in range(t.rank)]
        init = self.empty_like_dims(t, [(x, i) for i in range(t.rank)])
        e = self.generic(t, [(x, d), (m, bcast)], init, [PARALLEL] * t.rank, d,
                         lambda v, mx, _: exp(arith.SubFOp(v, mx).result))
        s = self.reduce(e, t, {axis}, True, kept, 0.0, lambda v, a: arith.AddFOp(a, v).result)
        init = self.empty_like_dims(t, [(x, i) for i in range(t.rank)])
        return self.generic(t, [(e, d), (s, bcast)], init, [PARALLEL] * t.rank, d,
                            lambda v, total, _: arith.DivFOp(v, total).result)

    def op_TransposeOp(self, op: Operation) -> ir.Value:
        out = op.result.type
        x = self.get(op.x)
        d = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
        src = [None] * out.rank
        for i, p in enumerate(op.perm):
            src[p] = d[i]
        init = self.empty_like_dims(out, [(x, p) for p in op.perm])
        return self.generic(out, [(x, src)], init, [PARALLEL] * out.rank, d, lambda v, _: v)


    def op_ExpandDimsOp(self, op: Operation) -> ir.Value:
        out = op.result.type
        x = self.get(op.x)
        new = {a % out.rank for a in op.axes}
        d = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
        kept = [i for i in range(out.rank) if i not in new]
        init = self.empty_like_dims(out, [(x, kept.index(i)) if i in kept else (x, 0) for i in range(out.rank)])
        return self.generic(out, [(x, [d[i] for i in kept])], init, [PARALLEL] * out.rank, d, lambda v, _: v)

    def op_SqueezeOp(self, op: Operation) -> ir.Value:
        out, t = op.result.type, op.x.type
        x = self.get(op.x)
        gone = {a % t.rank for a in op.axes}
        kept = [i for i in range(t.rank) if i not in gone]
        d = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
        src = [ir.AffineConstantExpr.get(0) if i in gone else d[kept.index(i)] for i in range(t.rank)]
        init = self.empty_like_dims(out, [(x, i) for i in kept])
        return self.generic(out, [(x, src)], init, [PARALLEL] * out.rank, d, lambda v, _: v)


    def op_GatherOp(self, op: Operation) -> ir.Value:
        x, t = self.get(op.x), op.x.type
        n = len(op.indices)
        if self.scalar_mode:
            if n != t.rank:
                raise CpuLoweringError("a gather inside a mask must pick single elements", op.loc)
            return tensor.ExtractOp(x, [self.wrapped(self.get(i), x, a) for a, i in enumerate(op.indices)]).result
        out = op.result.type
        lead = out.rank - (t.rank - n)
        lead_type = TensorType(out.dtype, out.shape[:lead])
        operands = [(self.get(i), i.type) for i in op.indices]
        sources = self.out_sources(lead_type, operands) + [(x, n + j) for j in range(t.rank - n)]
        init = self.empty_like_dims(out, sources)
        d = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
        ins = [(v, self.broadcast_exprs(it, lead)) for v, it in operands]

        def body(*args: ir.Value) -> ir.Value:
            picks = [self.wrapped(v, x, a) for a, v in enumerate(args[:n])]
            picks += [linalg.IndexOp(lead + j).result for j in range(t.rank - n)]
            return tensor.ExtractOp(x, picks).result

        return self.generic(out, ins, init, [PARALLEL] * out.rank, d, body)

    def wrapped(self, i: ir.Value, x: ir.Value, axis: int) -> ir.Value:
        """An index into `axis` of x from an integer, negative ones counted from the end (as NumPy does)."""
        i = arith.IndexCastOp(ir.IndexType.get(), i).result if not isinstance(i.type, ir.IndexType) else i
        zero = arith.ConstantOp(ir.IndexType.get(), 0).result
        neg = arith.CmpIOp(2, i, zero).result
        return arith.SelectOp(neg, arith.AddIOp(i, tensor.DimOp(x, arith.ConstantOp(ir.IndexType.get(), axis)
                                                                .result).result).result, i).result

    def row_count(self, x: ir.Value, t: TensorType) -> ir.Value:
        """The size of the last axis as a float (read at run time when symbolic)."""
        et = element_type(t.dtype)
        n = t.shape[-1]
        if isinstance(n, int):
            return arith.ConstantOp(et, ir.FloatAttr.get(et, float(n))).result
        return arith.SIToFPOp(et, arith.IndexCastOp(ir.IntegerType.get_signless(64), self.dim(x, t.rank - 1))
                              .result).result

    def op_RmsNormOp(self, op: Operation) -> ir.Value:
        t = op.x.type
        x, w = self.get(op.x), self.get(op.weight)
        et = element_type(t.dtype)
        kept = TensorType(t.dtype, t.shape[:-1] + (1,))
        ss = self.reduce(x, t, {t.rank - 1}, True, kept, 0.0,
                         lambda v, a: arith.AddFOp(a, arith.MulFOp(v, v).result).result)
        n = self.row_count(x, t)
        eps = arith.ConstantOp(et, ir.FloatAttr.get(et, float(op.eps))).result
        d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
        init = self.empty_like_dims(t, [(x, i) for i in range(t.rank)])

        def body(v: ir.Value, s: ir.Value, g: ir.Value, _: ir.Value) -> ir.Value:
            r = mmath.RsqrtOp(arith.AddFOp(arith.DivFOp(s, n).result, eps).result).result
            return arith.MulFOp(arith.MulFOp(v, r).result, g).result

        result = self.generic(t, [(x, d), (ss, d[:-1] + [ir.AffineConstantExpr.get(0)]), (w, d[-1:])], init,
                              [PARALLEL] * t.rank, d, body)
        self.tag(result, "elementwise", t)
        return result

    def op_LayerNormOp(self, op: Operation) -> ir.Value:
        t = op.x.type
        x, w, b = self.get(op.x), self.get(op.weight), self.get(op.bias)
        et = element_type(t.dtype)
        kept = TensorType(t.dtype, t.shape[:-1] + (1,))
        n = self.row_count(x, t)
        d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
        row = d[:-1] + [ir.AffineConstantExpr.get(0)]
        total = self.reduce(x, t, {t.rank - 1}, True, kept, 0.0, lambda v, a: arith.AddFOp(a, v).result)
        init = self.empty_like_dims(t, [(x, i) for i in range(t.rank)])
        centered = self.generic(t, [(x, d), (total, row)], init, [PARALLEL] * t.rank, d,
                                lambda v, s, _: arith.SubFOp(v, arith.DivFOp(s, n).result).result)
        self.tag(centered, "elementwise", t)
        ss = self.reduce(centered, t, {t.rank - 1}, True, kept, 0.0,
                         lambda v, a: arith.AddFOp(a, arith.MulFOp(v, v).result).result)
        eps = arith.ConstantOp(et, ir.FloatAttr.get(et, float(op.eps))).result
        init = self.empty_like_dims(t, [(x, i) for i in range(t.rank)])

        def body(c: ir.Value, s: ir.Value, g: ir.Value, beta: ir.Value, _: ir.Value) -> ir.Value:
            r = mmath.RsqrtOp(arith.AddFOp(arith.DivFOp(s, n).result, eps).result).result
            return arith.AddFOp(arith.MulFOp(arith.MulFOp(c, r).result, g).result, beta).result

        result = self.generic(t, [(centered, d), (ss, row), (w, d[-1:]), (b, d[-1:])], init, [PARALLEL] * t.rank,
                              d, body)
        self.tag(result, "elementwise", t)
        return result


def exp(x: ir.Value) -> ir.Value:
    """e**x. For float32, Cephes' expf as arith: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts), e**r by a
    degree-6 polynomial, 2**n built in the exponent bits (two factors, so subnormal results come out right);
    inf past the overflow point, NaN kept. It vectorizes and inlines; math.exp becomes a scalar libm call per element
    (LLVM has no vector expf without a vector math library). Other types use math.exp."""
    et = x.type
    if str(et) != "f32":
        return mmath.ExpOp(x).result

    def c(v: float) -> ir.Value:
        return B.c_float(v, et)

    def mul(a: ir.Value, b: ir.Value) -> ir.Value:
        return arith.MulFOp(a, b).result

    def add(a: ir.Value, b: ir.Value) -> ir.Value:
        return arith.AddFOp(a, b).result

    xc = arith.MinimumFOp(arith.MaximumFOp(x, c(-104.0)).result, c(88.72283935546875)).result
    n = mmath.FloorOp(add(mul(xc, c(1.44269504088896341)), c(0.5))).result
    r = arith.SubFOp(arith.SubFOp(xc, mul(n, c(0.693359375))).result, mul(n, c(-2.12194440e-4))).result
    p = c(1.9875691500e-4)
    for k in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = add(mul(p, r), c(k))
    y = add(add(mul(p, mul(r, r)), r), c(1.0))
    # 2**n as 2**(n >> 1) * 2**(n - (n >> 1)): both factors normal for n in -150..128 (results down to 0)
    i32 = ir.IntegerType.get_signless(32)
    ni = arith.FPToSIOp(i32, n).result
    half = arith.ShRSIOp(ni, B.c_int(1, 32)).result

    def pow2(k: ir.Value) -> ir.Value:
        biased = arith.AddIOp(k, B.c_int(127, 32)).result
        return arith.BitcastOp(et, arith.ShLIOp(biased, B.c_int(23, 32)).result).result

    result = mul(mul(y, pow2(half)), pow2(arith.SubIOp(ni, half).result))
    result = arith.SelectOp(arith.CmpFOp(2, x, c(88.72283935546875)).result, c(float("inf")), result).result
    return arith.SelectOp(arith.CmpFOp(14, x, x).result, x, result).result  # uno: NaN stays NaN


def erf(x: ir.Value, et: ir.Type) -> ir.Value:
    """erf(x) by Abramowitz and Stegun 7.1.26 (absolute error < 1.5e-7): arith and one exp, so it
    vectorizes (math.erf has no LLVM lowering but a scalar libm call)."""
    a = mmath.AbsFOp(x).result
    t = arith.DivFOp(B.c_float(1.0, et), arith.AddFOp(B.c_float(1.0, et), arith.MulFOp(
        a, B.c_float(0.3275911, et)).result).result).result
    poly = B.c_float(1.061405429, et)
    for c in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly = arith.AddFOp(arith.MulFOp(poly, t).result, B.c_float(c, et)).result
    poly = arith.MulFOp(poly, t).result
    tail = arith.MulFOp(poly, exp(arith.NegFOp(arith.MulFOp(a, a).result).result)).result
    return mmath.CopySignOp(arith.SubFOp(B.c_float(1.0, et), tail).result, x).result


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


def _pair(shape: tuple, dynamic: list) -> list:
    it = iter(dynamic)
    return [(d, None if isinstance(d, int) else next(it)) for d in shape]
