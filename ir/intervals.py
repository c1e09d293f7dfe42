"""Interval arithmetic over whole tiles: every value of a mask region becomes [lo, hi] arrays (booleans are
intervals over {0, 1}), so one vectorized evaluation bounds all tiles at once. Each op class states its own
rule (`Operation.interval`) with the functions here; data the mask reads is bounded per tile by range
minimum and maximum."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsa.ir.types import TensorType


class Interval:
    """[lo, hi] as broadcastable float64 arrays (±inf when unbounded)."""

    __slots__ = ("lo", "hi")

    def __init__(self, lo: Any, hi: Any):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.hi = np.asarray(hi, dtype=np.float64)


def full_range(t: TensorType) -> Interval:
    return Interval(0.0, 1.0) if t.dtype == "i1" else Interval(-np.inf, np.inf)


def tri(true: np.ndarray, false: np.ndarray) -> Interval:
    """A boolean interval: lo = 1 where surely true, hi = 0 where surely false."""
    return Interval(np.where(true, 1.0, 0.0), np.where(false, 0.0, 1.0))


def cmp(pred: str, a: Interval, b: Interval) -> Interval:
    if pred == "lt":
        return tri(a.hi < b.lo, a.lo >= b.hi)
    if pred == "le":
        return tri(a.hi <= b.lo, a.lo > b.hi)
    if pred == "gt":
        return cmp("lt", b, a)
    if pred == "ge":
        return cmp("le", b, a)
    same_point = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
    disjoint = (a.hi < b.lo) | (b.hi < a.lo)
    return tri(same_point, disjoint) if pred == "eq" else tri(disjoint, same_point)


def mul(a: Interval, b: Interval) -> Interval:
    with np.errstate(invalid="ignore"):
        corners = [np.nan_to_num(x * y, nan=0.0) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return Interval(np.minimum.reduce(corners), np.maximum.reduce(corners))


def floordiv(a: Interval, b: Interval) -> Interval:
    positive = b.lo > 0
    negative = b.hi < 0
    with np.errstate(all="ignore"):
        corners = [np.floor(x / y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    lo, hi = np.minimum.reduce(corners), np.maximum.reduce(corners)
    ok = positive | negative
    return Interval(np.where(ok, lo, -np.inf), np.where(ok, hi, np.inf))


def mod(a: Interval, b: Interval) -> Interval:
    const = (b.lo == b.hi) & (b.lo > 0)
    c = np.where(const, b.lo, 1.0)
    finite = np.isfinite(a.lo) & np.isfinite(a.hi)
    lo_m = np.mod(np.where(finite, a.lo, 0.0), c)
    hi_m = np.mod(np.where(finite, a.hi, 0.0), c)
    tight = finite & (a.hi - a.lo < c) & (lo_m <= hi_m)
    lo = np.where(tight, lo_m, 0.0)
    hi = np.where(tight, hi_m, c - 1)
    return Interval(np.where(const, lo, -np.inf), np.where(const, hi, np.inf))


def absolute(a: Interval) -> Interval:
    lo = np.where(a.lo >= 0, a.lo, np.where(a.hi <= 0, -a.hi, 0.0))
    hi = np.maximum(np.abs(a.lo), np.abs(a.hi))
    return Interval(lo, hi)


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
    if data is None or data.size == 0 or len(indices) != data.ndim:
        return full_range(result)
    if data.ndim == 1:
        i = indices[0]
        if not (np.isfinite(i.lo).all() and np.isfinite(i.hi).all()):
            return Interval(float(data.min()), float(data.max()))
        return RangeTable(data).query(i.lo, i.hi)
    finite = all(np.isfinite(i.lo).all() and np.isfinite(i.hi).all() for i in indices)
    if not finite:
        return Interval(float(data.min()), float(data.max()))
    shape = np.broadcast_shapes(*(np.shape(i.lo) for i in indices), *(np.shape(i.hi) for i in indices))
    bounds = [(np.clip(np.broadcast_to(i.lo, shape), 0, n - 1).astype(np.int64),
               np.clip(np.broadcast_to(i.hi, shape), 0, n - 1).astype(np.int64))
              for i, n in zip(indices, data.shape, strict=True)]
    if all(np.array_equal(lo, hi) for lo, hi in bounds):
        v = data[tuple(lo for lo, _ in bounds)].astype(np.float64)
        return Interval(v, v)
    lo_out, hi_out = np.empty(shape), np.empty(shape)
    for idx in np.ndindex(*shape):
        window = data[tuple(slice(lo[idx], hi[idx] + 1) for lo, hi in bounds)]
        lo_out[idx], hi_out[idx] = window.min(), window.max()
    return Interval(lo_out, hi_out)
