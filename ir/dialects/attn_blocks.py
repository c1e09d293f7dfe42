"""Attention block maps: which (query block, key block) tiles of a mask are EMPTY, PARTIAL or FULL.

A mask region is classified by interval reasoning: every value of the region becomes an interval
[lo, hi] over a whole tile (booleans are intervals over {0, 1}), so one vectorized evaluation
classifies all tiles at once in O(number of blocks) (the cpu backend builds the same rules as native
code: backends/cpu/block_map.py). Data tensors the mask reads (`doc[q]`,
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
from sparsa.ir.intervals import Interval, NumpyBounds, full_range
from sparsa.ir.types import TensorType

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


def evaluate_intervals(region: Region, args: list[Interval], n: Any) -> Interval:
    """The interval of the region's yielded value given intervals for its block arguments: each op's
    `interval` rule built with the namespace `n` (ops without one give their type's full range)."""
    env: dict[int, Interval] = {id(a): v for a, v in zip(region.block.args, args, strict=True)}

    def get(v: Value) -> Interval:
        if id(v) in env:
            return env[id(v)]
        return n.result(full_range(v.type))  # a value from outside the region: no bound known

    with np.errstate(all="ignore"):
        for op in region.block.ops:
            if op.TERMINATOR:
                return get(op.operands[0])
            out = op.interval(n, *[get(v) for v in op.operands])
            env[id(op.results[0])] = n.result(out if out is not None else full_range(op.results[0].type))
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
    result = evaluate_intervals(region, args, NumpyBounds(data))
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

    def per_shape(self) -> bool:
        return self.map is not None or not outer_values(self.mask)

    def reference(self, ctx: Any) -> np.ndarray:
        if self.map is not None:
            return self.map.data
        data = {id(v): ctx.lookup(v) for v in outer_values(self.mask)}
        return classify(self.mask, ctx.dim(self.sq), ctx.dim(self.sk), self.block_q, self.block_k,
                        ctx.dim(self.batch), ctx.dim(self.heads), data)
