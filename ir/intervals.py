"""Interval arithmetic over whole tiles: every value of a mask region becomes bounds [lo, hi] (booleans are
intervals over {0, 1}). Each op class states its rule once (`Operation.interval`) with the functions here, over
a namespace `n` of the few operations a rule needs (where, minimum, maximum, ...): `NumpyBounds` evaluates every
rule on float64 arrays, all tiles at once (the reference, compile-time block maps); the cpu backend's namespace
builds the same rules as native code, one tile at a time (block maps of data masks, per call). Data the mask
reads is bounded per tile by range minimum and maximum (`n.gather`)."""

from __future__ import annotations

from functools import reduce
from typing import Any

import numpy as np

from sparsa.ir.types import TensorType


class Interval:
    """[lo, hi]: float64 arrays (±inf when unbounded) under `NumpyBounds`, native values under the cpu backend's."""

    __slots__ = ("lo", "hi")

    def __init__(self, lo: Any, hi: Any):
        self.lo = lo
        self.hi = hi


def full_range(t: TensorType) -> Interval:
    return Interval(0.0, 1.0) if t.dtype == "i1" else Interval(-np.inf, np.inf)


def tri(n: Any, true: Any, false: Any) -> Interval:
    """A boolean interval: lo = 1 where surely true, hi = 0 where surely false."""
    return Interval(n.where(true, 1.0, 0.0), n.where(false, 0.0, 1.0))


def cmp(n: Any, pred: str, a: Interval, b: Interval) -> Interval:
    if pred == "lt":
        return tri(n, a.hi < b.lo, a.lo >= b.hi)
    if pred == "le":
        return tri(n, a.hi <= b.lo, a.lo > b.hi)
    if pred == "gt":
        return cmp(n, "lt", b, a)
    if pred == "ge":
        return cmp(n, "le", b, a)
    same_point = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
    disjoint = (a.hi < b.lo) | (b.hi < a.lo)
    return tri(n, same_point, disjoint) if pred == "eq" else tri(n, disjoint, same_point)


def mul(n: Any, a: Interval, b: Interval) -> Interval:
    corners = [n.finite_product(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return Interval(reduce(n.minimum, corners), reduce(n.maximum, corners))


def floordiv(n: Any, a: Interval, b: Interval) -> Interval:
    positive = b.lo > 0
    negative = b.hi < 0
    corners = [n.floor(x / y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    lo, hi = reduce(n.minimum, corners), reduce(n.maximum, corners)
    ok = positive | negative
    return Interval(n.where(ok, lo, -np.inf), n.where(ok, hi, np.inf))


def mod(n: Any, a: Interval, b: Interval) -> Interval:
    const = (b.lo == b.hi) & (b.lo > 0)
    c = n.where(const, b.lo, 1.0)
    finite = n.isfinite(a.lo) & n.isfinite(a.hi)
    lo_m = n.mod(n.where(finite, a.lo, 0.0), c)
    hi_m = n.mod(n.where(finite, a.hi, 0.0), c)
    tight = finite & (a.hi - a.lo < c) & (lo_m <= hi_m)
    lo = n.where(tight, lo_m, 0.0)
    hi = n.where(tight, hi_m, c - 1)
    return Interval(n.where(const, lo, -np.inf), n.where(const, hi, np.inf))


def absolute(n: Any, a: Interval) -> Interval:
    lo = n.where(a.lo >= 0, a.lo, n.where(a.hi <= 0, -a.hi, 0.0))
    hi = n.maximum(n.abs(a.lo), n.abs(a.hi))
    return Interval(lo, hi)


class NumpyBounds:
    """The namespace of the rules on float64 arrays (broadcast over all tiles); `data`: the arrays of the outer
    values a mask reads, by id."""

    where = staticmethod(np.where)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    floor = staticmethod(np.floor)
    trunc = staticmethod(np.trunc)
    abs = staticmethod(np.abs)
    isfinite = staticmethod(np.isfinite)
    mod = staticmethod(np.mod)  # floored: the result takes the divisor's sign

    def __init__(self, data: dict[int, np.ndarray | None]):
        self.data = data

    @staticmethod
    def finite_product(x: Any, y: Any) -> Any:
        """x * y with 0 * inf as 0 and ±inf as the largest finite float (a corner of a product of intervals)."""
        return np.nan_to_num(np.multiply(x, y), nan=0.0)

    def gather(self, x: Any, result: TensorType, indices: list[Interval]) -> Interval:
        """Bounds of x[indices] over each tile: x's range min and max over the indices' bounds."""
        return gather(self.data.get(id(x)), result, indices)

    @staticmethod
    def result(out: Interval) -> Interval:
        return Interval(np.asarray(out.lo, dtype=np.float64), np.asarray(out.hi, dtype=np.float64))


class RangeTable:
    """Range minimum and maximum over a 1-D array in O(1) per query (sparse tables, O(n log n) to build)."""

    def __init__(self, data: np.ndarray):
        x = np.asarray(data, dtype=np.float64).reshape(-1)
        self.n = len(x)
        self.mins, self.maxs = [x], [x]
        step = 1
        while 2 * step <= self.n:
            self.mins.append(np.minimum(self.mins[-1][:-step], self.mins[-1][step:]))
            self.maxs.append(np.maximum(self.maxs[-1][:-step], self.maxs[-1][step:]))
            step *= 2

    def query(self, lo: np.ndarray, hi: np.ndarray) -> Interval:
        lo = np.clip(lo, 0, self.n - 1).astype(np.int64)
        hi = np.clip(hi, 0, self.n - 1).astype(np.int64)
        hi = np.maximum(hi, lo)
        level = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
        span = np.left_shift(1, level)
        out_lo = np.empty(np.broadcast(lo, hi).shape)
        out_hi = np.empty_like(out_lo)
        lo_b, hi_b, level_b, span_b = np.broadcast_arrays(lo, hi, level, span)
        for k in np.unique(level_b):
            sel = level_b == k
            a, b = lo_b[sel], hi_b[sel] - span_b[sel] + 1
            out_lo[sel] = np.minimum(self.mins[k][a], self.mins[k][b])
            out_hi[sel] = np.maximum(self.maxs[k][a], self.maxs[k][b])
        return Interval(out_lo, out_hi)


def gather(data: np.ndarray | None, result: TensorType, indices: list[Interval]) -> Interval:
    """Bounds of data[indices] per tile: the range min and max of data over the box the indices' bounds span
    (clipped to data's shape), or over all of data in a tile where an index bound is not finite."""
    if data is None or data.size == 0 or len(indices) != data.ndim:
        return full_range(result)
    shape = np.broadcast_shapes(*(np.shape(i.lo) for i in indices), *(np.shape(i.hi) for i in indices))
    finite = np.ones(shape, bool)
    for i in indices:
        finite &= np.isfinite(i.lo) & np.isfinite(i.hi)
    bounds = []
    for i, n in zip(indices, data.shape, strict=True):
        lo = np.clip(np.where(finite, i.lo, 0.0), 0, n - 1).astype(np.int64)
        hi = np.clip(np.where(finite, i.hi, 0.0), 0, n - 1).astype(np.int64)
        bounds.append((lo, np.maximum(hi, lo)))
    if data.ndim == 1:
        box = RangeTable(data).query(*bounds[0])
    elif all(np.array_equal(lo, hi) for lo, hi in bounds):
        v = data[tuple(lo for lo, _ in bounds)].astype(np.float64)
        box = Interval(v, v)
    else:
        box = Interval(np.empty(shape), np.empty(shape))
        for idx in np.ndindex(*shape):
            window = data[tuple(slice(lo[idx], hi[idx] + 1) for lo, hi in bounds)]
            box.lo[idx], box.hi[idx] = window.min(), window.max()
    return Interval(np.where(finite, box.lo, float(data.min())), np.where(finite, box.hi, float(data.max())))
