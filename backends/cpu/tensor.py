"""cpu lowerings of the `tensor` dialect's elementwise part: one scalar rule per op class (arith and math on
one element), from which the context builds both the tiled `linalg.generic` of a kernel and the scalar form
inlined into mask, score and scan regions; splat constants and iota.

A new elementwise op needs its rule here (`@SCALARS.lowers(T.NewOp)`) and nothing else in this backend.
"""

from __future__ import annotations

import math

from torch_mlir import ir
from torch_mlir.dialects import arith, linalg, tensor
from torch_mlir.dialects import math as mmath

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.context import (
    KERNELS,
    LOWERINGS,
    PARALLEL,
    SCALARS,
    CpuLoweringError,
    KernelContext,
    element_type,
    scalar_constant,
    tensor_type,
)
from sparsa.backends.cpu.signature import Kernel
from sparsa.ir.core import Operation
from sparsa.ir.dialects import tensor as T
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import is_float

V = ir.Value


@LOWERINGS.lowers(Elementwise)
def lower_elementwise(cx: KernelContext, op: Operation) -> V:
    """Any elementwise op: its scalar rule, over the broadcast result (or on scalars in scalar mode)."""
    rule = SCALARS.find(op)
    if rule is None:
        raise CpuLoweringError(f"'{op.NAME}' has no scalar rule in the cpu backend", op.loc)
    return cx.elementwise(op, lambda *xs: rule(op, *xs))


def _float(op: Operation) -> bool:
    return is_float(op.results[0].type.dtype)


def _const(op: Operation, value: float) -> V:
    return scalar_constant(element_type(op.results[0].type.dtype), value)


def _sigmoid(x: V) -> V:
    one = B.c_float(1.0, x.type)
    return arith.DivFOp(one, arith.AddFOp(one, B.exp(arith.NegFOp(x).result)).result).result


# ---- unary ----------------------------------------------------------------------------------------------
@SCALARS.lowers(T.ExpOp)
def _exp(op: Operation, x: V) -> V:
    return B.exp(x)


def _math(fn: type):
    """A rule that is one `math` dialect op."""

    def rule(op: Operation, x: V) -> V:
        return fn(x).result

    return rule


for _cls, _fn in [(T.LogOp, mmath.LogOp), (T.SqrtOp, mmath.SqrtOp), (T.RsqrtOp, mmath.RsqrtOp),
                  (T.TanhOp, mmath.TanhOp), (T.SinOp, mmath.SinOp), (T.CosOp, mmath.CosOp)]:
    SCALARS.lowers(_cls)(_math(_fn))


@SCALARS.lowers(T.NegOp)
def _neg(op: Operation, x: V) -> V:
    return arith.NegFOp(x).result if _float(op) else arith.SubIOp(_const(op, 0), x).result


@SCALARS.lowers(T.AbsOp)
def _abs(op: Operation, x: V) -> V:
    return mmath.AbsFOp(x).result if _float(op) else mmath.AbsIOp(x).result


@SCALARS.lowers(T.ReluOp)
def _relu(op: Operation, x: V) -> V:
    return arith.MaximumFOp(x, _const(op, 0)).result if _float(op) else arith.MaxSIOp(x, _const(op, 0)).result


@SCALARS.lowers(T.SigmoidOp)
def _sigmoid_rule(op: Operation, x: V) -> V:
    return _sigmoid(x)


@SCALARS.lowers(T.SiluOp)
def _silu(op: Operation, x: V) -> V:
    return arith.MulFOp(x, _sigmoid(x)).result


@SCALARS.lowers(T.SoftplusOp)
def _softplus(op: Operation, x: V) -> V:
    """max(x, 0) + log1p(exp(-|x|)): no overflow."""
    tail = mmath.Log1pOp(B.exp(arith.NegFOp(mmath.AbsFOp(x).result).result)).result
    return arith.AddFOp(arith.MaximumFOp(x, _const(op, 0)).result, tail).result


@SCALARS.lowers(T.GeluOp)
def _gelu(op: Operation, x: V) -> V:
    """x * Phi(x) with the error function."""
    et = x.type
    phi = B.erf(arith.MulFOp(x, B.c_float(math.sqrt(0.5), et)).result, et)
    half_x = arith.MulFOp(x, B.c_float(0.5, et)).result
    return arith.MulFOp(half_x, arith.AddFOp(B.c_float(1.0, et), phi).result).result


@SCALARS.lowers(T.GeluTanhOp)
def _gelu_tanh(op: Operation, x: V) -> V:
    et = x.type
    cube = arith.MulFOp(arith.MulFOp(x, x).result, x).result
    inner = arith.AddFOp(x, arith.MulFOp(cube, B.c_float(0.044715, et)).result).result
    th = mmath.TanhOp(arith.MulFOp(inner, B.c_float(math.sqrt(2.0 / math.pi), et)).result).result
    half_x = arith.MulFOp(x, B.c_float(0.5, et)).result
    return arith.MulFOp(half_x, arith.AddFOp(B.c_float(1.0, et), th).result).result


@SCALARS.lowers(T.NotOp)
def _not(op: Operation, x: V) -> V:
    return arith.XOrIOp(x, B.c_int(1, 1)).result


@SCALARS.lowers(T.CastOp)
def _cast(op: Operation, x: V) -> V:
    src, dst = op.x.type.dtype, op.to
    et = element_type(dst)
    if dst == "i1":  # nonzero is true (NaN too, as in NumPy)
        zero = scalar_constant(element_type(src), 0)
        return arith.CmpFOp(13, x, zero).result if is_float(src) else arith.CmpIOp(1, x, zero).result  # une, ne
    if src == dst:
        return x
    if is_float(src) and is_float(dst):
        wider = ir.FloatType(et).width > ir.FloatType(element_type(src)).width
        return (arith.ExtFOp if wider else arith.TruncFOp)(et, x).result
    if is_float(dst):
        return (arith.UIToFPOp if src == "i1" else arith.SIToFPOp)(et, x).result
    if is_float(src):
        return arith.FPToSIOp(et, x).result
    w_src, w_dst = ir.IntegerType(element_type(src)).width, ir.IntegerType(et).width
    if w_src == w_dst:
        return x
    ext = arith.ExtUIOp if src == "i1" else arith.ExtSIOp
    return (ext if w_dst > w_src else arith.TruncIOp)(et, x).result


# ---- binary ---------------------------------------------------------------------------------------------
def _binary(floats: type | None, ints: type | None):
    """A rule from one arith op for floats and one for integers (None: that kind has no rule)."""

    def rule(op: Operation, a: V, b: V) -> V:
        which = floats if _float(op) else ints
        if which is None:
            raise CpuLoweringError(f"'{op.NAME}' on {op.result.type.dtype} is not supported by the cpu backend",
                                   op.loc)
        return which(a, b).result

    return rule


for _cls, _f, _i in [(T.AddOp, arith.AddFOp, arith.AddIOp), (T.SubOp, arith.SubFOp, arith.SubIOp),
                     (T.MulOp, arith.MulFOp, arith.MulIOp), (T.DivOp, arith.DivFOp, None),
                     (T.MaximumOp, arith.MaximumFOp, arith.MaxSIOp), (T.MinimumOp, arith.MinimumFOp, arith.MinSIOp),
                     (T.PowOp, mmath.PowFOp, None), (T.AndOp, None, arith.AndIOp), (T.OrOp, None, arith.OrIOp)]:
    SCALARS.lowers(_cls)(_binary(_f, _i))


@SCALARS.lowers(T.FloorDivOp)
def _floordiv(op: Operation, a: V, b: V) -> V:
    if _float(op):
        return mmath.FloorOp(arith.DivFOp(a, b).result).result
    return arith.FloorDivSIOp(a, b).result


@SCALARS.lowers(T.ModOp)
def _mod(op: Operation, a: V, b: V) -> V:
    """Python's sign convention: the result has the divisor's sign."""
    if _float(op):
        return arith.SubFOp(a, arith.MulFOp(mmath.FloorOp(arith.DivFOp(a, b).result).result, b).result).result
    return arith.SubIOp(a, arith.MulIOp(arith.FloorDivSIOp(a, b).result, b).result).result


@SCALARS.lowers(T.CmpOp)
def _cmp(op: Operation, a: V, b: V) -> V:
    if is_float(op.lhs.type.dtype):
        pred = {"eq": 1, "gt": 2, "ge": 3, "lt": 4, "le": 5, "ne": 6}[op.pred]  # ordered predicates
        return arith.CmpFOp(pred, a, b).result
    pred = {"eq": 0, "ne": 1, "lt": 2, "le": 3, "gt": 4, "ge": 5}[op.pred]  # signed predicates
    return arith.CmpIOp(pred, a, b).result


@SCALARS.lowers(T.WhereOp)
def _where(op: Operation, c: V, a: V, b: V) -> V:
    return arith.SelectOp(c, a, b).result


# ---- constants and iota -----------------------------------------------------------------------------------
@LOWERINGS.lowers(T.ConstantOp)
def lower_constant(cx: KernelContext, op: Operation) -> V:
    t = op.result.type
    scalar = scalar_constant(element_type(t.dtype), op.value)
    if cx.scalar_mode:
        return scalar
    if t.rank == 0:
        return tensor.FromElementsOp(tensor_type(t), [scalar]).result
    if not t.is_static():
        raise CpuLoweringError("a constant of symbolic shape inside a kernel is not supported by the cpu backend",
                               op.loc)
    return linalg.fill(scalar, outs=[tensor.EmptyOp(list(t.shape), element_type(t.dtype)).result])


@KERNELS.lowers(T.ConstantOp)
def constant_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """A splat of any (symbolic) shape."""
    t = op.result.type

    def build(out: V) -> None:
        v = scalar_constant(element_type(t.dtype), op.value)
        B.memref_generic([], out, [ir.AffineDimExpr.get(i) for i in range(t.rank)], [PARALLEL] * t.rank, lambda _: v)

    return cx.plain(op, [], build)


@KERNELS.lowers(T.IotaOp)
def iota_kernel(cx: KernelContext, op: Operation) -> Kernel:
    et = element_type(op.result.type.dtype)

    def build(out: V) -> None:
        B.memref_generic([], out, [ir.AffineDimExpr.get(0)], [PARALLEL],
                         lambda _: arith.IndexCastOp(et, linalg.IndexOp(0).result).result)

    return cx.plain(op, [], build)
