"""cpu lowering of `attn.block_map` for masks that read data (document ids, tables): each call classifies the
(query block, key block) tiles in native code, O(blocks), so that a model with such a mask stays one native call.

It is the interval classification of ir/dialects/attn_blocks.py, one tile at a time: every op's `interval` rule
(written once, on the op class) is built here as scalar float64 code through `NativeBounds`, the namespace that
stands where `ir.intervals.NumpyBounds` evaluates the same rules on arrays of all tiles. So the map is the
reference's bit for bit. Data a mask gathers is bounded as the reference bounds it: 1-D data by sparse tables of
range minima and maxima (built per call, O(n log n), each query O(1)), other ranks by the min and max over the box
the indices span, and an index with no finite bound by the whole tensor's min and max. A mask without data is
classified once per set of shapes on the host (`per_shape`), or at compile time."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func, memref, scf
from torch_mlir.dialects import math as mmath

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.attn_decode import decodes
from sparsa.backends.cpu.context import HOSTED, KERNELS, LAUNCHES, KernelContext
from sparsa.backends.cpu.signature import Hosted, Kernel, Scratch
from sparsa.ir.core import Operation, Value
from sparsa.ir.dialects import attn as AT
from sparsa.ir.dialects.attn_blocks import EMPTY, FULL, PARTIAL, BlockMapOp, evaluate_intervals, outer_values
from sparsa.ir.intervals import Interval, full_range
from sparsa.ir.types import TensorType, is_float

LENGTHS = TensorType("i64", (2,))  # the kernel's (sq, sk): the mask's lengths, which its result's shape rounds up


def f64() -> ir.Type:
    return ir.F64Type.get()


def lift(x: Any) -> ir.Value:
    """A native value from a Scalar, a Python bool (i1) or a number (f64)."""
    if isinstance(x, Scalar):
        return x.v
    if isinstance(x, bool | np.bool_):
        return arith.ConstantOp(ir.IntegerType.get_signless(1), int(x)).result
    return B.c_float(float(x), f64())


# arith.cmpf predicates, ordered as NumPy's comparisons are (false where either side is NaN)
OLT, OLE, OGT, OGE, OEQ = 4, 5, 2, 3, 1


class Scalar:
    """A native f64 (or i1) value under the operators the interval rules use, as a float64 array is under NumPy."""

    __slots__ = ("v",)

    def __init__(self, v: ir.Value):
        self.v = v

    def _op(self, cls: Any, other: Any, swap: bool = False) -> Scalar:
        a, b = lift(self), lift(other)
        return Scalar(cls(*((b, a) if swap else (a, b))).result)

    def _cmp(self, pred: int, other: Any) -> Scalar:
        return Scalar(arith.CmpFOp(pred, lift(self), lift(other)).result)

    def __add__(self, o: Any) -> Scalar:
        return self._op(arith.AddFOp, o)

    def __radd__(self, o: Any) -> Scalar:
        return self._op(arith.AddFOp, o, True)

    def __sub__(self, o: Any) -> Scalar:
        return self._op(arith.SubFOp, o)

    def __rsub__(self, o: Any) -> Scalar:
        return self._op(arith.SubFOp, o, True)

    def __mul__(self, o: Any) -> Scalar:
        return self._op(arith.MulFOp, o)

    def __rmul__(self, o: Any) -> Scalar:
        return self._op(arith.MulFOp, o, True)

    def __truediv__(self, o: Any) -> Scalar:
        return self._op(arith.DivFOp, o)

    def __rtruediv__(self, o: Any) -> Scalar:
        return self._op(arith.DivFOp, o, True)

    def __neg__(self) -> Scalar:
        return Scalar(arith.NegFOp(self.v).result)

    def __lt__(self, o: Any) -> Scalar:
        return self._cmp(OLT, o)

    def __le__(self, o: Any) -> Scalar:
        return self._cmp(OLE, o)

    def __gt__(self, o: Any) -> Scalar:
        return self._cmp(OGT, o)

    def __ge__(self, o: Any) -> Scalar:
        return self._cmp(OGE, o)

    def __eq__(self, o: Any) -> Scalar:  # type: ignore[override]
        return self._cmp(OEQ, o)

    __hash__ = None  # type: ignore[assignment]

    def __and__(self, o: Any) -> Scalar:
        return self._op(arith.AndIOp, o)

    __rand__ = __and__

    def __or__(self, o: Any) -> Scalar:
        return self._op(arith.OrIOp, o)

    __ror__ = __or__


def _unary(cls: Any) -> Any:
    return staticmethod(lambda x: Scalar(cls(lift(x)).result))


def _binary(cls: Any) -> Any:
    return staticmethod(lambda x, y: Scalar(cls(lift(x), lift(y)).result))


class Data:
    """An outer value the mask reads, as the kernel has it: its memref, whether it is empty, its min and max, and
    for 1-D data the sparse tables (`mins[level, i]`: the min of data[i : i + 2**level])."""

    def __init__(self, mem: ir.Value, dtype: str):
        self.mem, self.dtype = mem, dtype
        self.rank = ir.MemRefType(mem.type).rank
        self.sizes = [B.mdim(mem, d) for d in range(self.rank)]
        size = B.c_index(1)
        for s in self.sizes:
            size = B.mul(size, s)
        self.empty = B.cmpi("eq", size, B.c_index(0))
        self.lo, self.hi = self.box([B.c_index(0)] * self.rank, [B.sub(s, B.c_index(1)) for s in self.sizes])
        self.tables = self.sparse_tables() if self.rank == 1 else None

    def element(self, *idx: ir.Value) -> ir.Value:
        x = B.load(self.mem, *idx)
        if self.dtype == "i1":
            return arith.UIToFPOp(f64(), x).result
        if not is_float(self.dtype):
            return arith.SIToFPOp(f64(), x).result
        return x if self.dtype == "f64" else arith.ExtFOp(f64(), x).result

    def box(self, lo: list[ir.Value], hi: list[ir.Value]) -> tuple[ir.Value, ir.Value]:
        """min and max over data[lo0 : hi0 + 1, lo1 : hi1 + 1, ...] (NaN if any element is)."""
        inf = float("inf")

        def nest(d: int, idx: list[ir.Value], acc: list[ir.Value]) -> list[ir.Value]:
            if d == self.rank:
                x = self.element(*idx)
                return [arith.MinimumFOp(acc[0], x).result, arith.MaximumFOp(acc[1], x).result]
            loop = B.loop(lo[d], B.add(hi[d], B.c_index(1)), 1, acc)
            with ir.InsertionPoint(loop.body):
                scf.YieldOp(nest(d + 1, idx + [loop.induction_variable], list(loop.inner_iter_args)))
            return list(loop.results)

        return tuple(nest(0, [], [B.c_float(inf, f64()), B.c_float(-inf, f64())]))

    def sparse_tables(self) -> tuple[ir.Value, ir.Value]:
        n = self.sizes[0]
        levels = B.as_index(arith.SubIOp(B.c_int(64), mmath.CountLeadingZerosOp(B.as_i64(n)).result).result)
        t = ir.MemRefType.get([B.DYN(), B.DYN()], f64())
        mins, maxs = (memref.AllocOp(t, [levels, n], []).result for _ in range(2))

        def first(i: ir.Value) -> None:
            x = self.element(i)
            B.store(x, mins, 0, i)
            B.store(x, maxs, 0, i)

        def level(lv: ir.Value) -> None:
            half = B.as_index(arith.ShLIOp(B.c_int(1), B.as_i64(B.sub(lv, B.c_index(1)))).result)
            up = B.sub(lv, B.c_index(1))

            def entry(i: ir.Value) -> None:
                j = B.add(i, half)
                B.store(arith.MinimumFOp(B.load(mins, up, i), B.load(mins, up, j)).result, mins, lv, i)
                B.store(arith.MaximumFOp(B.load(maxs, up, i), B.load(maxs, up, j)).result, maxs, lv, i)

            B.each(B.add(B.sub(n, B.add(half, half)), B.c_index(1)), entry)

        B.each(n, first)
        B.each(levels, level, start=1)
        return mins, maxs

    def query(self, lo: ir.Value, hi: ir.Value) -> tuple[ir.Value, ir.Value]:
        """min and max over data[lo : hi + 1] from the sparse tables (two overlapping spans of 2**level)."""
        mins, maxs = self.tables
        length = B.as_i64(B.add(B.sub(hi, lo), B.c_index(1)))
        lv = arith.SubIOp(B.c_int(63), mmath.CountLeadingZerosOp(length).result).result
        span = B.as_index(arith.ShLIOp(B.c_int(1), lv).result)
        lv, last = B.as_index(lv), B.add(B.sub(hi, span), B.c_index(1))
        return (arith.MinimumFOp(B.load(mins, lv, lo), B.load(mins, lv, last)).result,
                arith.MaximumFOp(B.load(maxs, lv, lo), B.load(maxs, lv, last)).result)


class NativeBounds:
    """The interval rules' namespace as scalar float64 code for one tile (see `ir.intervals.NumpyBounds`)."""

    minimum = _binary(arith.MinimumFOp)
    maximum = _binary(arith.MaximumFOp)
    floor = _unary(mmath.FloorOp)
    trunc = _unary(mmath.TruncOp)
    abs = _unary(mmath.AbsFOp)

    def __init__(self, data: dict[int, Data]):
        self.data = data

    @staticmethod
    def where(c: Any, a: Any, b: Any) -> Scalar:
        return Scalar(arith.SelectOp(lift(c), lift(a), lift(b)).result)

    @staticmethod
    def isfinite(x: Any) -> Scalar:
        return Scalar(mmath.AbsFOp(lift(x)).result) < float("inf")

    def mod(self, x: Any, c: Any) -> Scalar:
        """NumPy's floored mod: C's fmod, moved by c where its sign differs from c's."""
        x, c = Scalar(lift(x)), Scalar(lift(c))
        r = Scalar(arith.RemFOp(x.v, c.v).result)
        return self.where(((r < 0) & (c > 0)) | ((r > 0) & (c < 0)), r + c, r)

    def finite_product(self, x: Any, y: Any) -> Scalar:
        """x * y, NaN (0 * inf) as 0 and ±inf as ±the largest float64, as np.nan_to_num does."""
        p = Scalar(lift(x)) * y
        p = self.where(Scalar(arith.CmpFOp(14, p.v, p.v).result), 0.0, p)  # uno: p is NaN
        big = float(np.finfo(np.float64).max)
        return self.where(p == float("inf"), big, self.where(p == float("-inf"), -big, p))

    def gather(self, x: Value, result: TensorType, indices: list[Interval]) -> Interval:
        """x's min and max over the box of the indices' bounds (clipped to x's shape), or over all of x where a
        bound is not finite; the type's full range for data the kernel does not have, or that is empty."""
        d = self.data.get(id(x))
        if d is None or len(indices) != d.rank:
            return full_range(result)
        full = [lift(b) for b in (full_range(result).lo, full_range(result).hi)]
        finite = self.isfinite(indices[0].lo) & self.isfinite(indices[0].hi)
        for i in indices[1:]:
            finite = finite & self.isfinite(i.lo) & self.isfinite(i.hi)
        pick = B.if_(d.empty, [f64(), f64()], True)
        with ir.InsertionPoint(pick.then_block):
            scf.YieldOp(full)
        with ir.InsertionPoint(pick.else_block):
            los, his = [], []
            for i, n in zip(indices, d.sizes, strict=True):
                top = Scalar(arith.SIToFPOp(f64(), B.as_i64(B.sub(n, B.c_index(1)))).result)
                ends = [self.minimum(self.maximum(self.where(finite, e, 0.0), 0.0), top) for e in (i.lo, i.hi)]
                lo, hi = (B.as_index(arith.FPToSIOp(ir.IntegerType.get_signless(64), e.v).result) for e in ends)
                los.append(lo)
                his.append(arith.MaxSIOp(hi, lo).result)
            lo, hi = d.query(los[0], his[0]) if d.rank == 1 else d.box(los, his)
            scf.YieldOp([self.where(finite, Scalar(x), Scalar(whole)).v for x, whole in ((lo, d.lo), (hi, d.hi))])
        return Interval(Scalar(pick.results[0]), Scalar(pick.results[1]))

    @staticmethod
    def result(out: Interval) -> Interval:
        return Interval(Scalar(lift(out.lo)), Scalar(lift(out.hi)))


@KERNELS.lowers(BlockMapOp)
def block_map_kernel(cx: KernelContext, op: Operation) -> Kernel | None:
    """Per call, for a mask that reads data: the kernel reads that data and (sq, sk), and writes the
    [batch, heads, query blocks, key blocks] map; every other block map is the host's, once per set of shapes, and
    so is one only attention that runs as decode reads (its kernels test each score: the native host never makes
    it)."""
    if op.per_shape() or all(isinstance(u.op, AT.AttentionOp) and decodes(cx, u.op) for u in op.result.uses):
        return None
    data = outer_values(op.mask)
    name, entry = cx.function(op, [v.type for v in data] + [LENGTHS, op.result.type], False)
    *mems, lengths, out = entry.arguments
    bq, bk = op.block_q, op.block_k
    with ir.InsertionPoint(entry):
        handles = {id(v): Data(m, v.type.dtype) for v, m in zip(data, mems, strict=True)}
        last = [arith.SIToFPOp(f64(), arith.SubIOp(B.load(lengths, i), B.c_int(1)).result).result for i in (0, 1)]
        n = NativeBounds(handles)
        with B.nest(B.sizes_of(out)) as (b, h, i, j):
            def span(blk: ir.Value, size: int, top: ir.Value) -> Interval:
                lo = arith.SIToFPOp(f64(), B.as_i64(B.mul(blk, B.c_index(size)))).result
                return Interval(Scalar(lo), n.minimum(Scalar(lo) + float(size - 1), Scalar(top)))

            whole = [arith.SIToFPOp(f64(), B.as_i64(x)).result for x in (b, h)]
            args = [Interval(Scalar(x), Scalar(x)) for x in whole] + [span(i, bq, last[0]), span(j, bk, last[1])]
            res = evaluate_intervals(op.mask, args, n)
            kind = B.select((res.lo >= 1).v, B.c_int(FULL, 8),
                            B.select((res.hi <= 0).v, B.c_int(EMPTY, 8), B.c_int(PARTIAL, 8)))
            B.store(kind, out, b, h, i, j)
        func.ReturnOp([])
    return Kernel(name, op, data, [op.result])


def _lengths(op: Operation, ctx: Any) -> np.ndarray:
    return np.array([ctx.dim(op.sq), ctx.dim(op.sk)], np.int64)


@LAUNCHES.lowers(BlockMapOp)
def launch_block_map(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """The map, classified by the kernel from the data and the call's lengths."""
    (shape,) = k.op.result_shapes(host, [])
    out = np.empty(shape, np.int8)
    fn.call(k, ins + [_lengths(k.op, host), out])
    return [out]


@HOSTED.lowers(BlockMapOp)
def hosted_block_map(cx: KernelContext, op: Operation, k: Kernel | None) -> Hosted:
    """The mask's lengths made once per set of shapes, passed after the data; no map where only decode reads it."""
    if k is None:
        return Hosted(virtual=True)
    lengths = Scratch(LENGTHS, lambda known, ctx: (2,), "mask_lengths", lambda known, ctx: _lengths(op, ctx))
    return Hosted(args=[*k.inputs, lengths, op.result])
