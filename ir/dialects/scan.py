"""`scan` dialect: first-order linear recurrences h[t] = a[t] * h[t-1] + b[t]."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.analysis import Cost
from sparsa.ir.core import Attr, Operand, Operation, Region, RegionField, Result, Value
from sparsa.ir.dialects.tensor import broadcast_result, same_dtype
from sparsa.ir.dialects.tensor_reduce import SumOp
from sparsa.ir.dialects.tensor_shape import normalize_axis
from sparsa.ir.dims import broadcast_shapes
from sparsa.ir.types import TensorType, is_float


class ScanOp(Operation):
    """h[t] = a[t] * h[t-1] + b[t] along `axis` (h[-1] = h0, or 0), elementwise over the other axes; with
    `transpose`, the transposed recurrence from the last step back: h[t] = a[t+1] * h[t+1] + b[t] (h[n-1] =
    b[n-1]), what carries cotangents back through a scan."""

    NAME = "scan.scan"
    a = Operand()
    b = Operand()
    h0 = Operand(optional=True)
    axis = Attr(A.INT)
    transpose = Attr(A.BOOL, default=False)
    result = Result()

    def verify(self) -> None:
        if self.transpose and self.h0 is not None:
            raise self.error("a transposed scan starts from its last step: it takes no h0")

    def infer(self) -> list[TensorType]:
        dt = same_dtype(self, self.a.type, self.b.type)
        if not is_float(dt):
            raise self.error(f"needs float operands, got {dt}")
        out = broadcast_result(self, dt, self.a.type, self.b.type)
        axis = normalize_axis(self, self.axis, out.rank)
        if self.h0 is not None:
            state = out.shape[:axis] + out.shape[axis + 1 :]
            try:
                ok = broadcast_shapes(self.h0.type.shape, state) == state
            except ValueError:
                ok = False
            if not ok or self.h0.type.dtype != dt:
                raise self.error(f"h0 {self.h0.type} must broadcast to the state shape {TensorType(dt, state)}")
        return [out]

    def reference(self, ctx: Any, a: np.ndarray, b: np.ndarray, h0: np.ndarray | None = None) -> np.ndarray:
        a, b = np.broadcast_arrays(a.astype(np.float64), b.astype(np.float64))
        axis = self.axis % a.ndim
        a, b = np.moveaxis(a, axis, 0), np.moveaxis(b, axis, 0)
        out = np.empty(a.shape, dtype=np.float64)
        h = np.zeros(a.shape[1:]) if h0 is None else np.broadcast_to(h0.astype(np.float64), a.shape[1:])
        n = a.shape[0]
        for t in (range(n - 1, -1, -1) if self.transpose else range(n)):
            h = (a[t + 1] * h if t + 1 < n else h) + b[t] if self.transpose else a[t] * h + b[t]
            out[t] = h
        return np.moveaxis(out, 0, axis)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """`scan_rule` (not of the transposed form: a second derivative)."""
        if self.transpose:
            raise self.error("has no derivative yet in its transposed form (a second derivative)")
        h = ys[0]
        return scan_rule(g, dys[0], xs[0], xs[1].type, h, self.axis % h.type.rank, xs[2] if len(xs) > 2 else None)


def scan_rule(g: Any, dy: Any, a: Any, b_type: TensorType, h: Any, axis: int, h0: Any = None) -> list:
    """The cotangents of a, b (of type b_type) and h0 from dy of h = scan(a, b, axis, h0): the transposed scan
    carries dy back (lam[t] = dy[t] + a[t+1] lam[t+1]): db = lam, da = lam h[t-1] (the states shifted a step, h0 or
    0 first), dh0 = a[0] lam[0]."""
    rank = h.type.rank
    lam = g.emit("scan.scan", a, dy, axis=axis, transpose=True)

    def steps(v: Any, start: int, stop: int | None) -> Any:
        return g.emit("tensor.slice", v, starts=[start if i == axis else 0 for i in range(rank)],
                      stops=[stop if i == axis else None for i in range(rank)], steps=[1] * rank)

    dt = h.type.dtype
    state = TensorType(dt, tuple(d for i, d in enumerate(h.type.shape) if i != axis))
    if h0 is None:
        start = g.full(0.0, TensorType(dt, tuple(1 if i == axis else d for i, d in enumerate(h.type.shape))))
    else:
        start = g.emit("tensor.expand_dims", g.broadcast_to(h0, state), axes=[axis])
    prev = g.emit("tensor.concat", [start, steps(h, 0, -1)], axis=axis)
    out = [g.unbroadcast(g.mul(lam, prev), a.type), g.unbroadcast(lam, b_type)]
    if h0 is not None:
        a0 = steps(g.broadcast_to(a, TensorType(dt, h.type.shape)), 0, 1)
        dh0 = g.emit("tensor.squeeze", g.mul(steps(lam, 0, 1), a0), axes=[axis])
        out.append(g.unbroadcast(dh0, h0.type))
    return out


def step_type(t: TensorType, axis: int, rank: int) -> TensorType:
    """One time step of a value right-aligned to a rank-`rank` state (size 1 on the time axis; a value without
    it, or with 1 there, is its own step)."""
    pos = axis - (rank - t.rank)
    if pos < 0 or t.shape[pos] == 1:
        return t
    return t.with_shape(t.shape[:pos] + (1,) + t.shape[pos + 1 :])


def state_axis(v: Value, i: int, rank: int) -> int | None:
    """Input v's axis for dim i of a rank-`rank` state (v right-aligned to it); None where v lacks it or has 1."""
    p = i - (rank - v.type.rank)
    return p if p >= 0 and v.type.shape[p] != 1 else None


def time_slice(x: np.ndarray, axis: int, rank: int, t: int) -> np.ndarray:
    """Step t of an input right-aligned to a rank-`rank` state (kept as a size-1 axis); inputs without
    the time axis (size 1 there, or too few dims) are the same at every step."""
    pos = axis - (rank - x.ndim)
    if pos < 0 or x.shape[pos] == 1:
        return x
    index = [slice(None)] * x.ndim
    index[pos] = slice(t, t + 1)
    return x[tuple(index)]


class FusedScanOp(Operation):
    """A scan fused with its producers and its reducing consumer: per step t, the producer region makes
    (a_t, b_t) from step t of the inputs, h = a_t * h + b_t, and the consumer region reduces h with the
    remaining inputs to y_t. The [..., L, ..., N] state is never stored: only one step of it is live. After its
    sum the consumer may go on elementwise (an epilogue, `fuse-scan-epilogue`): `consumer_parts` cuts it there."""

    NAME = "scan.fused"
    ISOLATED = True
    inputs = Operand(variadic=True)
    axis = Attr(A.INT)
    num_producer_inputs = Attr(A.INT)
    out_axis = Attr(A.INT)
    state = Attr(A.DIMS)
    result = Result()
    producer = RegionField()
    consumer = RegionField()

    def infer(self) -> list[TensorType]:
        n = self.num_producer_inputs
        if not 0 < n <= len(self.inputs):
            raise self.error(f"num_producer_inputs = {n} must be in 1..{len(self.inputs)}")
        prod, cons = self.producer, self.consumer
        if prod.empty or cons.empty:
            raise self.error("needs a producer and a consumer region")
        if len(prod.block.args) != n or len(cons.block.args) != 1 + len(self.inputs) - n:
            raise self.error("producer takes the first num_producer_inputs inputs; consumer takes (h, the rest)")
        terms = (prod.block.terminator, cons.block.terminator)
        if any(t is None or t.NAME != "func.yield" for t in terms) or len(terms[0].operands) != 2 or len(
                terms[1].operands) != 1:
            raise self.error("producer yields (a, b); consumer yields y")
        rank = len(self.state)
        if not 0 <= self.axis < rank:
            raise self.error(f"axis {self.axis} is out of range for a rank-{rank} state")
        y = terms[1].operands[0].type
        shape = list(y.shape)
        if not 0 <= self.out_axis < len(shape):
            raise self.error(f"out_axis {self.out_axis} is out of range for the consumer's {y}")
        shape[self.out_axis] = self.state[self.axis]
        return [TensorType(y.dtype, tuple(shape))]

    def reference(self, ctx: Any, *inputs: np.ndarray) -> np.ndarray:
        n, rank = self.num_producer_inputs, len(self.state)
        length = ctx.dim(self.state[self.axis])
        h: np.ndarray | float = 0.0
        steps = []
        for t in range(length):
            sliced = [time_slice(x, self.axis, rank, t) for x in inputs]
            a_t, b_t = ctx.run_region(self.producer, sliced[:n])
            h = a_t.astype(np.float64) * h + b_t.astype(np.float64)
            (y_t,) = ctx.run_region(self.consumer, [h, *sliced[n:]])
            steps.append(np.asarray(y_t, dtype=np.float64))
        if not steps:
            return np.zeros(ctx.shape_of(self.result.type))
        return np.concatenate(steps, axis=self.out_axis)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """`scan.fused_grad` (ir/dialects/scan_grad.py): the states computed again chunk by chunk, never stored."""
        from sparsa.ir.dialects.scan_grad import fused_scan_grad

        return fused_scan_grad(g, self, xs, dys[0])

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        state = float(np.prod(np.broadcast_shapes(*(a.shape for a in args))))
        f = 5.0 * state  # producer (a, b), the recurrence's multiply-add, the consumer's multiply-add
        return Cost(f, f, f"fused scan: {int(state)} state elements computed, none stored")


def consumer_parts(region: Region) -> tuple[Operation | None, list[Operation], list[Operation]] | None:
    """A fused scan's consumer cut at its sum over the state: (that sum, the ops it reads — run at every index of
    the summed dim —, the epilogue after it). The epilogue reads the sum's result, its own values and the
    region's other arguments, never h or what is made from h before the sum. A consumer without a sum of h is
    all before (None, ops, []); one with two sums of h, or whose epilogue reads h, gives None."""
    ops = region.block.ops[:-1]
    from_h = {id(region.block.args[0])}
    for o in ops:
        if any(id(v) in from_h for v in o.operands):
            from_h.update(id(r) for r in o.results)
    sums = [o for o in ops if isinstance(o, SumOp) and id(o.x) in from_h]
    if not sums:
        return None, list(ops), []
    if len(sums) > 1:
        return None
    total = sums[0]
    needed, before = {id(total.results[0])}, []
    for o in reversed(ops[:ops.index(total) + 1]):
        if any(id(r) in needed for r in o.results):
            before.append(o)
            needed.update(id(v) for v in o.operands)
    before.reverse()
    inside = {id(o) for o in before}
    after = [o for o in ops if id(o) not in inside]
    made = {id(region.block.args[0])} | {id(r) for o in before for r in o.results}
    if any(id(v) in made and v is not total.results[0] for o in after for v in o.operands):
        return None
    return total, before, after


def epilogue_reads_along(op: Operation, r: int, inputs: list[Value] | None = None) -> bool:
    """Whether the consumer's epilogue (`consumer_parts`) reads an input that varies along state dim r: the kernels
    run it once a step, on the sum over r. (`inputs`: the fused scan's, where op is its backward.)"""
    parts = consumer_parts(op.consumer)
    reads = {id(v) for o in (parts[2] if parts is not None else []) for v in o.operands}
    inputs = list(op.inputs) if inputs is None else inputs
    return any(id(a) in reads and state_axis(x, r, len(op.state)) is not None
               for a, x in zip(op.consumer.block.args[1:], inputs[op.num_producer_inputs:], strict=False))


def result_dims(op: Operation, y: TensorType) -> list[int] | None:
    """The state dim of each dim of a fused scan's result (or of one step of it, `y`; the time dim the state's
    time dim), or None where the consumer's form does not say: a result of the state's rank (dim for dim), or one
    sum over the state without keepdim (the dims it leaves, in order)."""
    rank = len(op.state)
    if y.rank == rank:
        kept = list(range(rank))
    else:
        parts = consumer_parts(op.consumer)
        total = parts[0] if parts is not None else None
        if total is None or total.keepdim or total.x.type.rank != rank:
            return None
        summed = {a % rank for a in total.axes}
        kept = [d for d in range(rank) if d not in summed]
    return kept if len(kept) == y.rank and kept.index(op.axis) == op.out_axis else None


class LinearAttentionOp(Operation):
    """A matrix-state scan in chunked form: S_t = a_t * S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, per batch/head.

    Computed chunk by chunk (`chunk` steps): inside a chunk, (q k^T masked by the causal decay) @ v; across
    chunks, the [Dk, Dv] state is carried once per chunk. q, k: [..., L, Dk]; v: [..., L, Dv]; a: [..., L]
    (decay per step, >= 0). The [..., L, Dk, Dv] states are never stored.
    """

    NAME = "scan.linear_attention"
    q = Operand()
    k = Operand()
    v = Operand()
    a = Operand()
    chunk = Attr(A.INT, default=64)
    result = Result()

    def infer(self) -> list[TensorType]:
        q, k, v, a = (x.type for x in (self.q, self.k, self.v, self.a))
        if q.rank < 2 or not (q.rank == k.rank == v.rank == a.rank + 1) or self.chunk < 1:
            raise self.error(f"needs q, k [..., L, Dk], v [..., L, Dv], a [..., L], chunk >= 1; got {q}, {k}, {v}, {a}")
        if not (q.dtype == k.dtype == v.dtype == a.dtype) or not is_float(q.dtype):
            raise self.error("needs float operands of one element type")
        try:
            lead = broadcast_shapes(q.shape[:-1], k.shape[:-1], v.shape[:-1], a.shape)
        except ValueError as e:
            raise self.error(f"batch and length dims do not broadcast: {e}") from None
        return [TensorType(q.dtype, lead + (v.shape[-1],))]

    def reference(self, ctx: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, a: np.ndarray) -> np.ndarray:
        lead = np.broadcast_shapes(q.shape[:-1], k.shape[:-1], v.shape[:-1], a.shape)
        q = np.broadcast_to(q, lead + q.shape[-1:]).astype(np.float64)
        k = np.broadcast_to(k, lead + k.shape[-1:]).astype(np.float64)
        v = np.broadcast_to(v, lead + v.shape[-1:]).astype(np.float64)
        a = np.broadcast_to(a, lead).astype(np.float64)
        L = lead[-1]
        state = np.zeros(lead[:-1] + (q.shape[-1], v.shape[-1]))
        out = np.empty(lead + (v.shape[-1],))
        for start in range(0, L, self.chunk):
            sl = slice(start, min(start + self.chunk, L))
            qc, kc, vc = q[..., sl, :], k[..., sl, :], v[..., sl, :]
            pair, from_start = _decays(a[..., sl])
            n = pair.shape[-1]
            decay = np.where(np.tril(np.ones((n, n), dtype=bool)), pair, 0.0)
            intra = ((qc @ np.swapaxes(kc, -1, -2)) * decay) @ vc
            out[..., sl, :] = intra + (qc * from_start[..., None]) @ state
            to_end = pair[..., -1, :]  # the decay from each step to the chunk's last step
            state = from_start[..., -1][..., None, None] * state + np.swapaxes(kc * to_end[..., None], -1, -2) @ vc
        return out


def _decays(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For decays a[..., n] of one chunk: pair[..., t, s] = prod a[s+1..t] (for s <= t) and
    from_start[..., t] = prod a[0..t], in log space with zeros and signs tracked exactly."""
    zero = a == 0
    log_abs = np.cumsum(np.log(np.where(zero, 1.0, np.abs(a))), axis=-1)
    zeros = np.cumsum(zero, axis=-1)
    negatives = np.cumsum(a < 0, axis=-1)

    def product(lt: np.ndarray, zt: np.ndarray, nt: np.ndarray, ls: Any, zs: Any, ns: Any) -> np.ndarray:
        magnitude = np.exp(np.minimum(lt - ls, 700.0))
        sign = np.where((nt - ns) % 2 == 1, -1.0, 1.0)
        return np.where(zt - zs > 0, 0.0, sign * magnitude)

    pair = product(log_abs[..., :, None], zeros[..., :, None], negatives[..., :, None],
                   log_abs[..., None, :], zeros[..., None, :], negatives[..., None, :])
    return pair, product(log_abs, zeros, negatives, 0.0, 0, 0)
