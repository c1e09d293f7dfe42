"""Broadcast tensor computations over index vectors re-expressed as scalar ops in a region: how a mask
written with `iota`s and comparisons (in `.sp`, by hand, or by PyTorch) becomes an attention mask region."""

from __future__ import annotations

from sparsa.ir.core import Block, Operation, Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import scalar


class NotRecognized(Exception):
    """The candidate is not in a form the recognizer knows; the IR stays as it is."""


class RegionBuilder:
    """Re-expresses a broadcast tensor computation over index vectors as scalar ops in a region.

    A tensor is read at the region's indices (b, h, q, k): each of its axes either runs along one of them or
    has size 1. Axes line up with the scores' from the right, as broadcasting does; `expand_dims` and
    `broadcast_to` move them, so `iota(S)[None, None, :, None]` is the query index however many unit axes
    were added one at a time."""

    def __init__(self, block: Block, special: dict[int, Value]):
        self.block = block
        self.index = block.args[-4:]  # (b, h, q, k); a score region's first argument is the score
        self.special = dict(special)
        self.map: dict[tuple[int, tuple], Value] = {}

    def value(self, v: Value, dims: tuple[int | None, ...] | None = None) -> Value:
        """v at the region's indices; dims[i] is the position in (b, h, q, k) that v's axis i runs along (None:
        a size-1 axis). By default v's axes are the last of the scores'."""
        if id(v) in self.special:
            return self.special[id(v)]
        if dims is None:
            if v.type.rank > 4:
                raise NotRecognized()
            dims = self._aligned(v, tuple(range(4)))
        key = (id(v), dims)
        if key not in self.map:
            self.map[key] = self._lower(v, v.defining_op, dims)
        return self.map[key]

    @staticmethod
    def _aligned(v: Value, dims: tuple[int | None, ...]) -> tuple[int | None, ...]:
        """The dims of `v` broadcast against a value whose axes run along `dims` (aligned from the right)."""
        rank = v.type.rank
        if rank > len(dims):
            raise NotRecognized()
        outer = dims[len(dims) - rank:]
        return tuple(None if size == 1 else d for size, d in zip(v.type.shape, outer, strict=True))

    def _lower(self, v: Value, op: Operation | None, dims: tuple[int | None, ...]) -> Value:
        if isinstance(op, T.IotaOp):
            if dims[0] is None:
                raise NotRecognized()
            return self.index[dims[0]]
        if isinstance(op, S.ExpandDimsOp):
            added = {a % v.type.rank for a in op.axes}
            return self.value(op.x, tuple(d for i, d in enumerate(dims) if i not in added))
        if isinstance(op, S.BroadcastToOp):
            return self.value(op.x, self._aligned(op.x, dims))
        if isinstance(op, T.ConstantOp):
            return self._emit(T.ConstantOp.build(value=op.value, result_types=[scalar(v.type.dtype)], loc=op.loc))
        if isinstance(op, Elementwise):
            operands = [self.value(o, self._aligned(o, dims)) for o in op.operands]
            return self._emit(type(op).build(*operands, loc=op.loc, **dict(op.attributes)))
        if isinstance(op, S.GatherOp) and len(op.indices) == op.x.type.rank:
            indices = [self.value(i, self._aligned(i, dims)) for i in op.indices]
            return self._emit(S.GatherOp.build(op.x, indices, loc=op.loc))
        raise NotRecognized()

    def _emit(self, op: Operation) -> Value:
        if op.results[0].type.rank != 0:
            raise NotRecognized()
        self.block.append(op)
        return op.results[0]
