"""`moe` dialect, expert-parallel part: what `shard-experts` lowers a dispatch into when the experts are split over
the ranks of a process group. The exchange itself is the runtime's (`ctx.exchange`: torch.distributed), so an op
here says what moves between ranks and the interpreter and every target's host run it the same way.

    rows, local, sends, receives = moe.exchange_plan(idx)   # global capacity, each token once per rank
    xr = moe.all_to_all(x[rows], sends, receives)           # this rank's share of every rank's tokens
    ... dispatch and grouped GEMMs over xr with this rank's experts, gates combined per received token ...
    y = moe.combine_rows(moe.all_to_all(partial, receives, sends), rows, x)   # back home, summed in rank order
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.analysis import Cost
from sparsa.ir.core import Attr, Operand, Operation, Result
from sparsa.ir.dialects.moe import expert_capacity
from sparsa.ir.dims import compatible
from sparsa.ir.traits import View
from sparsa.ir.types import TensorType, is_int


class Exchange(Protocol):
    """What the ops here need of a process group (the runtime's is torch.distributed's)."""

    rank: int
    size: int

    def all_gather(self, a: np.ndarray) -> np.ndarray:
        """[size, *a.shape]: every rank's `a`, in rank order."""

    def all_to_all(self, data: np.ndarray, sends: np.ndarray, receives: np.ndarray) -> np.ndarray:
        """Rows sends[r] of `data` (in order) to rank r; receives[r] rows from rank r, in rank order."""

    def start(self, data: np.ndarray, sends: np.ndarray, receives: np.ndarray) -> np.ndarray:
        """`all_to_all` begun: returns the array the rows arrive in, to be read only after `wait(it)`."""

    def wait(self, rows: np.ndarray) -> np.ndarray:
        """The array a `start` returned, once its rows have arrived."""


def exchange_of(op: Operation, ctx: Any, ranks: int) -> Exchange:
    """The process group of the call, checked against the ranks the op was compiled for."""
    ex = getattr(ctx, "exchange", None)
    if ex is None:
        raise ValueError(f"{op.NAME} runs on a process group: compile with expert_parallel=<group>")
    if ex.size != ranks:
        raise ValueError(f"{op.NAME} was compiled for {ranks} ranks but the process group has {ex.size}")
    return ex


def global_keep(experts: np.ndarray, num_experts: int, capacity: float | None, counts: np.ndarray,
                rank: int) -> np.ndarray:
    """Boolean [T, K] of this rank's assignments that a single process keeps, running every rank's tokens
    concatenated in rank order. `counts` is [ranks, 1 + E]: each rank's token count, then its assignments per
    expert. An expert keeps its first ceil(capacity * T_all * K / E) assignments in that order, so this rank's
    n-th assignment to e survives when the assignments to e on the ranks before it, plus n, are below that."""
    keep = np.ones(experts.shape, dtype=bool)
    if capacity is None:
        return keep
    cap = expert_capacity(capacity, int(counts[:, 0].sum()), experts.shape[1], num_experts)
    before = counts[:rank, 1:].sum(axis=0)
    flat = experts.reshape(-1)  # token order, then slot order
    for e in np.unique(flat):
        where = np.flatnonzero(flat == e)
        keep.reshape(-1)[where[max(cap - int(before[e]), 0):]] = False
    return keep


def plan(experts: np.ndarray, keep: np.ndarray, num_experts: int, ranks: int) -> tuple[np.ndarray, ...]:
    """(rows, local, sends): the tokens with a kept assignment on each rank's experts, rank by rank and in token
    order within a rank, each once; for each such row the rank-local expert of every slot (-1: not there);
    and how many rows go to each rank."""
    per_rank = num_experts // ranks
    owner = np.where(keep, experts // per_rank, -1)
    rows, local, sends = [], [], []
    for r in range(ranks):
        here = owner == r
        tokens = np.flatnonzero(here.any(axis=1))
        rows.append(tokens)
        local.append(np.where(here[tokens], experts[tokens] - r * per_rank, -1))
        sends.append(tokens.size)
    return (np.concatenate(rows).astype(np.int64), np.concatenate(local).astype(np.int64).reshape(-1, experts.shape[1]),
            np.array(sends, dtype=np.int64))


class ExchangePlanOp(Operation):
    """Expert-parallel routing on this rank: the tokens each rank's experts need (each token once per rank), the
    rank-local expert of each slot, capacity applied over all ranks' tokens in rank order; row counts exchanged."""

    NAME = "moe.exchange_plan"
    PURE = False  # a collective: every rank runs it, in program order
    experts = Operand()
    num_experts = Attr(A.INT)
    ranks = Attr(A.INT)
    capacity = Attr(A.FLOAT, default=None)
    rows = Result()
    local = Result()
    sends = Result()
    receives = Result()

    def infer(self) -> list[TensorType]:
        t = self.experts.type
        if t.rank != 2 or not is_int(t.dtype):
            raise self.error(f"needs integer expert ids [T, K], got {t}")
        R = self.ranks
        return [TensorType("i64", (None,)), TensorType("i64", (None, t.shape[1])), TensorType("i64", (R,)),
                TensorType("i64", (R,))]

    def verify(self) -> None:
        if self.ranks < 1 or self.num_experts < 1 or self.num_experts % self.ranks:
            raise self.error(f"{self.num_experts} experts do not split into equal blocks over {self.ranks} ranks")
        if self.capacity is not None and self.capacity <= 0:
            raise self.error(f"capacity must be positive, got {self.capacity}")

    def reference(self, ctx: Any, experts: np.ndarray) -> tuple[np.ndarray, ...]:
        E = self.num_experts
        ex = exchange_of(self, ctx, self.ranks)
        if experts.size and (experts.min() < 0 or experts.max() >= E):
            raise ValueError(f"moe.exchange_plan: expert id outside 0..{E - 1}")
        counts = None
        if self.capacity is not None:  # every rank's token count and per-expert assignments: the global order
            mine = np.concatenate([[experts.shape[0]], np.bincount(experts.reshape(-1), minlength=E)])
            counts = ex.all_gather(mine.astype(np.int64))
        keep = global_keep(experts, E, self.capacity, counts, ex.rank)
        rows, local, sends = plan(experts, keep, E, self.ranks)
        receives = ex.all_to_all(sends, np.ones(self.ranks, np.int64), np.ones(self.ranks, np.int64))
        return rows, local, sends, receives.astype(np.int64)

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        rows, local, sends, receives = outs
        per_rank = self.num_experts // self.ranks
        owner = np.where(local >= 0, np.repeat(np.arange(self.ranks), sends)[:, None], -1)
        assignments = [int((owner == r).sum()) for r in range(self.ranks)]
        return Cost(0.0, 0.0, f"{self.ranks} ranks of {per_rank} experts: token rows to each rank {sends.tolist()} "
                    f"for assignments {assignments} (one row per token and rank, the deduplicated minimum); "
                    f"rows from each rank {receives.tolist()}")


class AllToAllOp(Operation):
    """Rows exchanged among the ranks (torch.distributed's all_to_all_single): the first sends[0] rows of `data`
    go to rank 0, the next sends[1] to rank 1, ...; the result holds receives[r] rows from each rank r, in order."""

    NAME = "moe.all_to_all"
    PURE = False  # a collective
    data = Operand()
    sends = Operand()
    receives = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        return [_check_exchange(self, self.data.type, self.sends.type, self.receives.type)]

    def reference(self, ctx: Any, data: np.ndarray, sends: np.ndarray, receives: np.ndarray) -> np.ndarray:
        ex = exchange_of(self, ctx, sends.shape[0])
        if int(sends.sum()) != data.shape[0]:
            raise ValueError(f"moe.all_to_all: {data.shape[0]} rows but sends add up to {int(sends.sum())}")
        return ex.all_to_all(np.ascontiguousarray(data), sends, receives)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """The exchange's transpose: the cotangents go back the way the rows came (receives and sends swapped)."""
        return [g.emit("moe.all_to_all", dys[0], xs[2], xs[1]), None, None]

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        data, sends, receives = args
        row = data.itemsize * int(np.prod(data.shape[1:]))
        return Cost(0.0, 0.0, f"{int(sends.sum())} rows out, {int(receives.sum())} in, {row} bytes a row",
                    bytes=float(row * (int(sends.sum()) + int(receives.sum()))))


def _check_exchange(op: Operation, d: TensorType, s: TensorType, r: TensorType) -> TensorType:
    if d.rank < 1:
        raise op.error(f"needs rows to exchange, got {d}")
    for c in (s, r):
        if c.rank != 1 or c.dtype != "i64":
            raise op.error(f"needs i64 row counts per rank, got {s} and {r}")
    if not compatible(s.shape[0], r.shape[0]):
        raise op.error(f"send and receive counts disagree on the ranks: {s} and {r}")
    return TensorType(d.dtype, (None,) + d.shape[1:])


class AllToAllStartOp(Operation):
    """`moe.all_to_all` begun: the rows are in flight until the `moe.all_to_all_wait` that reads this result, and
    the ops between the two run meanwhile (`overlap-exchanges` puts independent work there)."""

    NAME = "moe.all_to_all_start"
    PURE = False  # a collective
    data = Operand()
    sends = Operand()
    receives = Operand()
    result = Result()
    cost = AllToAllOp.cost

    def infer(self) -> list[TensorType]:
        return [_check_exchange(self, self.data.type, self.sends.type, self.receives.type)]

    def verify(self) -> None:
        uses = self.result.uses
        if len(uses) != 1 or not isinstance(uses[0].op, AllToAllWaitOp):
            raise self.error("its rows must be read by exactly one 'moe.all_to_all_wait'")

    def reference(self, ctx: Any, data: np.ndarray, sends: np.ndarray, receives: np.ndarray) -> np.ndarray:
        ex = exchange_of(self, ctx, sends.shape[0])
        if int(sends.sum()) != data.shape[0]:
            raise ValueError(f"moe.all_to_all_start: {data.shape[0]} rows but sends add up to {int(sends.sum())}")
        return ex.start(np.ascontiguousarray(data), sends, receives)


class AllToAllWaitOp(Operation):
    """The rows of a `moe.all_to_all_start`, once they have arrived."""

    NAME = "moe.all_to_all_wait"
    PURE = False  # a collective's end: it stays where the schedule put it
    rows = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        return [self.rows.type]

    def verify(self) -> None:
        if not isinstance(self.rows.defining_op, AllToAllStartOp):
            raise self.error("waits for the rows of a 'moe.all_to_all_start'")

    def reference(self, ctx: Any, rows: np.ndarray) -> np.ndarray:
        return exchange_of(self, ctx, self.rows.defining_op.sends.type.shape[0]).wait(rows)


class CombineRowsOp(Operation):
    """y[t] = the sum of the rows of `parts` that belong to token t (`rows` names each one's token), in order:
    each rank's partial result for the token, back on the token's own rank. `tokens` gives T (its rows)."""

    NAME = "moe.combine_rows"
    parts = Operand()
    rows = Operand()
    tokens = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        p, r, t = self.parts.type, self.rows.type, self.tokens.type
        if p.rank != 2 or r.rank != 1 or not is_int(r.dtype) or t.rank < 1:
            raise self.error(f"needs parts [N, D], integer rows [N] and tokens [T, ...], got {p}, {r}, {t}")
        if not compatible(p.shape[0], r.shape[0]):
            raise self.error(f"{p} and {r} disagree on the rows")
        return [TensorType(p.dtype, (t.shape[0], p.shape[1]))]

    def reference(self, ctx: Any, parts: np.ndarray, rows: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        y = np.zeros((tokens.shape[0], parts.shape[1]), dtype=parts.dtype)
        np.add.at(y, rows, parts)  # in row order: a token's partials from rank 0, then rank 1, ...
        return y

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """Each part gets its token's cotangent."""
        return [g.emit("tensor.gather", dys[0], [xs[1]]), None, None]


def _blocks(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class RankRowsOp(Operation):
    """Rows of `data` laid out in blocks of counts[r] rows per rank (as an all_to_all sends or receives them):
    with `own`, this rank's block; without, every other rank's blocks, in rank order."""

    NAME = "moe.rank_rows"
    data = Operand()
    counts = Operand()
    own = Attr(A.BOOL)
    result = Result()

    def infer(self) -> list[TensorType]:
        d, c = self.data.type, self.counts.type
        if d.rank < 1 or c.rank != 1 or c.dtype != "i64":
            raise self.error(f"needs rows and i64 counts per rank, got {d} and {c}")
        return [TensorType(d.dtype, (None,) + d.shape[1:])]

    def reference(self, ctx: Any, data: np.ndarray, counts: np.ndarray) -> np.ndarray:
        r = exchange_of(self, ctx, counts.shape[0]).rank
        at = _blocks(counts)
        if at[-1] != data.shape[0]:
            raise ValueError(f"moe.rank_rows: {data.shape[0]} rows but the counts add up to {at[-1]}")
        if self.own:
            return data[at[r]:at[r + 1]]
        return np.concatenate([data[:at[r]], data[at[r + 1]:]])

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """The block's cotangent back in its place, zeros for the rows not taken."""
        data, counts, dy = xs[0], xs[1], dys[0]
        rest = g.emit("moe.rank_rows", g.zeros_like(data), counts, own=not self.own)
        parts = (rest, dy) if self.own else (dy, rest)
        return [g.emit("moe.insert_own_rows", *parts, counts), None]


class InsertOwnRowsOp(Operation):
    """The other ranks' blocks (`others`, in rank order) with this rank's block (`own`) put back in its place:
    blocks of counts[r] rows per rank, as `moe.rank_rows` took them apart."""

    NAME = "moe.insert_own_rows"
    others = Operand()
    own = Operand()
    counts = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        o, m, c = self.others.type, self.own.type, self.counts.type
        if o.rank < 1 or o.dtype != m.dtype or o.shape[1:] != m.shape[1:] or c.rank != 1 or c.dtype != "i64":
            raise self.error(f"needs two row blocks of one type and i64 counts per rank, got {o}, {m}, {c}")
        return [TensorType(o.dtype, (None,) + o.shape[1:])]

    def reference(self, ctx: Any, others: np.ndarray, own: np.ndarray, counts: np.ndarray) -> np.ndarray:
        r = exchange_of(self, ctx, counts.shape[0]).rank
        at = _blocks(counts)
        if own.shape[0] != counts[r] or others.shape[0] + own.shape[0] != at[-1]:
            raise ValueError(f"moe.insert_own_rows: blocks of {others.shape[0]} and {own.shape[0]} rows do not fit "
                             f"counts {counts.tolist()} at rank {r}")
        return np.concatenate([others[:at[r]], own, others[at[r]:]])

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """The cotangent taken apart again: the other ranks' blocks, and this rank's."""
        dy, counts = dys[0], xs[2]
        return [g.emit("moe.rank_rows", dy, counts, own=False), g.emit("moe.rank_rows", dy, counts, own=True), None]


class LocalExpertsOp(View, Operation):
    """This rank's block of an [E, ...] tensor split over `ranks` along its first axis (expert weights passed as
    inputs; weights that are params are loaded as the block itself)."""

    NAME = "moe.local_experts"
    x = Operand()
    ranks = Attr(A.INT)
    result = Result()

    def infer(self) -> list[TensorType]:
        t = self.x.type
        E = t.shape[0] if t.rank else None
        if not isinstance(E, int) or self.ranks < 1 or E % self.ranks:
            raise self.error(f"needs a first axis of experts that splits over {self.ranks} ranks, got {t}")
        return [TensorType(t.dtype, (E // self.ranks,) + t.shape[1:])]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        ex = exchange_of(self, ctx, self.ranks)
        n = x.shape[0] // self.ranks
        return x[ex.rank * n:(ex.rank + 1) * n]
