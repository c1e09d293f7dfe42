"""cpu lowering of `scan.fused_grad` (ir/dialects/scan_grad.py): the fused scan's reverse with channels in vector
lanes, as the forward's lane kernel (`LaneItems`), its states computed again instead of stored.

A work item (the target's `scan_vectors` vectors of channels at one index of the kept dims) runs:
1. the forward over every step, keeping the state before each chunk of `chunk` steps (checkpoints: [L/chunk, N,
   lanes] per item, where the unfused backward stored [L, N] states per channel);
2. the chunks from the last back: the chunk's states and decays again from its checkpoint into [chunk + 1, N,
   lanes] buffers (in L2), then its steps from the last back, the state's cotangent lam and the next step's decay
   a_{t+1} kept per N in L1, the derivative regions run on vectors (the producer's rules read the decay kept: its
   exp is made twice a step in all, not four times).

The regions yield cotangents of the state's step shape; each is summed to its input's shape here: over N by a
sum of vectors, over channels by one horizontal sum a step, over time in an accumulator per item. An input that
items share (one lacking the channel dim or a kept dim: Mamba's B, C and A) is accumulated into a partial per
thread (zeroed), summed after the kernel; the others are written once, where they are.
Where the lane plan does not hold (no channel dim, strided channels, region ops the lanes do not run), the
backend puts the op's expansion in its place (`CpuBackend.legalize`): the unfused ops, the states stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func, scf, vector

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.context import HOSTED, KERNELS, LAUNCHES, CpuLoweringError, KernelContext
from sparsa.backends.cpu.scan import LANE_OPS, LaneItems, _lanes, lane_plan, state_axis
from sparsa.backends.cpu.signature import Hosted, Kernel, Scratch
from sparsa.backends.cpu.threads import num_threads
from sparsa.ir.core import Operation
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.scan_grad import FusedScanGradOp
from sparsa.ir.types import TensorType, numpy_dtype

VIEWS = (S.ExpandDimsOp, S.SqueezeOp, S.BroadcastToOp)  # the same lane values (the regions' broadcasts)


def grad_lane_plan(op: Operation) -> tuple[int, int | None] | None:
    """The forward's lane plan (`lane_plan` on the fused scan's inputs), where the derivative regions are made of
    LANE_OPS, views and constants on float32; else None."""
    if op.dy.type.dtype != "f32":
        return None
    plan = lane_plan(op, op.xs)
    if plan is None:
        return None
    for region in (op.producer_grad, op.consumer_grad):
        for o in region.block.ops[:-1]:
            if not isinstance(o, LANE_OPS + VIEWS + (T.ConstantOp,)) or o.results[0].type.dtype != "f32":
                return None
    return plan


def shared(op: Operation, plan: tuple[int, int | None]) -> list[bool]:
    """Per input: whether work items share its cotangent (it lacks the channel dim or a kept dim that may be more
    than 1), so each thread adds into a partial of its own."""
    c, r = plan
    rank = len(op.state)
    kept = [i for i in range(rank) if i not in (op.axis, c, r) and op.state[i] != 1]
    return [any(state_axis(v, i, rank) is None for i in [c, *kept]) for v in op.xs]


@KERNELS.lowers(FusedScanGradOp)
def fused_scan_grad_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """Module docstring. Arguments: the inputs, dy, a partial [parts, ...] per shared cotangent, the cotangents."""
    plan = grad_lane_plan(op)
    if plan is None:
        raise CpuLoweringError("scan.fused_grad needs its channels in vector lanes here (legalize expands it "
                               "otherwise)", op.loc)
    c, r = plan
    xs, n, axis = op.xs, op.num_producer_inputs, op.axis
    share = shared(op, plan)
    part_types = [TensorType(v.type.dtype, (None, *v.type.shape)) for v, s in zip(xs, share, strict=True) if s]
    name, entry = cx.function(op, [v.type for v in op.inputs] + part_types + [v.type for v in xs], True)
    args = list(entry.arguments)
    ins, dym = args[:len(xs)], args[len(xs)]
    partials = iter(args[len(xs) + 1:len(xs) + 1 + len(part_types)])
    outs = args[len(xs) + 1 + len(part_types):-2]
    part, parts = args[-2:]
    targets = [next(partials) if s else o for s, o in zip(share, outs, strict=True)]
    chunk = op.chunk
    with ir.InsertionPoint(entry):
        reassoc = ir.Attribute.parse("#arith.fastmath<reassoc>")
        li = LaneItems(cx, op, xs, ins, c, r)
        vt, NR, L = li.vt, li.NR, li.L
        zero_i = B.c_index(0)
        chunks = B.ceil_div(L, chunk)
        state, lam, later = li.buffer(NR), li.buffer(NR), li.buffer(NR)
        marks = li.buffer(B.mul(chunks, NR))  # the state before each chunk
        hs = li.buffer(B.mul(B.c_index(chunk + 1), NR))  # a chunk's states, after the one before it
        decays = li.buffer(B.mul(B.c_index(chunk), NR))  # and its a_t
        b_read = bool(op.producer_grad.block.args[n + 1].uses)  # (what the rules read of b_t: made again)
        pos = [(li.pos(v, axis) is not None, r is not None and li.pos(v, r) is not None, li.pos(v, c) is not None)
               for v in xs]
        accs = {j: li.buffer(NR if has_r else B.c_index(1)) for j, (timed, has_r, _) in enumerate(pos) if not timed}

        def row(buf: ir.Value, i: ir.Value) -> ir.Value:
            return vector.LoadOp(vt, buf, [i, zero_i]).result

        def put(v: ir.Value, buf: ir.Value, i: ir.Value) -> None:
            vector.StoreOp(v, buf, [i, zero_i])

        def forward(t: ir.Value, h_at: Any, to: Any, keep: Any = None) -> None:
            """One step of the recurrence: the state read from h_at(k), written to to(k) (a_t to keep(k))."""
            step = li.step(t)
            each = B.loop(0, NR)
            with ir.InsertionPoint(each.body):
                k = each.induction_variable
                a, b = _lanes(op.producer, li.now(step, t, k)[:n], vt)
                buf, i = to(k)
                put(vector.FMAOp(a, row(*h_at(k)), b).result, buf, i)
                if keep is not None:
                    put(a, *keep(k))
                scf.YieldOp([])

        def store(j: int, g: ir.Value, t: ir.Value | None, k: ir.Value) -> None:
            """Cotangent lane value g of input j (summed over what it lacks but channels) at step t, index k."""
            v, m = xs[j], targets[j]
            idx = li.index(v, t, k)
            if share[j]:
                idx = [part, *idx]
            if not pos[j][2]:  # no channels: one horizontal sum of the item's lanes
                s = vector.ReductionOp(li.et, ir.Attribute.parse("#vector.kind<add>"),
                                       arith.SelectOp(li.mask, g, li.zeros).result, fastmath=reassoc).result
                B.store(arith.AddFOp(B.load(m, *idx), s).result if share[j] else s, m, *idx)
                return
            if t is not None:  # channels contiguous (the lane plan)
                if share[j]:
                    g = arith.AddFOp(vector.MaskedLoadOp(vt, m, idx, li.mask, li.zeros).result, g).result
                vector.MaskedStoreOp(m, idx, li.mask, g)
                return
            rank = v.type.rank + (1 if share[j] else 0)
            lanes_at = ir.AffineMap.get(rank, 0, [ir.AffineDimExpr.get(li.pos(v, c) + (1 if share[j] else 0))])
            if share[j]:
                g = arith.AddFOp(vector.TransferReadOp(vt, m, idx, lanes_at, li.zero, [False]).result, g).result
            vector.TransferWriteOp(None, g, m, idx, lanes_at, [False])

        items = B.loop(part, li.total, parts)
        with ir.InsertionPoint(items.body):
            li.item(items.induction_variable)
            for buf, rows in [(state, NR), (lam, NR), (later, NR)] + [(a, NR if pos[j][1] else B.c_index(1))
                                                                       for j, a in accs.items()]:
                li.fill(buf, rows)
            # 1. the forward, keeping the state before each chunk
            marking = B.loop(0, chunks)
            with ir.InsertionPoint(marking.body):
                ci = marking.induction_variable
                B.each(NR, lambda k, ci=ci: put(row(state, k), marks, B.add(B.mul(ci, NR), k)))
                t0 = B.mul(ci, B.c_index(chunk))
                steps = B.loop(t0, B.minsi(B.add(t0, B.c_index(chunk)), L))
                with ir.InsertionPoint(steps.body):
                    forward(steps.induction_variable, lambda k: (state, k), lambda k: (state, k))
                    scf.YieldOp([])
                scf.YieldOp([])
            # 2. the chunks from the last back
            back = B.loop(0, chunks)
            with ir.InsertionPoint(back.body):
                ci = B.sub(B.sub(chunks, B.c_index(1)), back.induction_variable)
                t0 = B.mul(ci, B.c_index(chunk))
                t1 = B.minsi(B.add(t0, B.c_index(chunk)), L)
                B.each(NR, lambda k: put(row(marks, B.add(B.mul(ci, NR), k)), hs, k))
                steps = B.loop(t0, t1)
                with ir.InsertionPoint(steps.body):
                    t = steps.induction_variable
                    s = B.sub(t, t0)
                    forward(t, lambda k: (hs, B.add(B.mul(s, NR), k)),
                            lambda k: (hs, B.add(B.mul(B.add(s, B.c_index(1)), NR), k)),
                            lambda k: (decays, B.add(B.mul(s, NR), k)))
                    scf.YieldOp([])
                rev = B.loop(0, B.sub(t1, t0))
                with ir.InsertionPoint(rev.body):
                    s = B.sub(B.sub(B.sub(t1, t0), B.c_index(1)), rev.induction_variable)
                    t = B.add(t0, s)
                    step = li.step(t, back=True)
                    dy = vector.MaskedLoadOp(vt, dym, li.out_index(op, t), li.mask, li.zeros).result
                    over_k = [j for j, (timed, has_r, _) in enumerate(pos) if timed and not has_r]
                    each = B.loop(0, NR, 1, [li.zeros] * len(over_k))
                    with ir.InsertionPoint(each.body):
                        k = each.induction_variable
                        now = li.now(step, t, k)
                        h = row(hs, B.add(B.mul(B.add(s, B.c_index(1)), NR), k))
                        before = row(hs, B.add(B.mul(s, NR), k))
                        dh, *dc = _lanes(op.consumer_grad, [h, *now[n:], dy], vt)
                        lam_t = vector.FMAOp(row(later, k), row(lam, k), dh).result
                        a = row(decays, B.add(B.mul(s, NR), k))
                        b = _lanes(op.producer, now[:n], vt)[1] if b_read else li.zeros
                        put(a, later, k)
                        put(lam_t, lam, k)
                        dp = _lanes(op.producer_grad, [*now[:n], a, b, arith.MulFOp(lam_t, before).result, lam_t],
                                    vt)
                        sums = []
                        for j, g in enumerate([*dp, *dc]):
                            timed, has_r, _ = pos[j]
                            if j in accs:
                                at = k if has_r else zero_i
                                put(arith.AddFOp(row(accs[j], at), g).result, accs[j], at)
                            elif has_r:
                                store(j, g, t, k)
                            else:
                                sums.append(arith.AddFOp(each.inner_iter_args[len(sums)], g).result)
                        scf.YieldOp(sums)
                    for j, g in zip(over_k, each.results, strict=True):
                        store(j, g, t, zero_i)
                    scf.YieldOp([])
                scf.YieldOp([])
            for j, buf in accs.items():  # the inputs that do not vary over time: once per item
                if pos[j][1]:
                    B.each(NR, lambda k, j=j, buf=buf: store(j, row(buf, k), None, k))
                else:
                    store(j, row(buf, zero_i), None, zero_i)
            scf.YieldOp([])
        func.ReturnOp([])
    return Kernel(name, op, list(op.inputs), list(op.results), "parts")


def _partials(k: Kernel) -> list[tuple[int, Scratch]]:
    op = k.op
    return [(j, Scratch(TensorType(v.type.dtype, (None, *v.type.shape)),
                        lambda known, ctx, v=v: (ctx.threads, *known[id(v)]), f"d{j}_parts"))
            for j, (v, s) in enumerate(zip(op.xs, shared(op, grad_lane_plan(op)), strict=True)) if s]


@HOSTED.lowers(FusedScanGradOp)
def hosted_grad(cx: KernelContext, op: Operation, k: Kernel) -> Hosted:
    """Zeroed partials, one per thread, for the shared cotangents, summed into them after the kernel."""
    parts = _partials(k)
    return Hosted(args=[*k.inputs, *[s for _, s in parts], *k.outputs], zeroed=[s for _, s in parts],
                  sum_parts=[(s, op.results[j]) for j, s in parts])


@LAUNCHES.lowers(FusedScanGradOp)
def launch_grad(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """The same on the Python host: a part per thread, each into its own partials."""
    op = k.op
    outs = [np.empty(x.shape, numpy_dtype(v.type.dtype)) for x, v in zip(ins, op.xs, strict=False)]
    threads = num_threads()
    parts = {j: np.zeros((threads, *ins[j].shape), outs[j].dtype) for j, _ in _partials(k)}
    fn.parts(k, [*ins, *parts.values(), *outs], threads)
    for j, p in parts.items():
        np.sum(p, axis=0, out=outs[j])
    return outs
