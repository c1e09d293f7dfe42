"""cpu lowerings of the `scan` dialect: the unfused first-order scan (a loop over time around a generic on
one step), the fused scan streamed over time in blocks of channels with the state in cache, and the
matrix-state linear-attention scan."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, memref, scf, vector

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.build import Size
from sparsa.backends.cpu.context import (
    HOSTED,
    KERNELS,
    LAUNCHES,
    PARALLEL,
    REDUCTION,
    SCALARS,
    CpuLoweringError,
    KernelContext,
    element_type,
)
from sparsa.backends.cpu.signature import Hosted, Kernel, Scratch
from sparsa.backends.cpu.threads import num_threads
from sparsa.ir.core import Operation, Region, Value
from sparsa.ir.dialects import scan as SC
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.scan import state_axis
from sparsa.ir.types import TensorType, numpy_dtype

SCAN_BLOCK = 128  # channels of a fused scan done together: a [.., 128, N] state block and its temporaries in L1


@KERNELS.lowers(SC.ScanOp)
def scan_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """h[t] = a[t] * h[t-1] + b[t] along the axis (the unfused scan; fuse-scan usually replaces it); transposed,
    h[t] = a[t+1] * h[t+1] + b[t] from the last step back."""
    inputs = [op.a, op.b] + ([op.h0] if op.h0 is not None else [])
    rank = op.result.type.rank
    axis = op.axis % rank
    # the threads split the dim next to the time axis (a state's channels), each part scanning its slice
    split = axis + 1 if axis + 1 < rank else axis - 1

    def build(*args: ir.Value) -> None:
        out, part, parts = args[len(inputs)], args[-2], args[-1]
        if split < 0:  # a 1-D scan: one part does it
            only = B.if_(B.cmpi("eq", part, B.c_index(0)))
            with ir.InsertionPoint(only.then_block):
                scan_slice(args[0], args[1], args[2] if op.h0 is not None else None, out)
                scf.YieldOp([])
            return
        n = B.mdim(out, split)
        lo = arith.DivUIOp(B.mul(n, part), parts).result
        width = B.sub(arith.DivUIOp(B.mul(n, B.add(part, B.c_index(1))), parts).result, lo)

        def cut(m: ir.Value, t: TensorType, at: int) -> ir.Value:  # m's slice of the split dim (at: its axis)
            if at < 0 or t.shape[at] == 1:
                return m
            sizes = B.sizes_of(m)
            sizes[at] = width
            return B.subview(m, [lo if i == at else 0 for i in range(t.rank)], sizes)

        h0 = None
        if op.h0 is not None:  # h0's dims are the state's without the time axis, right-aligned
            state = [i for i in range(rank) if i != axis]
            h0 = cut(args[2], op.h0.type, state.index(split) - (len(state) - op.h0.type.rank))
        scan_slice(*(cut(args[i], v.type, split - (rank - v.type.rank)) for i, v in enumerate([op.a, op.b])), h0,
                   cut(out, op.result.type, split))

    def scan_slice(a: ir.Value, b: ir.Value, h0: ir.Value | None, out: ir.Value) -> None:
        cx.recurrence(out, axis, [(a, op.a.type), (b, op.b.type)], (h0, op.h0.type) if h0 is not None else None,
                      0.0, lambda x, y, h: arith.AddFOp(arith.MulFOp(x, h).result, y).result,
                      reverse=op.transpose, ahead=(0,) if op.transpose else ())

    return cx.plain(op, inputs, build, parts=True)


# ---- scans ----------------------------------------------------------------------------------------
# Region ops the lane-vector scan evaluates on vectors of channels with their scalar rules (tensor.py): each is
# arith on its operands and constants made like them, or B.exp
# A lane-vector scan item takes the target's `scan_vectors` vectors of channels (as one vector of that many
# times the lanes): its rows of the inputs lie a row of channels apart, so each visit reads 4 cache lines (or 8)
# instead of 1 (Mamba's D = 1024 at L = 2048: 36 -> 15 ms on one AVX-512 core), and the exps of the vectors are
# independent work for the core meanwhile.
AHEAD = 16  # time steps the lane-vector scan asks for its channel inputs' rows ahead of reading them
LINE_FLOATS = 16  # float32s of a 64-byte cache line: an item's row of channels is prefetched a line at a time
VIEWS = (S.SqueezeOp, S.ExpandDimsOp)  # in an epilogue: the same lane value
LANE_OPS = (T.MulOp, T.AddOp, T.SubOp, T.DivOp, T.ExpOp, T.NegOp, T.MaximumOp, T.MinimumOp, T.SigmoidOp, T.SiluOp)


@KERNELS.lowers(SC.FusedScanOp)
def fused_scan_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """h = a_t * h + b_t streamed over time: per step the producer region makes a_t, b_t from step t of
    the inputs, the consumer reduces h to y_t, stored at step t of the output; h is never stored.
    Where `lane_plan` allows, `lane_scan_kernel` instead; otherwise:

    Where a state dim runs through to the output (Mamba's channels), the kernel takes SCAN_BLOCK of it
    at a time, every time step for one block before the next: the block's state and temporaries stay
    in L1, and blocks are split over threads (part, parts)."""
    inputs = list(op.inputs)
    rank, axis, n = len(op.state), op.axis, op.num_producer_inputs
    y_type = op.consumer.block.terminator.operands[0].type
    plan = lane_plan(op)
    if plan is not None:
        return lane_scan_kernel(cx, op, *plan)
    channel = _channel_dim(op, y_type)
    name, entry = cx.function(op, [v.type for v in inputs] + [op.result.type], True)
    args = entry.arguments
    out, part, parts = args[len(inputs):]
    dt = op.result.type.dtype
    et = element_type(dt)
    with ir.InsertionPoint(entry):
        ts = [B.read(m) for m in args[:len(inputs)]]
        state = TensorType(dt, tuple(op.state))
        sources = cx.out_sources(state, [(t, v.type) for t, v in zip(ts, inputs, strict=True)])
        timed = [(t, v) for t, v in zip(ts, inputs, strict=True)
                 if 0 <= axis - (rank - v.type.rank) and v.type.shape[axis - (rank - v.type.rank)] != 1]
        if not timed:
            raise CpuLoweringError("a fused scan needs an input that runs over time", op.loc)
        L = B.mdim(timed[0][0], axis - (rank - timed[0][1].type.rank))
        sizes = [1 if i == axis else (d if isinstance(d, int) else B.mdim(*sources[i])) for i, d in
                 enumerate(state.shape)]
        if channel is None:  # one block: the whole state, on the first thread
            blocks, width = B.select(B.cmpi("eq", part, B.c_index(0)), B.c_index(1), B.c_index(0)), None
        else:
            c, yc = channel
            total = B.as_index(sizes[c])
            blocks = B.ceil_div(total, SCAN_BLOCK)
            cx.dim_map = {state.shape[c]: None}
        chunks = B.loop(part, blocks, parts)
        with ir.InsertionPoint(chunks.body):
            views, offs_y, ysz = ts, {}, {}
            block_sizes = list(sizes)
            if channel is not None:
                c0 = B.mul(chunks.induction_variable, B.c_index(SCAN_BLOCK))
                width = B.minsi(B.c_index(SCAN_BLOCK), B.sub(total, c0))
                views = [aligned_slice(cx, t, v.type, c, rank, c0, width) for t, v in zip(ts, inputs, strict=True)]
                block_sizes[c] = width
                offs_y, ysz = {yc: c0}, {yc: width}
            h0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty(block_sizes, et)])
            cx.untiled = True
            loop = B.loop(0, L, 1, [h0])
            with ir.InsertionPoint(loop.body):
                t = loop.induction_variable
                sliced = [aligned_slice(cx, x, v.type, axis, rank, t, 1)
                          for x, v in zip(views, inputs, strict=True)]
                a, bb = cx.inline(op.producer, sliced[:n], False)
                prod_types = [v.type for v in op.producer.block.terminator.operands]
                h = loop.inner_iter_args[0]
                dd = [ir.AffineDimExpr.get(i) for i in range(rank)]
                step = state.with_shape(tuple(1 if i == axis else d for i, d in enumerate(state.shape)))
                # updated in place (h is the generic's own output), so the loop carries one buffer
                new = cx.generic(step, [(a, cx.broadcast_exprs(prod_types[0], rank)),
                                          (bb, cx.broadcast_exprs(prod_types[1], rank))], h,
                                   [PARALLEL] * rank, dd,
                                   lambda x, y, hv: arith.AddFOp(arith.MulFOp(x, hv).result, y).result)
                (y,) = cx.inline(op.consumer, [new] + sliced[n:], False)
                yt = ir.RankedTensorType(y.type)
                offs = [t if i == op.out_axis else offs_y.get(i, 0) for i in range(yt.rank)]
                ysizes = [1 if i == op.out_axis else ysz.get(i, s if s != B.DYN() else B.mdim(y, i))
                          for i, s in enumerate(yt.shape)]
                B.write(y, B.subview(out, offs, ysizes))
                scf.YieldOp([new])
            cx.untiled = False
            scf.YieldOp([])
        cx.dim_map = {}
        func.ReturnOp([])
    return Kernel(name, op, inputs, [op.result], "parts")


def lane_plan(op: Operation, inputs: list[Value] | None = None) -> tuple[int, int | None] | None:
    """(the channel dim, the dim the consumer sums over or None) where the lane-vector scan applies: float32; a
    channel dim (`_channel_dim`) last in the output and contiguous in every input that runs over time and has it;
    producer and consumer regions of LANE_OPS and constants, the consumer's sum one over one state dim (the rest of
    the state, other than time and channel, kept as work items) and its epilogue reading no input along that
    dim. Else None. (`inputs`: the fused scan's, where op is its backward.)"""
    inputs = list(op.inputs) if inputs is None else inputs
    y = op.consumer.block.terminator.operands[0]
    parts = SC.consumer_parts(op.consumer)
    channel = _channel_dim(op, y.type, inputs)
    rank, axis = len(op.state), op.axis
    if channel is None or y.type.dtype != "f32" or any(v.type.dtype != "f32" for v in inputs):
        return None
    c, yc = channel
    if any(d != 1 for d in y.type.shape[yc + 1:]):
        return None
    for v in inputs:
        p = c - (rank - v.type.rank)
        timed = 0 <= axis - (rank - v.type.rank) and v.type.shape[axis - (rank - v.type.rank)] != 1
        if p >= 0 and v.type.shape[p] != 1 and timed and any(d != 1 for d in v.type.shape[p + 1:]):
            return None
    if parts is None:
        return None
    summed, _, after = parts
    epilogue = {id(o) for o in after}
    for region in (op.producer, op.consumer):
        for o in region.block.ops[:-1]:
            if o is summed or isinstance(o, VIEWS) and id(o) in epilogue:
                continue
            if not isinstance(o, LANE_OPS + (T.ConstantOp,)) or o.results[0].type.dtype != "f32":
                return None
    if summed is None:
        return (c, None) if y.type.rank == rank else None
    if summed.x.type.rank != rank or len(summed.axes) != 1 or SC.result_dims(op, y.type) is None:
        return None
    r = summed.axes[0] % rank
    if SC.epilogue_reads_along(op, r, inputs):
        return None
    return (c, r) if r not in (axis, c) else None


class LaneItems:
    """What a lane-vector scan kernel (forward or backward) knows of its inputs' dims: a work item is the target's
    `scan_vectors` vectors of channels (state dim c; one vector of that many times the target's lanes) at one
    index of the kept dims (the state's others but time and r, the summed dim). Built in the kernel's entry block;
    `item` starts an item, then `read` gives an input's lane value at a time step and an index of r."""

    def __init__(self, cx: KernelContext, op: Operation, inputs: list[Value], ms: list[ir.Value], c: int,
                 r: int | None):
        self.inputs, self.ms, self.c, self.r = inputs, ms, c, r
        self.rank, self.axis = len(op.state), op.axis
        self.et = element_type(op.inputs[0].type.dtype)
        channels = {v.type.shape[self.pos(v, c)] for v in inputs if self.pos(v, c) is not None}
        static = next(iter(channels)) if len(channels) == 1 and isinstance(next(iter(channels)), int) else None
        self.lanes = cx.target.lanes() * cx.target.scan_vectors(static)
        self.vt = ir.VectorType.get([self.lanes], self.et)
        self.kept = [i for i in range(self.rank) if i not in (self.axis, c, r)]
        self.zero = B.c_float(0.0, self.et)
        self.L, self.D = self.size(self.axis), self.size(c)
        self.NR = self.size(r) if r is not None else B.c_index(1)
        self.kept_sizes = [self.size(i) for i in self.kept]
        self.blocks = B.ceil_div(self.D, self.lanes)
        self.total = self.blocks
        for n in self.kept_sizes:
            self.total = B.mul(self.total, n)
        # inputs with channels that never change over time: read once per item, one vector per index of r
        self.still = [i for i, v in enumerate(inputs) if self.pos(v, c) is not None and self.pos(v, self.axis) is None]
        self.held = {i: self.buffer(self.NR) for i in self.still}

    def pos(self, v: Value, i: int) -> int | None:
        return state_axis(v, i, self.rank)

    def size(self, i: int) -> ir.Value:
        for v, m in zip(self.inputs, self.ms, strict=True):
            if self.pos(v, i) is not None:
                return B.mdim(m, self.pos(v, i))
        return B.c_index(1)

    def buffer(self, rows: ir.Value) -> ir.Value:
        """[rows, lanes] on the heap, not the stack: rows is the data's (the deallocation pass frees it)."""
        return memref.AllocOp(ir.MemRefType.get([B.DYN(), self.lanes], self.et), [rows], []).result

    def item(self, n: ir.Value) -> None:
        """Start item n: its channels d0.. (below D: a masked load reads them, zeros past D) and kept indices;
        the inputs that do not vary over time read."""
        rest = n
        self.d0 = B.mul(arith.RemUIOp(rest, self.blocks).result, B.c_index(self.lanes))
        rest = arith.DivUIOp(rest, self.blocks).result
        self.at = {self.c: self.d0}
        for i, s in reversed(list(zip(self.kept, self.kept_sizes, strict=True))):
            self.at[i] = arith.RemUIOp(rest, s).result
            rest = arith.DivUIOp(rest, s).result
        self.mask = vector.CreateMaskOp(ir.VectorType.get([self.lanes], ir.IntegerType.get_signless(1)),
                                        [B.minsi(B.c_index(self.lanes), B.sub(self.D, self.d0))]).result
        self.zeros = vector.BroadcastOp(self.vt, self.zero).result
        for j, buf in self.held.items():
            B.each(self.NR, lambda k, j=j, buf=buf: vector.StoreOp(self.read(j, None, k), buf, [k, B.c_index(0)]))

    def index(self, v: Value, t: ir.Value | None, k: ir.Value) -> list[ir.Value]:
        idx = []
        for p in range(v.type.rank):
            i = p + (self.rank - v.type.rank)
            idx.append(B.c_index(0) if v.type.shape[p] == 1 else t if i == self.axis else k if i == self.r
                       else self.at[i])
        return idx

    def read(self, j: int, t: ir.Value | None, k: ir.Value) -> ir.Value:
        """Input j at time t, index k of r: a vector of channels, or a scalar."""
        v, m, vt = self.inputs[j], self.ms[j], self.vt
        if j in self.held and t is not None:
            return vector.LoadOp(vt, self.held[j], [k, B.c_index(0)]).result
        pc = self.pos(v, self.c)
        if pc is None:
            return B.load(m, *self.index(v, t, k))
        if j in self.held:  # once per item, whatever its strides
            return vector.TransferReadOp(vt, m, self.index(v, t, k), ir.AffineMap.get(v.type.rank, 0, [
                ir.AffineDimExpr.get(pc)]), self.zero, [False]).result
        return vector.MaskedLoadOp(vt, m, self.index(v, t, k), self.mask, self.zeros).result  # channels contiguous

    def step(self, t: ir.Value, back: bool = False) -> dict[int, ir.Value]:
        """Step t's values of the inputs that do not vary along r (read once a step), after asking for the
        channel inputs' rows AHEAD steps on: one item's rows lie D apart (a page each at D = 1024), past what the
        hardware prefetchers follow. Every cache line of the item's row is asked for: the first line alone left a
        load of each step waiting on memory (Mamba's scan at L = 2048, D = 1024, one thread on a Zen 5 through the
        runner: AVX2 code 17.5-19.3 -> 16.3-18.2 ms, AVX-512 9.3-10.0 -> 8.6-9.4). `back`: the steps go backwards
        (the backward's reverse pass), so the rows asked for are AHEAD steps before t."""
        later = arith.MaxSIOp(B.sub(t, B.c_index(AHEAD)), B.c_index(0)).result if back else \
            B.minsi(B.add(t, B.c_index(AHEAD)), B.sub(self.L, B.c_index(1)))
        for j, v in enumerate(self.inputs):
            pc = self.pos(v, self.c)
            along_r = self.r is not None and self.pos(v, self.r) is not None
            if pc is not None and self.pos(v, self.axis) is not None and not along_r:
                at = self.index(v, later, B.c_index(0))
                for q in range(0, self.lanes, LINE_FLOATS):  # every cache line of the item's channels
                    at[pc] = B.add(self.d0, B.c_index(q))
                    memref.PrefetchOp(self.ms[j], list(at), False, 3, True)
        return {j: self.read(j, t, B.c_index(0)) for j, v in enumerate(self.inputs)
                if self.r is None or self.pos(v, self.r) is None}

    def now(self, step: dict[int, ir.Value], t: ir.Value, k: ir.Value) -> list[ir.Value]:
        """Every input at time t, index k of r."""
        return [step[j] if j in step else self.read(j, t, k) for j in range(len(self.inputs))]

    def out_index(self, op: Operation, t: ir.Value) -> list[ir.Value]:
        """Where the item's step t of the consumer's result goes: its dims are the state's (`result_dims`), r as 0
        where the sum keeps it."""
        y = op.consumer.block.terminator.operands[0].type
        kept = SC.result_dims(op, y)
        return [t if i == op.out_axis else B.c_index(0) if d == self.r else self.at[d] for i, d in enumerate(kept)]

    def fill(self, buf: ir.Value, rows: ir.Value, value: ir.Value | None = None) -> None:
        """rows of buf set to `value` (zeros by default)."""
        B.each(rows, lambda k: vector.StoreOp(value if value is not None else self.zeros, buf, [k, B.c_index(0)]))


def lane_scan_kernel(cx: KernelContext, op: Operation, c: int, r: int | None) -> Kernel:
    """The fused scan with channels in vector lanes (`LaneItems`): an item's state (one vector per index of the
    summed dim r) stays in a small buffer in L1 over every time step, and the regions run on vectors (inputs
    without the channel dim broadcast, inputs that do not change over time read once per item). The consumer's
    sum over r is a sum of vectors: no horizontal reduction. For Mamba's scan that is an exp and three
    multiply-adds per state vector a step, where the blocked kernel ran each region op as a loop of its own over
    a [.., 128, N] temporary."""
    inputs = list(op.inputs)
    n = op.num_producer_inputs
    summed, before, after = SC.consumer_parts(op.consumer)
    name, entry = cx.function(op, [v.type for v in inputs] + [op.result.type], True)
    args = entry.arguments
    out, part, parts = args[len(inputs):]
    with ir.InsertionPoint(entry):
        li = LaneItems(cx, op, inputs, list(args[:len(inputs)]), c, r)
        vt = li.vt
        state = li.buffer(li.NR)
        items = B.loop(part, li.total, parts)
        with ir.InsertionPoint(items.body):
            li.item(items.induction_variable)
            li.fill(state, li.NR)
            steps = B.loop(0, li.L)
            with ir.InsertionPoint(steps.body):
                t = steps.induction_variable
                step = li.step(t)
                over = B.loop(0, li.NR, 1, [li.zeros])
                with ir.InsertionPoint(over.body):
                    k = over.induction_variable
                    now = li.now(step, t, k)
                    a, b = _lanes(op.producer, now[:n], vt)
                    h = vector.FMAOp(a, vector.LoadOp(vt, state, [k, B.c_index(0)]).result, b).result
                    vector.StoreOp(h, state, [k, B.c_index(0)])
                    (y,) = _lanes(op.consumer, [h] + now[n:], vt, before, [summed.results[0]] if summed else None)
                    scf.YieldOp([arith.AddFOp(over.inner_iter_args[0], y).result])
                y = over.results[0]
                if after:  # the epilogue, once a step on the sum: it reads inputs constant along r (`step` has them)
                    given = [li.zeros] + [step.get(j, li.zeros) for j in range(n, len(inputs))]
                    (y,) = _lanes(op.consumer, given, vt, after, None, {id(summed.results[0]): y})
                vector.MaskedStoreOp(out, li.out_index(op, t), li.mask, y)
                scf.YieldOp([])
            scf.YieldOp([])
        func.ReturnOp([])
    return Kernel(name, op, inputs, [op.result], "parts")


def _lanes(region: Region, args: list[ir.Value], vt: ir.Type, ops: list[Operation] | None = None,
           outputs: list[Value] | None = None, given: dict[int, ir.Value] | None = None) -> list[ir.Value]:
    """A LANE_OPS region's results on lane values (vectors of channels, or scalars where a value has none), by
    the ops' scalar rules; a sum over the summed dim is its operand at the current index (the caller adds). Only
    `ops` of it (else all) to `outputs` (else what it yields), with the values `given` (by value id)."""
    vals = {id(a): x for a, x in zip(region.block.args, args, strict=True)}
    vals.update(given or {})

    def vec(x: ir.Value) -> ir.Value:
        return x if isinstance(x.type, ir.VectorType) else vector.BroadcastOp(vt, x).result

    for o in region.block.ops[:-1] if ops is None else ops:
        if isinstance(o, T.ConstantOp):
            vals[id(o.results[0])] = B.c_float(float(o.value), ir.VectorType(vt).element_type)
            continue
        if isinstance(o, R.SumOp) or o.NAME in ("tensor.expand_dims", "tensor.squeeze", "tensor.broadcast_to"):
            vals[id(o.results[0])] = vals[id(o.operands[0])]  # (views: the same lane value)
            continue
        xs = [vals[id(v)] for v in o.operands]
        if any(isinstance(x.type, ir.VectorType) for x in xs):
            xs = [vec(x) for x in xs]
        vals[id(o.results[0])] = SCALARS.find(o)(o, *xs)
    return [vec(vals[id(v)]) for v in (region.block.terminator.operands if outputs is None else outputs)]


def aligned_slice(cx: KernelContext, x: ir.Value, t: TensorType, axis: int, rank: int, offset: ir.Value,
                  size: Size) -> ir.Value:
    """Elements offset..offset+size along state axis `axis` of an input of type t right-aligned to the
    rank-`rank` state (an input without that axis, or with size 1 there, is taken whole). Sizes come
    from x itself, which may already be a slice."""
    pos = axis - (rank - t.rank)
    if pos < 0 or t.shape[pos] == 1:
        return x
    sizes = B.sizes_of(x)
    sizes[pos] = size
    return B.slice_tensor(x, [offset if i == pos else 0 for i in range(t.rank)], sizes)


# ---- the matrix-state scan -----------------------------------------------------------------------------
@KERNELS.lowers(SC.LinearAttentionOp)
def linear_attention_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """S_t = a_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, streamed over time with the [Dk, Dv] state in one
    buffer that stays in cache; the [L, Dk, Dv] states are never stored. The host flattens the batch
    dims (q, k, v: [N, L, D], a: [N, L]) and the N sequences are split over threads. The recurrent form
    does Dk*Dv*4 flops a step, fewer than the chunked form's (`chunk` is the GPU kernel's blocking)."""
    dt = op.result.type.dtype
    dk, dv = op.q.type.shape[-1], op.v.type.shape[-1]
    flat = [TensorType(dt, (None, None, dk)), TensorType(dt, (None, None, dk)), TensorType(dt, (None, None, dv)),
            TensorType(dt, (None, None)), TensorType(dt, (None, None, dv))]
    name, entry = cx.function(op, flat, True)
    q, k, v, a, out, part, parts = entry.arguments
    et = element_type(dt)
    with ir.InsertionPoint(entry):
        Dk, Dv = B.mdim(q, 2), B.mdim(v, 2)
        state = memref.AllocOp(ir.MemRefType.get([B.DYN(), B.DYN()], et), [Dk, Dv], []).result
        zero = B.c_float(0.0, et)
        seqs = B.loop(part, B.mdim(q, 0), parts)
        with ir.InsertionPoint(seqs.body):
            n = seqs.induction_variable
            B.memref_generic([], state, [ir.AffineDimExpr.get(i) for i in range(2)], [PARALLEL] * 2, lambda _: zero)
            steps = B.loop(0, B.mdim(q, 1))
            with ir.InsertionPoint(steps.body):
                t = steps.induction_variable
                decay = B.load(a, n, t)
                qt, kt = (B.subview(m, [n, t, 0], [1, 1, Dk], drop=[0, 1]) for m in (q, k))
                vt = B.subview(v, [n, t, 0], [1, 1, Dv], drop=[0, 1])
                ot = B.subview(out, [n, t, 0], [1, 1, Dv], drop=[0, 1])
                i, j = [ir.AffineDimExpr.get(i) for i in range(2)]
                B.memref_generic([(kt, [i]), (vt, [j])], state, [i, j], [PARALLEL] * 2,
                                 lambda kv, vv, s: arith.AddFOp(arith.MulFOp(decay, s).result,
                                                                arith.MulFOp(kv, vv).result).result)
                B.memref_generic([], ot, [ir.AffineDimExpr.get(0)], [PARALLEL], lambda _: zero)
                # i (the reduction) outside, j inside: rows of the state are read contiguously
                B.memref_generic([(state, [i, j]), (qt, [i])], ot, [j], [REDUCTION, PARALLEL],
                                 lambda s, qv, o: arith.AddFOp(o, arith.MulFOp(s, qv).result).result)
                scf.YieldOp([])
            scf.YieldOp([])
        func.ReturnOp([])  # the deallocation pass frees the state
    return Kernel(name, op, [op.q, op.k, op.v, op.a], [op.result], "parts")


def _channel_dim(op: Operation, y: TensorType, inputs: list[Value] | None = None) -> tuple[int, int] | None:
    """A state dim of a fused scan that the consumer keeps, to cut the work into blocks along: (its axis in
    the state, its axis in the consumer's result). Where the consumer's form says which dim of its result is
    which of the state's (`result_dims`), by that; else matched by size (symbol or number), so it must occur once
    in each, other than the time axis. Every input must have it whole or not at all (size 1). The last such dim
    is taken (contiguous blocks of the innermost kept axis)."""
    state = list(op.state)
    rank = len(state)
    kept = SC.result_dims(op, y)
    for c in reversed(range(rank)):
        d = state[c]
        if c == op.axis or d is None or d == 1:
            continue
        if kept is not None:  # the consumer's form says which
            if c not in kept or y.shape[kept.index(c)] != d:  # (a dim summed with keepdim is 1 in y)
                continue
            yc = kept.index(c)
        elif state.count(d) != 1 or list(y.shape).count(d) != 1:
            continue
        else:
            yc = list(y.shape).index(d)
        if yc == op.out_axis:
            continue
        if all(v.type.shape[c - (rank - v.type.rank)] in (1, d) for v in (op.inputs if inputs is None else inputs)
               if c - (rank - v.type.rank) >= 0):
            return c, yc
    return None


@HOSTED.lowers(SC.LinearAttentionOp)
def hosted_linear_attention(cx: KernelContext, op: Operation, k: Kernel) -> Hosted | str:
    """q, k, v, the decay and the result as [N, L, .] sequences: views of their buffers, where their types have the
    same leading dims (no broadcast to copy)."""
    lead = op.result.type.shape[:-1]
    if any(v.type.shape[:-1] != lead for v in (op.q, op.k, op.v)) or op.a.type.shape != lead or None in lead:
        return "the host side of 'scan.linear_attention' broadcasting its operands is still Python"

    def sequences(v: Value) -> Scratch:  # [..., L, D] as [N, L, D]; the decay's [..., L] as [N, L]
        t = v.type
        keep = 1 if v is op.a else 2
        return Scratch(TensorType(t.dtype, (None, None) if v is op.a else (None, None, t.shape[-1])),
                       lambda known, ctx: (math.prod(known[id(v)][:t.rank - keep]), *known[id(v)][t.rank - keep:]),
                       f"{v.name_hint or 'result'}_seqs", alias=v)

    return Hosted(args=[sequences(v) for v in (op.q, op.k, op.v, op.a, op.result)])


@LAUNCHES.lowers(SC.LinearAttentionOp)
def launch_linear_attention(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """q, k, v and the decay broadcast to their common leading dims and flattened to [N, L, .] sequences."""
    op = k.op
    lead = np.broadcast_shapes(*(a.shape[:-1] for a in ins[:3]), ins[3].shape)
    n = math.prod(lead[:-1])  # (not -1: an empty length leaves it open)
    flat = [np.ascontiguousarray(np.broadcast_to(a, lead + a.shape[-1:])).reshape(n, lead[-1], a.shape[-1])
            for a in ins[:3]]
    flat.append(np.ascontiguousarray(np.broadcast_to(ins[3], lead)).reshape(n, lead[-1]))
    out = np.empty(flat[0].shape[:2] + ins[2].shape[-1:], numpy_dtype(op.result.type.dtype))
    fn.parts(k, flat + [out], num_threads())
    return [out.reshape(lead + ins[2].shape[-1:])]
