"""`scan.fused_grad`: the reverse of a fused scan (`scan.fused`), with its states computed again from the inputs
chunk by chunk instead of stored per step.

    %dxs... = scan.fused_grad(%xs..., %dy) ({producer}, {consumer}, {producer_grad}, {consumer_grad})
              {axis, num_producer_inputs, out_axis, state, chunk}

Per step t from the last back, with h_t the forward's state (h_-1 = 0) and a_t its decay:

    (dh_t, dc_t...) = consumer_grad(h_t, c_t..., dy_t)        c: the consumer's inputs at step t
    lam_t = dh_t + a_{t+1} lam_{t+1}                          the state's cotangent (lam_L = 0)
    (dp_t...) = producer_grad(p_t..., a_t, b_t, lam_t h_{t-1}, lam_t)   p: the producer's inputs; (da_t, db_t)

The derivative regions are the forward regions' vector-Jacobian rules (ir/autodiff.py) on their arguments
broadcast to one step of the state, so every cotangent they yield has the state's step shape and holds no sum (the
producer's rules read a_t and b_t as arguments where they read what it yields: the exp of a decay is not made again):
summing it to its input's shape (over the dims the input lacks, and over time where it does not vary along it)
is the op's, which a kernel does where it is cheapest (a channel dim in vector lanes: across them once a step).
`expansion()` is the same derivative written with the unfused ops (the states stored): what a target without a
kernel for it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.analysis import Cost
from sparsa.ir.core import Attr, Block, Operand, Operation, Region, RegionField, Result, Value
from sparsa.ir.dialects.func import YieldOp
from sparsa.ir.dialects.scan import time_slice
from sparsa.ir.types import TensorType

CHUNK = 32  # steps of states a chunk computes again and keeps (a [chunk, N, lanes] buffer per work item in L2)


class FusedScanGradOp(Operation):
    """The cotangent of each input of a `scan.fused` given dy, its result's (module docstring)."""

    NAME = "scan.fused_grad"
    ISOLATED = True
    inputs = Operand(variadic=True)  # the fused scan's inputs, then dy
    axis = Attr(A.INT)
    num_producer_inputs = Attr(A.INT)
    out_axis = Attr(A.INT)
    state = Attr(A.DIMS)
    chunk = Attr(A.INT, default=CHUNK)
    grads = Result(variadic=True)
    producer = RegionField()
    consumer = RegionField()
    producer_grad = RegionField()
    consumer_grad = RegionField()

    @property
    def xs(self) -> list[Value]:
        return list(self.inputs[:-1])

    @property
    def dy(self) -> Value:
        return self.inputs[-1]

    def step(self) -> TensorType:
        """One step of the state: the type of every cotangent the derivative regions yield."""
        return TensorType(self.dy.type.dtype, tuple(1 if i == self.axis else d for i, d in enumerate(self.state)))

    def infer(self) -> list[TensorType]:
        n, xs = self.num_producer_inputs, self.xs
        if not 0 < n <= len(xs) or self.chunk < 1:
            raise self.error(f"num_producer_inputs = {n} must be in 1..{len(xs)}, chunk >= 1")
        blocks = [r.block for r in (self.producer, self.consumer, self.producer_grad, self.consumer_grad)]
        if any(r.empty for r in (self.producer, self.consumer, self.producer_grad, self.consumer_grad)):
            raise self.error("needs producer, consumer, producer_grad and consumer_grad regions")
        want = (n, 1 + len(xs) - n, n + 4, 2 + len(xs) - n)
        yields = (2, 1, n, 1 + len(xs) - n)
        for block, args, out in zip(blocks, want, yields, strict=True):
            t = block.terminator
            if len(block.args) != args or t is None or len(t.operands) != out:
                raise self.error(f"a region takes {args} arguments and yields {out} values: "
                                 "producer (p) -> (a, b); consumer (h, c) -> y; producer_grad (p, a, b, da, db) -> dp; "
                                 "consumer_grad (h, c, dy) -> (dh, dc)")
        step = self.step()
        for block in blocks[2:]:
            for v in block.terminator.operands:
                if v.type.shape != step.shape:
                    raise self.error(f"a derivative region yields cotangents of the state's step {step}, got {v.type}")
        return [v.type for v in xs]

    def reference(self, ctx: Any, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        n, axis, rank = self.num_producer_inputs, self.axis, len(self.state)
        xs, dy = [np.asarray(x) for x in arrays[:-1]], np.asarray(arrays[-1], dtype=np.float64)
        length = ctx.dim(self.state[axis])
        steps = [[time_slice(x, axis, rank, t) for x in xs] for t in range(length)]
        hs: list[Any] = []
        h: Any = 0.0
        for t in range(length):  # the forward's states (the reference keeps them all)
            a_t, b_t = ctx.run_region(self.producer, steps[t][:n])
            h = a_t.astype(np.float64) * h + b_t.astype(np.float64)
            hs.append(h)
        grads = [np.zeros(x.shape) for x in xs]
        lam: Any = 0.0
        later: Any = 0.0  # a_{t+1}
        for t in reversed(range(length)):
            dy_t = np.take(dy, [t], axis=self.out_axis)
            dh, *dc = ctx.run_region(self.consumer_grad, [hs[t], *steps[t][n:], dy_t])
            lam = dh + later * lam
            a_t, b_t = ctx.run_region(self.producer, steps[t][:n])
            later = a_t.astype(np.float64)
            before = hs[t - 1] if t else np.zeros_like(lam)
            dp = ctx.run_region(self.producer_grad, [*steps[t][:n], a_t, b_t, lam * before, lam])
            for j, d in enumerate([*dp, *dc]):
                _accumulate(grads[j], np.asarray(d, dtype=np.float64), axis, rank, t)
        return tuple(g.astype(x.dtype) for g, x in zip(grads, xs, strict=True))

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        state = float(np.prod(np.broadcast_shapes(*(a.shape for a in args[:-1]))))
        f = 20.0 * state  # the states twice (checkpoints, then a chunk at a time), the reverse step's rules
        return Cost(f, f, f"fused scan backward: {int(state)} state elements computed twice, none stored")

    def expansion(self) -> tuple[list[Operation], list[Value]]:
        """The same cotangents from the unfused ops: the producer on whole inputs, `scan.scan`, the consumer, then
        their rules (the transposed scan), with the states stored. New ops (in no block) and one value per input."""
        from sparsa.ir.autodiff import Grad

        n, xs = self.num_producer_inputs, self.xs
        g = Grad(Block())
        g.loc = self.loc
        a, b = _whole(g, self.producer, xs[:n])
        h = g.emit("scan.scan", a, b, axis=self.axis)
        (y,) = _whole(g, self.consumer, [h, *xs[n:]])
        forward = list(g.block.ops)
        g.flow(y, self.dy)
        g.reverse(forward)
        # an input given twice (two views made one by cse) gets its cotangent once: the caller sums the positions
        grads, seen = [], set()
        for x in xs:
            grads.append((g.grads.get(id(x)) if id(x) not in seen else None) or g.zeros_like(x))
            seen.add(id(x))
        ops = list(g.block.ops)
        for op in ops:
            op.parent = None
        return ops, grads


def _whole(g: Any, region: Region, args: Sequence[Value]) -> list[Value]:
    """A step region's ops on whole tensors (every step at once), their types inferred again."""
    block = region.block
    values: dict[int, Value] = {id(a): v for a, v in zip(block.args, args, strict=True)}
    for op in block.ops:
        if op.TERMINATOR:
            return [values[id(v)] for v in op.operands]
        operands = [values.get(id(v), v) for v in op.operands]
        new = type(op)(operands, (), dict(op.attributes), [], op.loc)
        types = [r.type for r in op.results] if not operands else new.infer()
        for i, t in enumerate(types):
            new.results.append(Value(t, new, i))
        g.block.append(new)
        values.update({id(r): s for r, s in zip(op.results, new.results, strict=True)})
    return []


def _accumulate(grad: np.ndarray, d: np.ndarray, axis: int, rank: int, t: int) -> None:
    """Add step t's cotangent d (the state's step shape) into grad, summed to grad's shape: over the leading dims
    grad lacks and those it has as 1, and into step t where it varies over time, else into all of it."""
    lead = d.ndim - grad.ndim
    d = d.sum(axis=tuple(range(lead))) if lead else d
    pos = axis - lead
    timed = pos >= 0 and grad.shape[pos] != 1
    keep = tuple(i for i in range(grad.ndim) if grad.shape[i] == 1 and d.shape[i] != 1)
    d = d.sum(axis=keep, keepdims=True) if keep else d
    if timed:
        index = [slice(None)] * grad.ndim
        index[pos] = slice(t, t + 1)
        grad[tuple(index)] += d
    else:
        grad += d


def fused_scan_grad(g: Any, op: Operation, xs: list[Value], dy: Value) -> list[Value]:
    """`scan.fused`'s rule: a `scan.fused_grad` of its inputs and dy, with the derivative regions built here."""
    from sparsa.ir.clone import clone_region
    from sparsa.ir.dialects.scan import consumer_parts

    parts = consumer_parts(op.consumer)
    if parts is not None and parts[2]:
        raise op.error("a fused scan whose consumer goes on after its sum (an epilogue) has no rule here: "
                       "differentiate before fuse-scan-epilogue, as m.vjp's pipeline does")
    step = TensorType(dy.type.dtype, tuple(1 if i == op.axis else d for i, d in enumerate(op.state)))
    producer_grad = derivative(op.producer, step, [step, step], yielded=True)
    consumer_grad = derivative(op.consumer, step, [op.consumer.block.terminator.operands[0].type])
    regions = [clone_region(op.producer, {}), clone_region(op.consumer, {}), producer_grad, consumer_grad]
    grad = g.op("scan.fused_grad", [*xs, dy], regions=regions, axis=op.axis,
                num_producer_inputs=op.num_producer_inputs, out_axis=op.out_axis, state=list(op.state))
    return list(grad.results)


def derivative(region: Region, step: TensorType, cotangents: Sequence[TensorType], yielded: bool = False) -> Region:
    """A region taking `region`'s arguments (then, `yielded`, the values it yields) and a cotangent per value it
    yields, and yielding the cotangent of each argument at the state's step shape: the arguments broadcast to it
    first, so no rule sums over a dim an argument lacks (zeros where none flows). With `yielded` the rules read
    those arguments where they read what the region yields, so what only that needed is not computed again."""
    from sparsa.ir.autodiff import Grad

    args = [a.type for a in region.block.args]
    outs = [v.type for v in region.block.terminator.operands] if yielded else []
    block = Block([*args, *outs, *cotangents])
    g = Grad(block)
    wide = [g.broadcast_to(a, TensorType(a.type.dtype, step.shape)) for a in block.args[:len(args)]]
    inlined = g.inline(region, wide)
    grads = g.region(region, wide, list(block.args[len(args) + len(outs):]), inlined)
    for v, given in zip(inlined[0], block.args[len(args):len(args) + len(outs)], strict=False):
        v.replace_all_uses_with(given)
    block.append(YieldOp.build([d if d is not None else g.full(0.0, step) for d in grads]))
    _prune(block)
    return Region([block])


def _prune(block: Block) -> None:
    """Drop the ops nothing in the block reads (the rules' cotangents of constants, forward values unused)."""
    for op in reversed(list(block.ops)):
        if not op.TERMINATOR and not op.regions and all(not r.uses for r in op.results):
            op.erase()
