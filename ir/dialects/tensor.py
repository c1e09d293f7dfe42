"""`tensor` dialect, elementwise part: constants, iota, casts, unary and binary maps, compare, where."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir import intervals as I
from sparsa.ir.core import Attr, Operand, Operation, Result
from sparsa.ir.dims import broadcast_shapes
from sparsa.ir.traits import Elementwise, Generator
from sparsa.ir.types import TensorType, is_float, is_int

_erf = np.vectorize(math.erf, otypes=[np.float64])


def broadcast_result(op: Operation, dtype: str, *types: TensorType) -> TensorType:
    """Broadcast shape of `types` with element type `dtype`, or a verify error naming both shapes."""
    try:
        return TensorType(dtype, broadcast_shapes(*(t.shape for t in types)))
    except ValueError as e:
        shapes = " and ".join(str(t) for t in types)
        raise op.error(f"operands {shapes} do not broadcast: {e}") from None


def same_dtype(op: Operation, *types: TensorType) -> str:
    """The common element type of `types`, or a verify error."""
    if len({t.dtype for t in types}) != 1:
        raise op.error(f"operands must have one element type, got {', '.join(t.dtype for t in types)}")
    return types[0].dtype


class ConstantOp(Generator, Operation):
    """A tensor of the result type with every element equal to `value` (a splat)."""

    NAME = "tensor.constant"
    value = Attr(A.SCALAR)
    result = Result()

    def verify(self) -> None:
        dt = self.result.type.dtype
        v = self.value
        if isinstance(v, bool) != (dt == "i1") or (isinstance(v, float) and not is_float(dt)):
            raise self.error(f"value {A.SCALAR.format(v)} does not fit element type {dt}")

    def reference(self, ctx: Any) -> np.ndarray:
        return np.full(ctx.shape_of(self.result.type), self.value)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        return I.Interval(float(self.value), float(self.value))


class IotaOp(Generator, Operation):
    """0, 1, ..., n-1 along the only axis of the result (n may be symbolic)."""

    NAME = "tensor.iota"
    result = Result()

    def verify(self) -> None:
        t = self.result.type
        if t.rank != 1 or not is_int(t.dtype):
            raise self.error(f"result must be a 1-D integer tensor, got {t}")

    def reference(self, ctx: Any) -> np.ndarray:
        return np.arange(ctx.shape_of(self.result.type)[0])


class CastOp(Elementwise, Operation):
    """Converts every element to element type `to` (floats to ints truncate toward zero)."""

    NAME = "tensor.cast"
    x = Operand()
    to = Attr(A.DTYPE)
    result = Result()

    def infer(self) -> list[TensorType]:
        return [self.x.type.with_dtype(self.to).without_layout()]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return x

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        (a,) = args
        if is_int(self.to) and not is_int(self.x.type.dtype):
            return I.Interval(n.trunc(a.lo), n.trunc(a.hi))
        return a if self.to != "i1" else None

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """A float cast passes the cotangent back in the source's type; nothing flows to or from integers."""
        (x,), (dy,) = xs, dys
        return [g.cast(dy, x.type.dtype) if is_float(x.type.dtype) and is_float(self.to) else None]


class UnaryOp(Elementwise, Operation):
    """Base of elementwise unary ops: `fn` is the NumPy semantics, `FLOAT_ONLY` limits the dtype."""

    FLOAT_ONLY: ClassVar[bool] = True
    x = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        return [self.x.type.without_layout()]

    def verify(self) -> None:
        dt = self.x.type.dtype
        if dt == "i1" or (self.FLOAT_ONLY and not is_float(dt)):
            raise self.error(f"needs a {'float' if self.FLOAT_ONLY else 'numeric'} operand, got {dt}")

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return self.fn(x)

    @staticmethod
    def fn(x: np.ndarray) -> np.ndarray:
        return x


class NegOp(UnaryOp):
    """-x, elementwise."""

    NAME = "tensor.neg"
    ATEN = ("neg.default",)
    FLOAT_ONLY = False
    fn = staticmethod(np.negative)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        (a,) = args
        return I.Interval(-a.hi, -a.lo)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """d(-x) = -dx."""
        dy = dys[0]
        return [g.neg(dy)]


class AbsOp(UnaryOp):
    """|x|, elementwise."""

    NAME = "tensor.abs"
    BUILTIN = "abs"
    ATEN = ("abs.default",)
    FLOAT_ONLY = False
    fn = staticmethod(np.abs)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        return I.absolute(n, *args)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """sign(x) dy, 0 at 0 (as PyTorch)."""
        x = xs[0]
        dy = dys[0]
        sign = g.where(g.cmp("gt", x, g.scalar(0.0, x.type.dtype)), g.scalar(1.0, x.type.dtype),
                       g.where(g.cmp("lt", x, g.scalar(0.0, x.type.dtype)), g.scalar(-1.0, x.type.dtype),
                               g.scalar(0.0, x.type.dtype)))
        return [g.mul(dy, sign)]


class ReluOp(UnaryOp):
    """max(x, 0), elementwise."""

    NAME = "tensor.relu"
    BUILTIN = "relu"
    ATEN = ("relu.default",)
    FLOAT_ONLY = False

    @staticmethod
    def fn(x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0).astype(x.dtype)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy where x > 0."""
        x = xs[0]
        dy = dys[0]
        return [g.mask(g.cmp("gt", x, g.scalar(0.0, x.type.dtype)), dy)]


class ExpOp(UnaryOp):
    """e**x, elementwise."""

    NAME = "tensor.exp"
    BUILTIN = "exp"
    ATEN = ("exp.default",)
    fn = staticmethod(np.exp)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """exp(x) dy."""
        y = ys[0]
        dy = dys[0]
        return [g.mul(dy, y)]


class LogOp(UnaryOp):
    """Natural logarithm, elementwise."""

    NAME = "tensor.log"
    BUILTIN = "log"
    ATEN = ("log.default",)
    fn = staticmethod(np.log)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy / x."""
        x = xs[0]
        dy = dys[0]
        return [g.div(dy, x)]


class SqrtOp(UnaryOp):
    """Square root, elementwise."""

    NAME = "tensor.sqrt"
    BUILTIN = "sqrt"
    ATEN = ("sqrt.default",)
    fn = staticmethod(np.sqrt)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy / (2 sqrt(x))."""
        y = ys[0]
        dy = dys[0]
        return [g.div(dy, g.scale(y, 2.0))]


class RsqrtOp(UnaryOp):
    """1 / sqrt(x), elementwise."""

    NAME = "tensor.rsqrt"
    BUILTIN = "rsqrt"
    ATEN = ("rsqrt.default",)

    @staticmethod
    def fn(x: np.ndarray) -> np.ndarray:
        return 1.0 / np.sqrt(x)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """-dy / (2 x^1.5)."""
        y = ys[0]
        dy = dys[0]
        return [g.mul(g.scale(dy, -0.5), g.mul(y, g.mul(y, y)))]


class TanhOp(UnaryOp):
    """Hyperbolic tangent, elementwise."""

    NAME = "tensor.tanh"
    BUILTIN = "tanh"
    ATEN = ("tanh.default",)
    fn = staticmethod(np.tanh)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """(1 - tanh(x)^2) dy."""
        y = ys[0]
        dy = dys[0]
        return [g.mul(dy, g.sub(g.scalar(1.0, y.type.dtype), g.mul(y, y)))]


class SinOp(UnaryOp):
    """Sine, elementwise."""

    NAME = "tensor.sin"
    BUILTIN = "sin"
    ATEN = ("sin.default",)
    fn = staticmethod(np.sin)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """cos(x) dy."""
        x = xs[0]
        dy = dys[0]
        return [g.mul(dy, g.emit("tensor.cos", x))]


class CosOp(UnaryOp):
    """Cosine, elementwise."""

    NAME = "tensor.cos"
    BUILTIN = "cos"
    ATEN = ("cos.default",)
    fn = staticmethod(np.cos)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """-sin(x) dy."""
        x = xs[0]
        dy = dys[0]
        return [g.neg(g.mul(dy, g.emit("tensor.sin", x)))]


class SigmoidOp(UnaryOp):
    """1 / (1 + exp(-x)), elementwise."""

    NAME = "tensor.sigmoid"
    BUILTIN = "sigmoid"
    ATEN = ("sigmoid.default",)

    @staticmethod
    def fn(x: np.ndarray) -> np.ndarray:
        return (0.5 * (1.0 + np.tanh(0.5 * x.astype(np.float64)))).astype(x.dtype)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """s (1 - s) dy."""
        y = ys[0]
        dy = dys[0]
        return [g.mul(dy, g.mul(y, g.sub(g.scalar(1.0, y.type.dtype), y)))]


class SiluOp(UnaryOp):
    """x * sigmoid(x), elementwise."""

    NAME = "tensor.silu"
    BUILTIN = "silu"
    ATEN = ("silu.default",)

    @staticmethod
    def fn(x: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        return (x64 * 0.5 * (1.0 + np.tanh(0.5 * x64))).astype(x.dtype)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """s (1 + x (1 - s)) dy, s = sigmoid(x)."""
        x = xs[0]
        dy = dys[0]
        s = g.emit("tensor.sigmoid", x)
        one = g.scalar(1.0, x.type.dtype)
        return [g.mul(dy, g.mul(s, g.add(one, g.mul(x, g.sub(one, s)))))]


class GeluOp(UnaryOp):
    """Exact GELU, x * Phi(x) with the error function (PyTorch's default)."""

    NAME = "tensor.gelu"
    BUILTIN = "gelu"

    @staticmethod
    def fn(x: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        return (0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))).astype(x.dtype)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """(Phi(x) + x phi(x)) dy."""
        x = xs[0]
        y = ys[0]
        dy = dys[0]
        dt = x.type.dtype
        zero = g.cmp("eq", x, g.scalar(0.0, dt))
        cdf = g.where(zero, g.scalar(0.5, dt), g.div(y, g.where(zero, g.scalar(1.0, dt), x)))  # Phi(x) = gelu(x) / x
        pdf = g.scale(g.emit("tensor.exp", g.scale(g.mul(x, x), -0.5)), 0.3989422804014327)
        return [g.mul(dy, g.add(cdf, g.mul(x, pdf)))]


class GeluTanhOp(UnaryOp):
    """GELU with the tanh approximation (PyTorch's approximate='tanh')."""

    NAME = "tensor.gelu_tanh"
    BUILTIN = "gelu_tanh"

    @staticmethod
    def fn(x: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        inner = math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64**3)
        return (0.5 * x64 * (1.0 + np.tanh(inner))).astype(x.dtype)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """The tanh approximation's own derivative."""
        x = xs[0]
        dy = dys[0]
        dt = x.type.dtype
        c = 0.7978845608028654  # sqrt(2 / pi)
        t = g.emit("tensor.tanh", g.scale(g.add(x, g.scale(g.mul(x, g.mul(x, x)), 0.044715)), c))
        one = g.scalar(1.0, dt)
        du = g.scale(g.add(one, g.scale(g.mul(x, x), 3 * 0.044715)), c)
        d = g.add(g.scale(g.add(one, t), 0.5), g.mul(g.scale(x, 0.5), g.mul(g.sub(one, g.mul(t, t)), du)))
        return [g.mul(dy, d)]


class SoftplusOp(UnaryOp):
    """log(1 + exp(x)), elementwise, computed without overflow."""

    NAME = "tensor.softplus"
    BUILTIN = "softplus"

    @staticmethod
    def fn(x: np.ndarray) -> np.ndarray:
        return np.logaddexp(np.zeros_like(x), x)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """sigmoid(x) dy."""
        x = xs[0]
        dy = dys[0]
        return [g.mul(dy, g.emit("tensor.sigmoid", x))]


class NotOp(Elementwise, Operation):
    """Logical not of a boolean tensor."""

    NAME = "tensor.not"
    ATEN = ("logical_not.default", "bitwise_not.default")
    x = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        if self.x.type.dtype != "i1":
            raise self.error(f"needs a boolean (i1) operand, got {self.x.type.dtype}")
        return [self.x.type]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return np.logical_not(x)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        (a,) = args
        return I.Interval(1.0 - a.hi, 1.0 - a.lo)


class BinaryOp(Elementwise, Operation):
    """Base of broadcasting binary ops on operands of one element type."""

    ALLOWED: ClassVar[str] = "numeric"  # "numeric" | "float" | "int" | "bool"
    lhs = Operand()
    rhs = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        dt = same_dtype(self, self.lhs.type, self.rhs.type)
        ok = {"numeric": dt != "i1", "float": is_float(dt), "int": is_int(dt), "bool": dt == "i1"}
        if not ok[self.ALLOWED]:
            raise self.error(f"needs {self.ALLOWED} operands, got {dt}")
        return [broadcast_result(self, self.result_dtype(dt), self.lhs.type, self.rhs.type)]

    def result_dtype(self, dtype: str) -> str:
        return dtype

    def reference(self, ctx: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.fn(a, b)

    @staticmethod
    def fn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a


class AddOp(BinaryOp):
    """a + b with broadcasting."""

    NAME = "tensor.add"
    ATEN = ("add.Tensor", "add.Scalar")
    fn = staticmethod(np.add)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        a, b = args
        return I.Interval(a.lo + b.lo, a.hi + b.hi)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy to both, summed over broadcast dims."""
        a = xs[0]
        b = xs[1]
        dy = dys[0]
        return [g.unbroadcast(dy, a.type), g.unbroadcast(dy, b.type)]


class SubOp(BinaryOp):
    """a - b with broadcasting."""

    NAME = "tensor.sub"
    ATEN = ("sub.Tensor", "sub.Scalar")
    fn = staticmethod(np.subtract)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        a, b = args
        return I.Interval(a.lo - b.hi, a.hi - b.lo)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy and -dy."""
        a = xs[0]
        b = xs[1]
        dy = dys[0]
        return [g.unbroadcast(dy, a.type), g.unbroadcast(g.neg(dy), b.type)]


class MulOp(BinaryOp):
    """a * b with broadcasting."""

    NAME = "tensor.mul"
    ATEN = ("mul.Tensor", "mul.Scalar")
    fn = staticmethod(np.multiply)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        return I.mul(n, *args)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """b dy and a dy."""
        a = xs[0]
        b = xs[1]
        dy = dys[0]
        return [g.unbroadcast(g.mul(dy, b), a.type), g.unbroadcast(g.mul(dy, a), b.type)]


class DivOp(BinaryOp):
    """a / b on floats with broadcasting."""

    NAME = "tensor.div"
    ATEN = ("div.Tensor", "div.Scalar", "true_divide.Tensor", "true_divide.Scalar")
    ALLOWED = "float"
    fn = staticmethod(np.true_divide)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy / b and -dy a / b^2."""
        a = xs[0]
        b = xs[1]
        y = ys[0]
        dy = dys[0]
        q = g.div(dy, b)
        return [g.unbroadcast(q, a.type), g.unbroadcast(g.neg(g.mul(q, y)), b.type)]


class FloorDivOp(BinaryOp):
    """a // b with Python's semantics (rounds toward minus infinity)."""

    NAME = "tensor.floordiv"
    ATEN = ("floor_divide.default",)
    fn = staticmethod(np.floor_divide)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        return I.floordiv(n, *args)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """Piecewise constant: nothing flows back (as PyTorch)."""
        return [None, None]


class ModOp(BinaryOp):
    """a % b with Python's semantics (the sign of b)."""

    NAME = "tensor.mod"
    ATEN = ("remainder.Tensor", "remainder.Scalar")
    fn = staticmethod(np.mod)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        return I.mod(n, *args)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy and -floor(a / b) dy."""
        a = xs[0]
        b = xs[1]
        y = ys[0]
        dy = dys[0]
        if not is_float(y.type.dtype):
            return [None, None]
        return [g.unbroadcast(dy, a.type),
                g.unbroadcast(g.neg(g.mul(dy, g.emit("tensor.floordiv", a, b))), b.type)]


class PowOp(BinaryOp):
    """a ** b with broadcasting."""

    NAME = "tensor.pow"
    fn = staticmethod(np.power)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """b a^(b-1) dy and a^b log(a) dy."""
        a = xs[0]
        b = xs[1]
        y = ys[0]
        dy = dys[0]
        one = g.scalar(1.0, y.type.dtype)
        da = g.mul(dy, g.mul(b, g.emit("tensor.pow", a, g.sub(b, one))))
        db = g.mul(dy, g.mul(y, g.emit("tensor.log", a)))  # for a > 0, as PyTorch (dropped where b is a constant)
        return [g.unbroadcast(da, a.type), g.unbroadcast(db, b.type)]


class MinimumOp(BinaryOp):
    """Elementwise minimum with broadcasting."""

    NAME = "tensor.minimum"
    ATEN = ("minimum.default",)
    fn = staticmethod(np.minimum)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        a, b = args
        return I.Interval(n.minimum(a.lo, b.lo), n.minimum(a.hi, b.hi))

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy to the smaller; split evenly on ties (as PyTorch)."""
        return _pick_vjp(g, "lt", xs, dys[0])


def _pick_vjp(g: Any, pred: str, xs: list, dy: Any) -> list:
    """The cotangent of an elementwise min (pred "lt") or max ("gt"): dy to the operand picked, half each on ties."""
    a, b = xs
    half = g.scale(dy, 0.5)
    ta = g.where(g.cmp(pred, a, b), dy, g.mask(g.cmp("eq", a, b), half))
    tb = g.where(g.cmp(pred, b, a), dy, g.mask(g.cmp("eq", a, b), half))
    return [g.unbroadcast(ta, a.type), g.unbroadcast(tb, b.type)]


class MaximumOp(BinaryOp):
    """Elementwise maximum with broadcasting."""

    NAME = "tensor.maximum"
    ATEN = ("maximum.default",)
    fn = staticmethod(np.maximum)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        a, b = args
        return I.Interval(n.maximum(a.lo, b.lo), n.maximum(a.hi, b.hi))

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy to the larger; split evenly on ties (as PyTorch)."""
        return _pick_vjp(g, "gt", xs, dys[0])


class AndOp(BinaryOp):
    """Logical and of boolean tensors."""

    NAME = "tensor.and"
    ATEN = ("logical_and.default",)
    ALLOWED = "bool"
    fn = staticmethod(np.logical_and)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        a, b = args
        return I.Interval(n.minimum(a.lo, b.lo), n.minimum(a.hi, b.hi))


class OrOp(BinaryOp):
    """Logical or of boolean tensors."""

    NAME = "tensor.or"
    ATEN = ("logical_or.default",)
    ALLOWED = "bool"
    fn = staticmethod(np.logical_or)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        a, b = args
        return I.Interval(n.maximum(a.lo, b.lo), n.maximum(a.hi, b.hi))


_PREDICATES = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
               "gt": np.greater, "ge": np.greater_equal}


class CmpOp(BinaryOp):
    """Elementwise comparison `pred` (eq, ne, lt, le, gt, ge) giving booleans."""

    NAME = "tensor.cmp"
    ALLOWED = "numeric"
    pred = Attr(A.StrKind(tuple(_PREDICATES)))

    def infer(self) -> list[TensorType]:
        dt = same_dtype(self, self.lhs.type, self.rhs.type)
        if dt == "i1" and self.pred not in ("eq", "ne"):
            raise self.error(f"booleans compare only with eq or ne, not {self.pred}")
        return [broadcast_result(self, "i1", self.lhs.type, self.rhs.type)]

    def reference(self, ctx: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _PREDICATES[self.pred](a, b)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        return I.cmp(n, self.pred, *args)


class WhereOp(Elementwise, Operation):
    """cond ? a : b elementwise, all three broadcast together."""

    NAME = "tensor.where"
    cond = Operand()
    a = Operand()
    b = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        if self.cond.type.dtype != "i1":
            raise self.error(f"condition must be boolean (i1), got {self.cond.type.dtype}")
        dt = same_dtype(self, self.a.type, self.b.type)
        return [broadcast_result(self, dt, self.cond.type, self.a.type, self.b.type)]

    def reference(self, ctx: Any, c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(c, a, b)

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        c, a, b = args
        lo = n.where(c.lo == 1, a.lo, n.where(c.hi == 0, b.lo, n.minimum(a.lo, b.lo)))
        hi = n.where(c.lo == 1, a.hi, n.where(c.hi == 0, b.hi, n.maximum(a.hi, b.hi)))
        return I.Interval(lo, hi)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dy where cond holds to a, elsewhere to b; nothing to the condition."""
        (c, a, b), (dy,) = xs, dys
        zero = g.scalar(0.0, dy.type.dtype)
        return [None, g.unbroadcast(g.where(c, dy, zero), a.type), g.unbroadcast(g.where(c, zero, dy), b.type)]


