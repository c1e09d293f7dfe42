"""Attention block maps: which (query block, key block) tiles of a mask are EMPTY, PARTIAL or FULL.

A mask region is classified by interval reasoning: every value of the region becomes an interval
[lo, hi] over a whole tile (booleans are intervals over {0, 1}), so one vectorized evaluation
classifies all tiles at once in O(number of blocks). Data tensors the mask reads (`doc[q]`,
`table[q // 64, k // 64]`, `allowed[q, k]`) are summarized per tile by range minimum and maximum.
The classification is sound: a tile is FULL only if every (q, k) pair in it is allowed, EMPTY only
if none is; anything the reasoning cannot decide is PARTIAL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.core import Attr, Operation, Region, RegionField, Result, Value
from sparsa.ir.dims import Dim, compatible, format_dim
from sparsa.ir.types import TensorType, is_int

EMPTY, PARTIAL, FULL = 0, 1, 2
_LETTERS = "EPF"


def ceil_div_dim(d: Dim, b: int) -> Dim:
    """ceil(d / b) as a dim (a symbolic expression when d is symbolic)."""
    if isinstance(d, int):
        return -(-d // b)
    if d is None:
        return None
    return f"({d}+{b - 1})//{b}"


@dataclass(frozen=True, eq=False)
class BlockMap:
    """A computed block map [NB, NH, NQ, NK] of EMPTY/PARTIAL/FULL, printed run-length encoded per row."""

    data: np.ndarray

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockMap) and np.array_equal(self.data, other.data)

    def __hash__(self) -> int:
        return hash(self.data.tobytes())

    def counts(self) -> dict[str, int]:
        return {"empty": int((self.data == EMPTY).sum()), "partial": int((self.data == PARTIAL).sum()),
                "full": int((self.data == FULL).sum())}

    def encode(self) -> str:
        rows = []
        for row in self.data.reshape(-1, self.data.shape[-1]):
            runs, start = [], 0
            for i in range(1, len(row) + 1):
                if i == len(row) or row[i] != row[start]:
                    runs.append(f"{_LETTERS[row[start]]}{i - start}")
                    start = i
            rows.append("".join(runs))
        return "x".join(map(str, self.data.shape)) + ":" + ";".join(rows)

    @classmethod
    def decode(cls, text: str) -> BlockMap:
        head, _, body = text.partition(":")
        shape = tuple(int(x) for x in head.split("x"))
        if len(shape) != 4:
            raise ValueError(f"block map shape must have 4 dims, got {head!r}")
        rows = body.split(";") if body else []
        if len(rows) != shape[0] * shape[1] * shape[2]:
            raise ValueError(f"block map has {len(rows)} rows, its shape {head} needs {shape[0] * shape[1] * shape[2]}")
        out = np.zeros((len(rows), shape[3]), dtype=np.int8)
        for r, row in enumerate(rows):
            pos = 0
            for letter, count in _runs(row):
                out[r, pos : pos + count] = _LETTERS.index(letter)
                pos += count
            if pos != shape[3]:
                raise ValueError(f"block map row {r} covers {pos} key blocks, not {shape[3]}")
        return cls(out.reshape(shape))


def _runs(row: str) -> list[tuple[str, int]]:
    out, i = [], 0
    while i < len(row):
        letter = row[i]
        if letter not in _LETTERS:
            raise ValueError(f"unexpected {letter!r} in a block map row (E, P or F then a count)")
        j = i + 1
        while j < len(row) and row[j].isdigit():
            j += 1
        if j == i + 1:
            raise ValueError(f"missing count after {letter!r} in a block map row")
        out.append((letter, int(row[i + 1 : j])))
        i = j
    return out


class BlockMapKind(A.AttrKind):
    name = "block map"

    def coerce(self, value: Any) -> BlockMap:
        if isinstance(value, BlockMap):
            return value
        if not isinstance(value, str):
            raise ValueError(f"expected a block map string like \"1x1x2x2:P1E1;F1P1\", got {value!r}")
        return BlockMap.decode(value)

    def format(self, value: BlockMap) -> str:
        return f'"{value.encode()}"'


BLOCKMAP = BlockMapKind()


# ---- interval evaluation of a mask region -------------------------------------------------------------------
class Interval:
    """[lo, hi] as broadcastable float64 arrays (±inf when unbounded)."""

    __slots__ = ("lo", "hi")

    def __init__(self, lo: Any, hi: Any):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.hi = np.asarray(hi, dtype=np.float64)


def _full_range(t: TensorType) -> Interval:
    return Interval(0.0, 1.0) if t.dtype == "i1" else Interval(-np.inf, np.inf)


def _tri(true: np.ndarray, false: np.ndarray) -> Interval:
    """A boolean interval: lo = 1 where surely true, hi = 0 where surely false."""
    return Interval(np.where(true, 1.0, 0.0), np.where(false, 0.0, 1.0))


def _cmp(pred: str, a: Interval, b: Interval) -> Interval:
    if pred == "lt":
        return _tri(a.hi < b.lo, a.lo >= b.hi)
    if pred == "le":
        return _tri(a.hi <= b.lo, a.lo > b.hi)
    if pred == "gt":
        return _cmp("lt", b, a)
    if pred == "ge":
        return _cmp("le", b, a)
    same_point = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
    disjoint = (a.hi < b.lo) | (b.hi < a.lo)
    return _tri(same_point, disjoint) if pred == "eq" else _tri(disjoint, same_point)


def _mul(a: Interval, b: Interval) -> Interval:
    with np.errstate(invalid="ignore"):
        corners = [np.nan_to_num(x * y, nan=0.0) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return Interval(np.minimum.reduce(corners), np.maximum.reduce(corners))


def _floordiv(a: Interval, b: Interval) -> Interval:
    positive = b.lo > 0
    negative = b.hi < 0
    with np.errstate(all="ignore"):
        corners = [np.floor(x / y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    lo, hi = np.minimum.reduce(corners), np.maximum.reduce(corners)
    ok = positive | negative
    return Interval(np.where(ok, lo, -np.inf), np.where(ok, hi, np.inf))


def _mod(a: Interval, b: Interval) -> Interval:
    const = (b.lo == b.hi) & (b.lo > 0)
    c = np.where(const, b.lo, 1.0)
    finite = np.isfinite(a.lo) & np.isfinite(a.hi)
    lo_m = np.mod(np.where(finite, a.lo, 0.0), c)
    hi_m = np.mod(np.where(finite, a.hi, 0.0), c)
    tight = finite & (a.hi - a.lo < c) & (lo_m <= hi_m)
    lo = np.where(tight, lo_m, 0.0)
    hi = np.where(tight, hi_m, c - 1)
    return Interval(np.where(const, lo, -np.inf), np.where(const, hi, np.inf))


def _abs(a: Interval) -> Interval:
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


def _gather(data: np.ndarray | None, result: TensorType, indices: list[Interval]) -> Interval:
    if data is None or data.size == 0 or len(indices) != data.ndim:
        return _full_range(result)
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


def evaluate_intervals(region: Region, args: list[Interval], data: dict[int, np.ndarray | None]) -> Interval:
    """The interval of the region's yielded value given intervals for its block arguments."""
    from sparsa.ir.dialects import tensor as T
    from sparsa.ir.dialects import tensor_shape as S

    env: dict[int, Interval] = {id(a): v for a, v in zip(region.block.args, args, strict=True)}

    def get(v: Value) -> Interval:
        if id(v) in env:
            return env[id(v)]
        return _full_range(v.type)  # a value from outside the region: no bound known

    binary = {
        T.AddOp: lambda a, b: Interval(a.lo + b.lo, a.hi + b.hi),
        T.SubOp: lambda a, b: Interval(a.lo - b.hi, a.hi - b.lo),
        T.MulOp: _mul, T.FloorDivOp: _floordiv, T.ModOp: _mod,
        T.MinimumOp: lambda a, b: Interval(np.minimum(a.lo, b.lo), np.minimum(a.hi, b.hi)),
        T.MaximumOp: lambda a, b: Interval(np.maximum(a.lo, b.lo), np.maximum(a.hi, b.hi)),
        T.AndOp: lambda a, b: Interval(np.minimum(a.lo, b.lo), np.minimum(a.hi, b.hi)),
        T.OrOp: lambda a, b: Interval(np.maximum(a.lo, b.lo), np.maximum(a.hi, b.hi)),
    }
    with np.errstate(invalid="ignore", over="ignore"):
        for op in region.block.ops:
            if op.TERMINATOR:
                return get(op.operands[0])
            args_i = [get(v) for v in op.operands]
            t = op.results[0].type if op.results else None
            cls = type(op)
            if isinstance(op, T.ConstantOp):
                out = Interval(float(op.value), float(op.value))
            elif cls in binary:
                out = binary[cls](*args_i)
            elif isinstance(op, T.CmpOp):
                out = _cmp(op.pred, *args_i)
            elif isinstance(op, T.NotOp):
                out = Interval(1.0 - args_i[0].hi, 1.0 - args_i[0].lo)
            elif isinstance(op, T.NegOp):
                out = Interval(-args_i[0].hi, -args_i[0].lo)
            elif isinstance(op, T.AbsOp):
                out = _abs(args_i[0])
            elif isinstance(op, T.WhereOp):
                c, a, b = args_i
                lo = np.where(c.lo == 1, a.lo, np.where(c.hi == 0, b.lo, np.minimum(a.lo, b.lo)))
                hi = np.where(c.lo == 1, a.hi, np.where(c.hi == 0, b.hi, np.maximum(a.hi, b.hi)))
                out = Interval(lo, hi)
            elif isinstance(op, T.CastOp) and is_int(op.to) and not is_int(op.x.type.dtype):
                out = Interval(np.trunc(args_i[0].lo), np.trunc(args_i[0].hi))
            elif isinstance(op, T.CastOp) and op.to != "i1":
                out = args_i[0]
            elif isinstance(op, S.GatherOp):
                out = _gather(data.get(id(op.x)), t, args_i[1:])
            else:
                out = _full_range(t)
            env[id(op.results[0])] = out
    raise ValueError("mask region has no terminator")


def outer_values(region: Region) -> list[Value]:
    """Values the region reads but does not define (mask data tensors)."""
    inside = {id(a) for a in region.block.args} | {id(r) for op in region.block.ops for r in op.results}
    seen: dict[int, Value] = {}
    for op in region.block.ops:
        for v in op.operands:
            if id(v) not in inside:
                seen.setdefault(id(v), v)
    return list(seen.values())


def mask_axes_used(region: Region) -> tuple[bool, bool]:
    """Whether the mask reads its batch (b) and head (h) index arguments."""
    b, h = region.block.args[0], region.block.args[1]
    return bool(b.uses), bool(h.uses)


def classify(region: Region, sq: int, sk: int, bq: int, bk: int, nb: int, nh: int,
             data: dict[int, np.ndarray | None]) -> np.ndarray:
    """int8 [nb, nh, ceil(sq/bq), ceil(sk/bk)] of EMPTY/PARTIAL/FULL for the mask `region`."""
    nq, nk = -(-sq // bq), -(-sk // bk)
    q0 = np.arange(nq, dtype=np.float64) * bq
    k0 = np.arange(nk, dtype=np.float64) * bk
    b = np.arange(nb, dtype=np.float64).reshape(nb, 1, 1, 1)
    h = np.arange(nh, dtype=np.float64).reshape(1, nh, 1, 1)
    args = [Interval(b, b), Interval(h, h),
            Interval(q0.reshape(1, 1, nq, 1), np.minimum(q0 + bq - 1, sq - 1).reshape(1, 1, nq, 1)),
            Interval(k0.reshape(1, 1, 1, nk), np.minimum(k0 + bk - 1, sk - 1).reshape(1, 1, 1, nk))]
    result = evaluate_intervals(region, args, data)
    kinds = np.where(result.lo >= 1, FULL, np.where(result.hi <= 0, EMPTY, PARTIAL)).astype(np.int8)
    return np.ascontiguousarray(np.broadcast_to(kinds, (nb, nh, nq, nk)))


class BlockMapOp(Operation):
    """Classifies each (query block, key block) tile of a mask as EMPTY (0), PARTIAL (1) or FULL (2).

    With `map` set the classification was done at compile time and the region is empty; otherwise
    the mask region is classified per call (O(blocks), data summarized per block).
    """

    NAME = "attn.block_map"
    block_q = Attr(A.INT)
    block_k = Attr(A.INT)
    sq = Attr(A.DIM)
    sk = Attr(A.DIM)
    batch = Attr(A.DIM, default=1)
    heads = Attr(A.DIM, default=1)
    map = Attr(BLOCKMAP, default=None)
    result = Result()
    mask = RegionField(optional=True)

    def infer(self) -> list[TensorType]:
        if self.block_q < 1 or self.block_k < 1:
            raise self.error(f"block sizes must be positive, got {self.block_q}x{self.block_k}")
        return [TensorType("i8", (self.batch, self.heads, ceil_div_dim(self.sq, self.block_q),
                                  ceil_div_dim(self.sk, self.block_k)))]

    def verify(self) -> None:
        if self.map is None and self.mask.empty:
            raise self.error("needs either a precomputed 'map' or a mask region to classify")
        if self.map is not None:
            want = self.result.type.shape
            if not all(compatible(a, b) for a, b in zip(want, self.map.data.shape, strict=True)):
                raise self.error(f"map of shape {list(self.map.data.shape)} does not match "
                                 f"[{', '.join(format_dim(d) for d in want)}]")

    def reference(self, ctx: Any) -> np.ndarray:
        if self.map is not None:
            return self.map.data
        data = {id(v): ctx.lookup(v) for v in outer_values(self.mask)}
        return classify(self.mask, ctx.dim(self.sq), ctx.dim(self.sk), self.block_q, self.block_k,
                        ctx.dim(self.batch), ctx.dim(self.heads), data)
