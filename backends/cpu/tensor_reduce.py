"""cpu lowerings of the `tensor` dialect's reductions: reductions over any axes, logsumexp, softmax and the
norms as `linalg` on tensors (their rows tiled by the schedule); cumsum as a loop over its axis; argmax and
top-k as scalar search loops (NumPy's order: NaN after every number, ties to the lower index)."""

from __future__ import annotations

from typing import Any

from torch_mlir import ir
from torch_mlir.dialects import arith, scf
from torch_mlir.dialects import math as mmath

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.build import exp
from sparsa.backends.cpu.context import (
    KERNELS,
    LOWERINGS,
    PARALLEL,
    REDUCTION,
    CpuLoweringError,
    KernelContext,
    element_type,
)
from sparsa.backends.cpu.signature import Kernel
from sparsa.backends.cpu.tensor_shape import drop_axes
from sparsa.ir.core import Operation
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.types import TensorType, is_float


def _dims(rank: int) -> list[ir.AffineExpr]:
    return [ir.AffineDimExpr.get(i) for i in range(rank)]


class Ordering:
    """Comparisons of one element type under NumPy's sort order: NaN after every number (the smallest
    in a descending search), ties broken by the lower index by the callers."""

    def __init__(self, dtype: str):
        self.float = is_float(dtype)

    def _nan(self, v: ir.Value) -> ir.Value:
        return arith.CmpFOp(14, v, v).result  # uno

    def greater(self, a: ir.Value, b: ir.Value) -> ir.Value:
        if not self.float:
            return B.cmpi("gt", a, b)
        ordered = arith.CmpFOp(2, a, b).result  # ogt
        return arith.OrIOp(ordered, arith.AndIOp(self._nan(b), arith.XOrIOp(self._nan(a), B.c_int(1, 1)).result)
                           .result).result

    def equal(self, a: ir.Value, b: ir.Value) -> ir.Value:
        if not self.float:
            return B.cmpi("eq", a, b)
        return arith.OrIOp(arith.CmpFOp(1, a, b).result, arith.AndIOp(self._nan(a), self._nan(b)).result).result


def reduce(cx: KernelContext, x: ir.Value, t: TensorType, axes: set[int], keepdim: bool, out: TensorType,
           start: float | int, combine: Any) -> ir.Value:
    d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
    out_exprs = [ir.AffineConstantExpr.get(0) if i in axes else d[i] for i in range(t.rank)] if keepdim else [
        d[i] for i in range(t.rank) if i not in axes]
    kept = [i for i in range(t.rank) if i not in axes]
    sources = [(x, i) for i in (range(t.rank) if keepdim else kept)]
    init = cx.zero_filled(out, sources, start)
    kinds = [REDUCTION if i in axes else PARALLEL for i in range(t.rank)]
    result = cx.generic(out, [(x, d)], init, kinds, out_exprs, lambda v, acc: combine(v, acc))
    if out.rank:
        dims = tuple(-1 if i in axes else i for i in range(t.rank)) if keepdim else tuple(kept)
        cx.tag(result, "reduction", t, dims)
    return result


@LOWERINGS.lowers(R.ReduceOp)
def lower_reduce(cx: KernelContext, op: Operation) -> ir.Value:
    t = op.x.type
    axes = {a % t.rank for a in op.axes}
    x = cx.get(op.x)
    kind = type(op)
    fl = is_float(t.dtype)
    if kind is R.SumOp:
        add = arith.AddFOp if fl else arith.AddIOp
        return reduce(cx, x, t, axes, op.keepdim, op.result.type, 0.0 if fl else 0, lambda v, a: add(a, v).result)
    if kind is R.MeanOp:
        total = reduce(cx, x, t, axes, op.keepdim, op.result.type, 0.0, lambda v, a: arith.AddFOp(a, v).result)
        et = element_type(t.dtype)
        count = arith.ConstantOp(et, ir.FloatAttr.get(et, 1.0)).result
        for a in sorted(axes):  # the number of elements averaged, read at run time for symbolic dims
            n = t.shape[a]
            size = arith.ConstantOp(et, ir.FloatAttr.get(et, float(n))).result if isinstance(n, int) else \
                arith.SIToFPOp(et, arith.IndexCastOp(ir.IntegerType.get_signless(64), cx.dim(x, a)).result).result
            count = arith.MulFOp(count, size).result
        inv = arith.DivFOp(arith.ConstantOp(et, ir.FloatAttr.get(et, 1.0)).result, count).result
        return map(cx, total, op.result.type, lambda v: arith.MulFOp(v, inv).result)
    if kind in (R.MaxOp, R.MinOp):
        if fl:
            start = float("-inf") if kind is R.MaxOp else float("inf")
            pick = arith.MaximumFOp if kind is R.MaxOp else arith.MinimumFOp
        else:
            bits = ir.IntegerType(element_type(t.dtype)).width
            start = -(1 << (bits - 1)) if kind is R.MaxOp else (1 << (bits - 1)) - 1
            pick = arith.MaxSIOp if kind is R.MaxOp else arith.MinSIOp
        return reduce(cx, x, t, axes, op.keepdim, op.result.type, start, lambda v, a: pick(a, v).result)
    if kind is R.LogSumExpOp:
        return logsumexp(cx, x, t, axes, op.keepdim, op.result.type)
    raise CpuLoweringError(f"'{op.NAME}' is not supported by the cpu backend yet", op.loc)


def map(cx: KernelContext, x: ir.Value, t: TensorType, fn: Any) -> ir.Value:
    """fn applied to every element of x (of type t)."""
    d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
    init = cx.empty_like_dims(t, [(x, i) for i in range(t.rank)])
    return cx.generic(t, [(x, d)], init, [PARALLEL] * t.rank, d, lambda v, _: fn(v))


def logsumexp(cx: KernelContext, x: ir.Value, t: TensorType, axes: set[int], keepdim: bool,
              out: TensorType) -> ir.Value:
    """log(sum(exp(x - m))) + m with m the max (0 where the max is not finite, as the reference)."""
    et = element_type(t.dtype)
    kept = TensorType(t.dtype, tuple(1 if i in axes else s for i, s in enumerate(t.shape)))
    m = reduce(cx, x, t, axes, True, kept, float("-inf"), lambda v, a: arith.MaximumFOp(a, v).result)

    def finite(v: ir.Value) -> ir.Value:
        inf = B.c_float(float("inf"), et)
        return arith.SelectOp(arith.CmpFOp(4, mmath.AbsFOp(v).result, inf).result, v, B.c_float(0.0, et)).result

    m = map(cx, m, kept, finite)
    d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
    bcast = [ir.AffineConstantExpr.get(0) if i in axes else d[i] for i in range(t.rank)]
    init = cx.empty_like_dims(t, [(x, i) for i in range(t.rank)])
    e = cx.generic(t, [(x, d), (m, bcast)], init, [PARALLEL] * t.rank, d,
                     lambda v, mx, _: exp(arith.SubFOp(v, mx).result))
    s = reduce(cx, e, t, axes, True, kept, 0.0, lambda v, a: arith.AddFOp(a, v).result)
    init = cx.empty_like_dims(kept, [(s, i) for i in range(t.rank)])
    dk = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
    result = cx.generic(kept, [(s, dk), (m, dk)], init, [PARALLEL] * t.rank, dk,
                          lambda v, mx, _: arith.AddFOp(mmath.LogOp(v).result, mx).result)
    return result if keepdim else drop_axes(cx, result, kept, axes, out)


@LOWERINGS.lowers(R.SoftmaxOp)
def lower_softmax(cx: KernelContext, op: Operation) -> ir.Value:
    t = op.x.type
    axis = op.axis % t.rank
    x = cx.get(op.x)
    kept = TensorType(t.dtype, tuple(1 if i == axis else d for i, d in enumerate(t.shape)))
    m = reduce(cx, x, t, {axis}, True, kept, float("-inf"), lambda v, a: arith.MaximumFOp(a, v).result)
    d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
    bcast = [ir.AffineConstantExpr.get(0) if i == axis else d[i] for i in range(t.rank)]
    init = cx.empty_like_dims(t, [(x, i) for i in range(t.rank)])
    e = cx.generic(t, [(x, d), (m, bcast)], init, [PARALLEL] * t.rank, d,
                     lambda v, mx, _: exp(arith.SubFOp(v, mx).result))
    s = reduce(cx, e, t, {axis}, True, kept, 0.0, lambda v, a: arith.AddFOp(a, v).result)
    init = cx.empty_like_dims(t, [(x, i) for i in range(t.rank)])
    return cx.generic(t, [(e, d), (s, bcast)], init, [PARALLEL] * t.rank, d,
                        lambda v, total, _: arith.DivFOp(v, total).result)


def row_count(cx: KernelContext, x: ir.Value, t: TensorType) -> ir.Value:
    """The size of the last axis as a float (read at run time when symbolic)."""
    et = element_type(t.dtype)
    n = t.shape[-1]
    if isinstance(n, int):
        return arith.ConstantOp(et, ir.FloatAttr.get(et, float(n))).result
    return arith.SIToFPOp(et, arith.IndexCastOp(ir.IntegerType.get_signless(64), cx.dim(x, t.rank - 1))
                          .result).result


@LOWERINGS.lowers(R.RmsNormOp)
def lower_rms_norm(cx: KernelContext, op: Operation) -> ir.Value:
    t = op.x.type
    x, w = cx.get(op.x), cx.get(op.weight)
    et = element_type(t.dtype)
    kept = TensorType(t.dtype, t.shape[:-1] + (1,))
    ss = reduce(cx, x, t, {t.rank - 1}, True, kept, 0.0,
                     lambda v, a: arith.AddFOp(a, arith.MulFOp(v, v).result).result)
    n = row_count(cx, x, t)
    eps = arith.ConstantOp(et, ir.FloatAttr.get(et, float(op.eps))).result
    d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
    init = cx.empty_like_dims(t, [(x, i) for i in range(t.rank)])

    def body(v: ir.Value, s: ir.Value, g: ir.Value, _: ir.Value) -> ir.Value:
        r = mmath.RsqrtOp(arith.AddFOp(arith.DivFOp(s, n).result, eps).result).result
        return arith.MulFOp(arith.MulFOp(v, r).result, g).result

    result = cx.generic(t, [(x, d), (ss, d[:-1] + [ir.AffineConstantExpr.get(0)]), (w, d[-1:])], init,
                          [PARALLEL] * t.rank, d, body)
    cx.tag(result, "elementwise", t)
    return result


@LOWERINGS.lowers(R.LayerNormOp)
def lower_layer_norm(cx: KernelContext, op: Operation) -> ir.Value:
    t = op.x.type
    x, w, b = cx.get(op.x), cx.get(op.weight), cx.get(op.bias)
    et = element_type(t.dtype)
    kept = TensorType(t.dtype, t.shape[:-1] + (1,))
    n = row_count(cx, x, t)
    d = [ir.AffineDimExpr.get(i) for i in range(t.rank)]
    row = d[:-1] + [ir.AffineConstantExpr.get(0)]
    total = reduce(cx, x, t, {t.rank - 1}, True, kept, 0.0, lambda v, a: arith.AddFOp(a, v).result)
    init = cx.empty_like_dims(t, [(x, i) for i in range(t.rank)])
    centered = cx.generic(t, [(x, d), (total, row)], init, [PARALLEL] * t.rank, d,
                            lambda v, s, _: arith.SubFOp(v, arith.DivFOp(s, n).result).result)
    cx.tag(centered, "elementwise", t)
    ss = reduce(cx, centered, t, {t.rank - 1}, True, kept, 0.0,
                     lambda v, a: arith.AddFOp(a, arith.MulFOp(v, v).result).result)
    eps = arith.ConstantOp(et, ir.FloatAttr.get(et, float(op.eps))).result
    init = cx.empty_like_dims(t, [(x, i) for i in range(t.rank)])

    def body(c: ir.Value, s: ir.Value, g: ir.Value, beta: ir.Value, _: ir.Value) -> ir.Value:
        r = mmath.RsqrtOp(arith.AddFOp(arith.DivFOp(s, n).result, eps).result).result
        return arith.AddFOp(arith.MulFOp(arith.MulFOp(c, r).result, g).result, beta).result

    result = cx.generic(t, [(centered, d), (ss, row), (w, d[-1:]), (b, d[-1:])], init, [PARALLEL] * t.rank,
                          d, body)
    cx.tag(result, "elementwise", t)
    return result


@KERNELS.lowers(R.CumsumOp)
def cumsum_kernel(cx: KernelContext, op: Operation) -> Kernel:
    axis = op.axis % op.x.type.rank
    add = arith.AddFOp if is_float(op.x.type.dtype) else arith.AddIOp

    def build(x: ir.Value, out: ir.Value) -> None:
        cx.recurrence(out, axis, [(x, op.x.type)], None, 0, lambda v, h: add(h, v).result)

    return cx.plain(op, [op.x], build)


# ---- searches ----------------------------------------------------------------------------------------
@KERNELS.lowers(R.ArgmaxOp)
def argmax_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """The first index of the largest value along the axis (a NaN counts as the largest, as NumPy)."""
    t = op.x.type
    axis = op.axis % t.rank
    order = Ordering(t.dtype)

    def build(x: ir.Value, out: ir.Value) -> None:
        sizes = B.sizes_of(x)
        kept = [i for i in range(t.rank) if i != axis]
        with B.nest([sizes[i] for i in kept]) as ivs:
            at = dict(zip(kept, ivs, strict=True))
            first = B.load(x, *[at.get(i, 0) for i in range(t.rank)])
            search = B.loop(1, sizes[axis], 1, [first, B.c_index(0)])
            with ir.InsertionPoint(search.body):
                j = search.induction_variable
                best, where = search.inner_iter_args
                v = B.load(x, *[at.get(i, j) for i in range(t.rank)])
                # NaN first: NumPy's argmax returns the first NaN
                take = order.greater(v, best) if not order.float else arith.AndIOp(
                    arith.XOrIOp(arith.CmpFOp(14, best, best).result, B.c_int(1, 1)).result,
                    arith.CmpFOp(9, v, best).result).result  # best is not NaN, and v > best or v is NaN
                scf.YieldOp([B.select(take, v, best), B.select(take, j, where)])
            index = [at[i] if i != axis else 0 for i in range(t.rank)] if op.keepdim else ivs
            B.store(B.as_i64(search.results[1]), out, *index)

    return cx.plain(op, [op.x], build)


@KERNELS.lowers(R.TopkOp)
def topk_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """One pass over each row keeping its best k so far, sorted, in the output row: an element that beats
    the k-th (or fills a free place) is bubbled in from the top, each place it passes shifting down
    one. Strictly greater wins, so ties keep the lower index first and NaNs come last: NumPy's stable
    descending sort. Few elements beat the k-th of a random row, so most cost one compare. Rows (dim 0
    and the dims after it but the last) are split over threads."""
    t = op.x.type
    order = Ordering(t.dtype)

    def build(x: ir.Value, values: ir.Value, indices: ir.Value, part: ir.Value, parts: ir.Value) -> None:
        sizes = B.sizes_of(x)
        n = sizes[-1]
        lead = B.loop(*B.share(part, parts, sizes[0] if t.rank > 1 else 1))
        with ir.InsertionPoint(lead.body):
            with B.nest(sizes[1:-1]) as inner:
                ivs = [lead.induction_variable] + inner if t.rank > 1 else []
                topk_row(cx, order, x, values, indices, ivs, n, op.k)
            scf.YieldOp([])

    return cx.plain(op, [op.x], build, parts=True)


def topk_row(cx: KernelContext, order: Ordering, x: ir.Value, values: ir.Value, indices: ir.Value, ivs: list, n: B.Size,
             top: int) -> None:
    """The row at `ivs`: its `top` best (value, index) pairs into values and indices, in order."""
    if top == 0:
        return
    k = B.c_index(top)
    scan = B.loop(0, n, 1, [B.c_index(0)])
    with ir.InsertionPoint(scan.body):
        j, count = scan.induction_variable, scan.inner_iter_args[0]
        v = B.load(x, *ivs, j)
        room = B.cmpi("lt", count, k)
        worth = arith.OrIOp(room, order.greater(v, B.load(values, *ivs, B.minsi(count, B.c_index(top - 1))))
                            ).result
        enter = B.if_(worth)
        with ir.InsertionPoint(enter.then_block):
            bubble_in(order, values, indices, ivs, v, B.as_i64(j), count, top)
            scf.YieldOp([])
        scf.YieldOp([B.select(room, B.add(count, B.c_index(1)), count)])


def bubble_in(order: Ordering, values: ir.Value, indices: ir.Value, ivs: list, v: ir.Value, j: ir.Value,
              count: ir.Value, k: int) -> None:
    """Place (v, j) among the row's first `count` sorted entries: from the top, the first place it beats
    (or the first free one) takes it, and every place after takes what the one before held."""
    walk = B.loop(0, k, 1, [v, j, B.c_int(0, 1)])
    with ir.InsertionPoint(walk.body):
        q = walk.induction_variable
        cv, ci, shifting = walk.inner_iter_args
        held_v, held_i = B.load(values, *ivs, q), B.load(indices, *ivs, q)
        take = arith.OrIOp(arith.OrIOp(shifting, B.cmpi("ge", q, count)).result,
                           order.greater(cv, held_v)).result
        B.store(B.select(take, cv, held_v), values, *ivs, q)
        B.store(B.select(take, ci, held_i), indices, *ivs, q)
        scf.YieldOp([B.select(take, held_v, cv), B.select(take, held_i, ci), take])
