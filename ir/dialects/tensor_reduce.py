"""`tensor` dialect, reduction part: sum/mean/max/min/logsumexp/argmax, softmax, cumsum, norms, topk."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.core import Attr, Operand, Operation, Result, Value
from sparsa.ir.dialects.tensor import same_dtype
from sparsa.ir.dialects.tensor_shape import normalize_axis
from sparsa.ir.dims import compatible, format_dim
from sparsa.ir.traits import Reduction
from sparsa.ir.types import TensorType, is_float


def _reduced(op: Operation, t: TensorType, axes: tuple[int, ...], keepdim: bool) -> tuple[int, ...]:
    norm = tuple(sorted({normalize_axis(op, a, t.rank) for a in axes}))
    if len(norm) != len(axes):
        raise op.error(f"repeats an axis in {list(axes)}")
    if keepdim:
        return tuple(1 if i in norm else d for i, d in enumerate(t.shape))
    return tuple(d for i, d in enumerate(t.shape) if i not in norm)


class ReduceOp(Reduction, Operation):
    """Base of reductions over `axes` (keepdim keeps them as size 1)."""

    FLOAT_ONLY: ClassVar[bool] = False
    x = Operand()
    axes = Attr(A.INTS)
    keepdim = Attr(A.BOOL, default=False)
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        axes = {a % len(shapes[0]) for a in self.axes}
        return [tuple(1 if i in axes else n for i, n in enumerate(shapes[0]) if self.keepdim or i not in axes)]

    def infer(self) -> list[TensorType]:
        t = self.x.type
        if t.dtype == "i1" or (self.FLOAT_ONLY and not is_float(t.dtype)):
            raise self.error(f"needs a {'float' if self.FLOAT_ONLY else 'numeric'} operand, got {t.dtype}")
        if not self.axes:
            raise self.error("needs at least one axis")
        return [TensorType(t.dtype, _reduced(self, t, self.axes, self.keepdim))]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return self.fn(x, axis=tuple(self.axes), keepdims=self.keepdim)

    @staticmethod
    def fn(x: np.ndarray, axis: tuple[int, ...], keepdims: bool) -> np.ndarray:
        return x


class SumOp(ReduceOp):
    """Sum over `axes`."""

    NAME = "tensor.sum"
    fn = staticmethod(np.sum)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY spread over the summed axes."""
        return [g.reduce_like(dys[0], xs[0].type, self.axes, self.keepdim)]


class MeanOp(ReduceOp):
    """Arithmetic mean over `axes`."""

    NAME = "tensor.mean"
    FLOAT_ONLY = True
    fn = staticmethod(np.mean)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY spread over the averaged axes, over their element count (a sum of ones: counts symbolic dims)."""
        x = xs[0]
        count = g.emit("tensor.sum", g.full(1.0, x.type), axes=list(self.axes), keepdim=self.keepdim)
        return [g.reduce_like(g.div(dys[0], count), x.type, self.axes, self.keepdim)]


class MaxOp(ReduceOp):
    """Maximum over `axes`."""

    NAME = "tensor.max"
    fn = staticmethod(np.max)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY to the largest elements, split evenly among ties (as PyTorch's amax and amin)."""
        x, y = xs[0], g.reduce_like(ys[0], xs[0].type, self.axes, self.keepdim)
        hit = g.cast(g.cmp("eq", x, y), x.type.dtype)
        ties = g.reduce_like(g.sum(hit, self.axes, keepdim=True), x.type, self.axes, True)
        return [g.div(g.mul(hit, g.reduce_like(dys[0], x.type, self.axes, self.keepdim)), ties)]


class MinOp(ReduceOp):
    """Minimum over `axes`."""

    NAME = "tensor.min"
    fn = staticmethod(np.min)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY to the smallest elements, split evenly among ties (as PyTorch's amax and amin)."""
        x, y = xs[0], g.reduce_like(ys[0], xs[0].type, self.axes, self.keepdim)
        hit = g.cast(g.cmp("eq", x, y), x.type.dtype)
        ties = g.reduce_like(g.sum(hit, self.axes, keepdim=True), x.type, self.axes, True)
        return [g.div(g.mul(hit, g.reduce_like(dys[0], x.type, self.axes, self.keepdim)), ties)]


class LogSumExpOp(ReduceOp):
    """log(sum(exp(x))) over `axes`, computed stably."""

    NAME = "tensor.logsumexp"
    FLOAT_ONLY = True

    @staticmethod
    def fn(x: np.ndarray, axis: tuple[int, ...], keepdims: bool) -> np.ndarray:
        x64 = x.astype(np.float64)
        m = np.max(x64, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        out = np.log(np.sum(np.exp(x64 - m), axis=axis, keepdims=True)) + m
        return out if keepdims else np.squeeze(out, axis=axis)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY softmax(x) over the reduced axes."""
        x = xs[0]
        p = g.emit("tensor.exp", g.sub(x, g.reduce_like(ys[0], x.type, self.axes, self.keepdim)))
        return [g.mul(p, g.reduce_like(dys[0], x.type, self.axes, self.keepdim))]


class ArgmaxOp(Reduction, Operation):
    """Index (i64) of the first maximum along `axis`."""

    NAME = "tensor.argmax"
    x = Operand()
    axis = Attr(A.INT)
    keepdim = Attr(A.BOOL, default=False)
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        axis = self.axis % len(shapes[0])
        return [tuple(1 if i == axis else n for i, n in enumerate(shapes[0]) if self.keepdim or i != axis)]

    def infer(self) -> list[TensorType]:
        return [TensorType("i64", _reduced(self, self.x.type, (self.axis,), self.keepdim))]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return np.argmax(x, axis=self.axis, keepdims=self.keepdim)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """Indices: nothing flows back."""
        return [None]


class AxisFloatOp(Operation):
    """Base of float ops along one axis that keep the shape."""

    x = Operand()
    axis = Attr(A.INT)
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [shapes[0]]

    def infer(self) -> list[TensorType]:
        t = self.x.type
        normalize_axis(self, self.axis, t.rank)
        if not is_float(t.dtype):
            raise self.error(f"needs a float operand, got {t.dtype}")
        return [t.without_layout()]


class SoftmaxOp(AxisFloatOp):
    """exp(x - max) / sum(exp(x - max)) along `axis`."""

    NAME = "tensor.softmax"

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        e = np.exp(x64 - np.max(x64, axis=self.axis, keepdims=True))
        return e / np.sum(e, axis=self.axis, keepdims=True)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """y (dY - sum(dY y))."""
        y, dy = ys[0], dys[0]
        return [g.mul(y, g.sub(dy, g.sum(g.mul(dy, y), [self.axis], keepdim=True)))]


class CumsumOp(Operation):
    """Inclusive running sum along `axis`."""

    NAME = "tensor.cumsum"
    x = Operand()
    axis = Attr(A.INT)
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [shapes[0]]

    def infer(self) -> list[TensorType]:
        normalize_axis(self, self.axis, self.x.type.rank)
        if self.x.type.dtype == "i1":
            raise self.error("needs a numeric operand, got i1")
        return [self.x.type.without_layout()]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return np.cumsum(x, axis=self.axis)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """The reversed cumulative sum of dY: its total, less the running sum before each element."""
        dy = dys[0]
        if not is_float(dy.type.dtype):
            return [None]
        total = g.sum(dy, [self.axis], keepdim=True)
        return [g.add(g.sub(total, g.emit("tensor.cumsum", dy, axis=self.axis)), dy)]


def _check_last_dim(op: Operation, x: TensorType, w: TensorType, what: str) -> None:
    if x.rank == 0 or w.rank != 1 or not compatible(w.shape[0], x.shape[-1]):
        raise op.error(f"{what} must be 1-D of the last dim {format_dim(x.shape[-1]) if x.rank else '?'} "
                       f"of {x}, got {w}")


class LayerNormOp(Operation):
    """(x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance, as PyTorch)."""

    NAME = "tensor.layernorm"
    x = Operand()
    weight = Operand()
    bias = Operand()
    eps = Attr(A.FLOAT, default=1e-5)
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [shapes[0]]

    def infer(self) -> list[TensorType]:
        t = self.x.type
        same_dtype(self, t, self.weight.type, self.bias.type)
        if not is_float(t.dtype):
            raise self.error(f"needs float operands, got {t.dtype}")
        _check_last_dim(self, t, self.weight.type, "weight")
        _check_last_dim(self, t, self.bias.type, "bias")
        return [t.without_layout()]

    def reference(self, ctx: Any, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        mu = x64.mean(axis=-1, keepdims=True)
        var = ((x64 - mu) ** 2).mean(axis=-1, keepdims=True)
        return (x64 - mu) / np.sqrt(var + self.eps) * w + b

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """`layer_norm_vjp` from x's statistics, computed again."""
        (x, w, b), dy = xs, dys[0]
        return layer_norm_vjp(g, dy, x, w, b, *layer_norm_stats(g, x, self.eps))


def layer_norm_stats(g: Any, x: Value, eps: float) -> tuple[Value, Value]:
    """Layer norm's statistics over the last axis, kept as [..., 1]: the mean and 1 / sqrt(biased variance + eps)
    (what PyTorch's native_layer_norm returns beside its output)."""
    mu = g.emit("tensor.mean", x, axes=[-1], keepdim=True)
    xc = g.sub(x, mu)
    var = g.emit("tensor.mean", g.mul(xc, xc), axes=[-1], keepdim=True)
    return mu, g.emit("tensor.rsqrt", g.add(var, g.scalar(eps, x.type.dtype)))


def layer_norm_vjp(g: Any, dy: Value, x: Value, w: Value, b: Value, mu: Value, r: Value) -> list:
    """Layer norm's rule from its statistics: xh = (x - mu) r: dx = r (dxh - mean(dxh) - xh mean(dxh xh)),
    dxh = dY w; dw = dY xh, db = dY summed."""
    xh = g.mul(g.sub(x, mu), r)
    dxh = g.mul(dy, w)
    m1 = g.emit("tensor.mean", dxh, axes=[-1], keepdim=True)
    m2 = g.emit("tensor.mean", g.mul(dxh, xh), axes=[-1], keepdim=True)
    dx = g.mul(r, g.sub(g.sub(dxh, m1), g.mul(xh, m2)))
    return [dx, g.unbroadcast(g.mul(dy, xh), w.type), g.unbroadcast(dy, b.type)]


class RmsNormOp(Operation):
    """x / sqrt(mean(x * x) + eps) * w over the last axis."""

    NAME = "tensor.rmsnorm"
    x = Operand()
    weight = Operand()
    eps = Attr(A.FLOAT, default=1e-6)
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [shapes[0]]

    def infer(self) -> list[TensorType]:
        t = self.x.type
        same_dtype(self, t, self.weight.type)
        if not is_float(t.dtype):
            raise self.error(f"needs float operands, got {t.dtype}")
        _check_last_dim(self, t, self.weight.type, "weight")
        return [t.without_layout()]

    def reference(self, ctx: Any, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        x64 = x.astype(np.float64)
        return x64 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + self.eps) * w

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """r = 1 / rms(x): dx = r (dY w) - x r^3 mean(dY w x); dw = dY x r summed over the leading dims."""
        (x, w), dy = xs, dys[0]
        mean_sq = g.emit("tensor.mean", g.mul(x, x), axes=[-1], keepdim=True)
        r = g.emit("tensor.rsqrt", g.add(mean_sq, g.scalar(self.eps, x.type.dtype)))
        gw = g.mul(dy, w)
        inner = g.emit("tensor.mean", g.mul(gw, x), axes=[-1], keepdim=True)
        dx = g.sub(g.mul(gw, r), g.mul(x, g.mul(inner, g.mul(r, g.mul(r, r)))))
        return [dx, g.unbroadcast(g.mul(dy, g.mul(x, r)), w.type)]


def scatter_along(g: Any, base: Value, updates: Value, idx: Value, axis: int) -> Value:
    """base with updates[p] added at p with its coordinate along `axis` replaced by idx[p] (PyTorch's
    scatter_add; a top-k's values' cotangent put back where they were taken from). g emits the ops (a Grad)."""
    return g.emit("tensor.scatter_add", base, updates, _places(g, idx, axis))


def gather_along(g: Any, x: Value, idx: Value, axis: int) -> Value:
    """x[p with its coordinate along `axis` replaced by idx[p]] for each place p of idx (PyTorch's gather: an
    index of x's rank, no larger than x off the axis), as a `tensor.gather` of every axis."""
    return g.emit("tensor.gather", x, _places(g, idx, axis))


def _places(g: Any, idx: Value, axis: int) -> list[Value]:
    """For each axis, an i64 index of idx's shape: idx along `axis`, the position along each other."""
    shape = idx.type.shape
    places = []
    for a in range(idx.type.rank):  # the position along each other axis, broadcast over the rest
        if a == axis:
            places.append(idx)
            continue
        iota = g.emit("tensor.iota", result_types=[TensorType("i64", (shape[a],))])
        iota = g.emit("tensor.reshape", iota, shape=[-1 if b == a else 1 for b in range(idx.type.rank)])
        places.append(g.broadcast_to(iota, TensorType("i64", shape)))
    return places


class TopkOp(Operation):
    """The k largest values along the last axis, largest first, ties to the lower index; and their i64 indices."""

    NAME = "tensor.topk"
    x = Operand()
    k = Attr(A.INT)
    values = Result()
    indices = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [shapes[0][:-1] + (self.k,)] * 2

    def infer(self) -> list[TensorType]:
        t = self.x.type
        if t.rank == 0 or t.dtype == "i1":
            raise self.error(f"needs a numeric operand of rank >= 1, got {t}")
        last = t.shape[-1]
        if self.k < 1 or (isinstance(last, int) and self.k > last):
            raise self.error(f"k = {self.k} must be in 1..{format_dim(last)} (the last dim of {t})")
        shape = t.shape[:-1] + (self.k,)
        return [TensorType(t.dtype, shape), TensorType("i64", shape)]

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """The values' cotangent put back where they were taken from along the last axis; none to indices."""
        if dys[0] is None:
            return [None]
        return [scatter_along(g, g.zeros_like(xs[0]), dys[0], ys[1], ys[1].type.rank - 1)]

    def reference(self, ctx: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.k > x.shape[-1]:
            raise ValueError(f"topk: k = {self.k} exceeds the last dim {x.shape[-1]}")
        order = np.argsort(-x if x.dtype.kind == "f" else -x.astype(np.int64), axis=-1, kind="stable")
        idx = order[..., : self.k]
        return np.take_along_axis(x, idx, axis=-1), idx
