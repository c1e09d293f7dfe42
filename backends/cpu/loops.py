"""Kernels written as loops over memrefs, for the ops that are not one `linalg.generic` on tensors: running
sums and first-order scans (a loop over time around a generic on one step), concat (copies into slices of
the output), argmax and top-k (scalar search loops), iota and splat constants of symbolic shape, and the
matrix-state linear-attention scan. Working on memrefs directly leaves nothing for bufferization to
analyse; `convert-linalg-to-loops` turns the generics into loops that LLVM vectorizes where it can.
"""

from __future__ import annotations

from collections.abc import Callable

from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, memref, scf

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.lower import PARALLEL, REDUCTION, element_type, scalar_constant
from sparsa.backends.cpu.signature import Kernel
from sparsa.ir.core import Operation, Value
from sparsa.ir.types import TensorType, is_float


def _dims(rank: int) -> list[ir.AffineExpr]:
    return [ir.AffineDimExpr.get(i) for i in range(rank)]


class Ordering:
    """Comparisons of one element type under NumPy's sort order: NaN after every number (the smallest
    in a descending search), ties broken by the lower index by the callers."""

    def __init__(self, dtype: str):
        self.float = is_float(dtype)

    def _nan(self, v: ir.Value) -> ir.Value:
        return arith.CmpFOp(14, v, v).result  # uno

    def greater(self, a: ir.Value, b: ir.Value) -> ir.Value:
        if not self.float:
            return B.cmpi("gt", a, b)
        ordered = arith.CmpFOp(2, a, b).result  # ogt
        return arith.OrIOp(ordered, arith.AndIOp(self._nan(b), arith.XOrIOp(self._nan(a), B.c_int(1, 1)).result)
                           .result).result

    def equal(self, a: ir.Value, b: ir.Value) -> ir.Value:
        if not self.float:
            return B.cmpi("eq", a, b)
        return arith.OrIOp(arith.CmpFOp(1, a, b).result, arith.AndIOp(self._nan(a), self._nan(b)).result).result


class LoopKernels:
    """Mixed into `Kernels` (whose `function` and `broadcast_exprs` these use): the loop kernels of the
    module docstring."""

    def plain(self, op: Operation, inputs: list[Value], build: Callable[..., None], parts: bool = False) -> Kernel:
        """A kernel of `op` reading `inputs` and writing its results; `build(*memrefs)` makes the body."""
        name, entry = self.function(op, [v.type for v in inputs] + [r.type for r in op.results], parts)
        with ir.InsertionPoint(entry):
            build(*entry.arguments)
            func.ReturnOp([])
        return Kernel(name, op, inputs, list(op.results), "parts" if parts else "none")

    # ---- splats and iota of any (symbolic) shape ---------------------------------------------------------
    def kernel_ConstantOp(self, op: Operation) -> Kernel:
        t = op.result.type

        def build(out: ir.Value) -> None:
            v = scalar_constant(element_type(t.dtype), op.value)
            B.memref_generic([], out, _dims(t.rank), [PARALLEL] * t.rank, lambda _: v)

        return self.plain(op, [], build)

    def kernel_IotaOp(self, op: Operation) -> Kernel:
        et = element_type(op.result.type.dtype)

        def build(out: ir.Value) -> None:
            B.memref_generic([], out, _dims(1), [PARALLEL],
                             lambda _: arith.IndexCastOp(et, linalg.IndexOp(0).result).result)

        return self.plain(op, [], build)

    # ---- recurrences along an axis -----------------------------------------------------------------------
    def recurrence(self, out: ir.Value, axis: int, operands: list[tuple[ir.Value, TensorType]],
                   h0: tuple[ir.Value, TensorType] | None, start: float | int,
                   step: Callable[..., ir.Value]) -> None:
        """out[t] = step(operands at t..., out[t-1]) along `axis`, with out[-1] = h0 (or `start`). The
        operands broadcast to out (NumPy rules); each step is one generic over the other axes."""
        rank = ir.MemRefType(out.type).rank
        d = _dims(rank)
        kinds = [PARALLEL] * rank
        et = ir.MemRefType(out.type).element_type
        sizes = B.sizes_of(out)
        sizes[axis] = 1
        f = B.loop(0, B.mdim(out, axis))
        with ir.InsertionPoint(f.body):
            t = f.induction_variable
            ins = [self.step_view(m, tt, axis, rank, t) for m, tt in operands]
            cur = B.subview(out, [t if i == axis else 0 for i in range(rank)], sizes)
            first = B.if_(B.cmpi("eq", t, B.c_index(0)), has_else=True)
            with ir.InsertionPoint(first.then_block):
                if h0 is None:
                    B.memref_generic(ins, cur, d, kinds, lambda *a: step(*a[:-1], scalar_constant(et, start)))
                else:
                    state = [i for i in range(rank) if i != axis]
                    lead = len(state) - h0[1].rank
                    exprs = [ir.AffineConstantExpr.get(0) if s == 1 else d[state[lead + j]]
                             for j, s in enumerate(h0[1].shape)]
                    B.memref_generic(ins + [(h0[0], exprs)], cur, d, kinds, lambda *a: step(*a[:-1]))
                scf.YieldOp([])
            with ir.InsertionPoint(first.else_block):
                prev = B.subview(out, [B.sub(t, B.c_index(1)) if i == axis else 0 for i in range(rank)], sizes)
                B.memref_generic(ins + [(prev, d)], cur, d, kinds, lambda *a: step(*a[:-1]))
                scf.YieldOp([])
            scf.YieldOp([])

    def step_view(self, m: ir.Value, t: TensorType, axis: int, rank: int, step: ir.Value) -> tuple[ir.Value, list]:
        """Step `step` along `axis` of an operand right-aligned to a rank-`rank` output, with its exprs
        (an operand without the axis is the same at every step)."""
        exprs = self.broadcast_exprs(t, rank)
        pos = axis - (rank - t.rank)
        if pos < 0 or t.shape[pos] == 1:
            return m, exprs
        sizes = B.sizes_of(m)
        sizes[pos] = 1
        return B.subview(m, [step if i == pos else 0 for i in range(t.rank)], sizes), exprs

    def kernel_ScanOp(self, op: Operation) -> Kernel:
        """h[t] = a[t] * h[t-1] + b[t] along the axis (the unfused scan; fuse-scan usually replaces it)."""
        inputs = [op.a, op.b] + ([op.h0] if op.h0 is not None else [])
        axis = op.axis % op.result.type.rank

        def build(*args: ir.Value) -> None:
            h0 = (args[2], op.h0.type) if op.h0 is not None else None
            self.recurrence(args[len(inputs)], axis, [(args[0], op.a.type), (args[1], op.b.type)], h0, 0.0,
                            lambda a, b, h: arith.AddFOp(arith.MulFOp(a, h).result, b).result)

        return self.plain(op, inputs, build)

    def kernel_CumsumOp(self, op: Operation) -> Kernel:
        axis = op.axis % op.x.type.rank
        add = arith.AddFOp if is_float(op.x.type.dtype) else arith.AddIOp

        def build(x: ir.Value, out: ir.Value) -> None:
            self.recurrence(out, axis, [(x, op.x.type)], None, 0, lambda v, h: add(h, v).result)

        return self.plain(op, [op.x], build)

    # ---- concat ------------------------------------------------------------------------------------------
    def kernel_ConcatOp(self, op: Operation) -> Kernel:
        rank = op.result.type.rank
        axis = op.axis % rank
        d = _dims(rank)

        def build(*args: ir.Value) -> None:
            out, offset = args[-1], B.c_index(0)
            for m in args[:-1]:
                sizes = B.sizes_of(m)
                view = B.subview(out, [offset if i == axis else 0 for i in range(rank)], sizes)
                B.memref_generic([(m, d)], view, d, [PARALLEL] * rank, lambda v, _: v)
                offset = B.add(offset, B.as_index(sizes[axis]))

        return self.plain(op, list(op.inputs), build)

    # ---- searches ----------------------------------------------------------------------------------------
    def kernel_ArgmaxOp(self, op: Operation) -> Kernel:
        """The first index of the largest value along the axis (a NaN counts as the largest, as NumPy)."""
        t = op.x.type
        axis = op.axis % t.rank
        order = Ordering(t.dtype)

        def build(x: ir.Value, out: ir.Value) -> None:
            sizes = B.sizes_of(x)
            kept = [i for i in range(t.rank) if i != axis]
            with B.nest([sizes[i] for i in kept]) as ivs:
                at = dict(zip(kept, ivs, strict=True))
                first = B.load(x, *[at.get(i, 0) for i in range(t.rank)])
                search = B.loop(1, sizes[axis], 1, [first, B.c_index(0)])
                with ir.InsertionPoint(search.body):
                    j = search.induction_variable
                    best, where = search.inner_iter_args
                    v = B.load(x, *[at.get(i, j) for i in range(t.rank)])
                    # NaN first: NumPy's argmax returns the first NaN
                    take = order.greater(v, best) if not order.float else arith.AndIOp(
                        arith.XOrIOp(arith.CmpFOp(14, best, best).result, B.c_int(1, 1)).result,
                        arith.CmpFOp(9, v, best).result).result  # best is not NaN, and v > best or v is NaN
                    scf.YieldOp([B.select(take, v, best), B.select(take, j, where)])
                index = [at[i] if i != axis else 0 for i in range(t.rank)] if op.keepdim else ivs
                B.store(B.as_i64(search.results[1]), out, *index)

        return self.plain(op, [op.x], build)

    def kernel_TopkOp(self, op: Operation) -> Kernel:
        """One pass over each row keeping its best k so far, sorted, in the output row: an element that beats
        the k-th (or fills a free place) is bubbled in from the top, each place it passes shifting down
        one. Strictly greater wins, so ties keep the lower index first and NaNs come last: NumPy's stable
        descending sort. Few elements beat the k-th of a random row, so most cost one compare. Rows (dim 0
        and the dims after it but the last) are split over threads."""
        t = op.x.type
        order = Ordering(t.dtype)

        def build(x: ir.Value, values: ir.Value, indices: ir.Value, part: ir.Value, parts: ir.Value) -> None:
            sizes = B.sizes_of(x)
            n = sizes[-1]
            lead = B.loop(part, sizes[0] if t.rank > 1 else 1, parts)
            with ir.InsertionPoint(lead.body):
                with B.nest(sizes[1:-1]) as inner:
                    ivs = [lead.induction_variable] + inner if t.rank > 1 else []
                    self.topk_row(order, x, values, indices, ivs, n, op.k)
                scf.YieldOp([])

        return self.plain(op, [op.x], build, parts=True)

    def topk_row(self, order: Ordering, x: ir.Value, values: ir.Value, indices: ir.Value, ivs: list, n: B.Size,
                 top: int) -> None:
        """The row at `ivs`: its `top` best (value, index) pairs into values and indices, in order."""
        if top == 0:
            return
        k = B.c_index(top)
        scan = B.loop(0, n, 1, [B.c_index(0)])
        with ir.InsertionPoint(scan.body):
            j, count = scan.induction_variable, scan.inner_iter_args[0]
            v = B.load(x, *ivs, j)
            room = B.cmpi("lt", count, k)
            worth = arith.OrIOp(room, order.greater(v, B.load(values, *ivs, B.minsi(count, B.c_index(top - 1))))
                                ).result
            enter = B.if_(worth)
            with ir.InsertionPoint(enter.then_block):
                self.bubble_in(order, values, indices, ivs, v, B.as_i64(j), count, top)
                scf.YieldOp([])
            scf.YieldOp([B.select(room, B.add(count, B.c_index(1)), count)])

    @staticmethod
    def bubble_in(order: Ordering, values: ir.Value, indices: ir.Value, ivs: list, v: ir.Value, j: ir.Value,
                  count: ir.Value, k: int) -> None:
        """Place (v, j) among the row's first `count` sorted entries: from the top, the first place it beats
        (or the first free one) takes it, and every place after takes what the one before held."""
        walk = B.loop(0, k, 1, [v, j, B.c_int(0, 1)])
        with ir.InsertionPoint(walk.body):
            q = walk.induction_variable
            cv, ci, shifting = walk.inner_iter_args
            held_v, held_i = B.load(values, *ivs, q), B.load(indices, *ivs, q)
            take = arith.OrIOp(arith.OrIOp(shifting, B.cmpi("ge", q, count)).result,
                               order.greater(cv, held_v)).result
            B.store(B.select(take, cv, held_v), values, *ivs, q)
            B.store(B.select(take, ci, held_i), indices, *ivs, q)
            scf.YieldOp([B.select(take, held_v, cv), B.select(take, held_i, ci), take])

    # ---- the matrix-state scan -----------------------------------------------------------------------------
    def kernel_LinearAttentionOp(self, op: Operation) -> Kernel:
        """S_t = a_t S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, streamed over time with the [Dk, Dv] state in one
        buffer that stays in cache; the [L, Dk, Dv] states are never stored. The host flattens the batch
        dims (q, k, v: [N, L, D], a: [N, L]) and the N sequences are split over threads. The recurrent form
        does Dk*Dv*4 flops a step, fewer than the chunked form's (`chunk` is the GPU kernel's blocking)."""
        dt = op.result.type.dtype
        dk, dv = op.q.type.shape[-1], op.v.type.shape[-1]
        flat = [TensorType(dt, (None, None, dk)), TensorType(dt, (None, None, dk)), TensorType(dt, (None, None, dv)),
                TensorType(dt, (None, None)), TensorType(dt, (None, None, dv))]
        name, entry = self.function(op, flat, True)
        q, k, v, a, out, part, parts = entry.arguments
        et = element_type(dt)
        with ir.InsertionPoint(entry):
            Dk, Dv = B.mdim(q, 2), B.mdim(v, 2)
            state = memref.AllocOp(ir.MemRefType.get([B.DYN(), B.DYN()], et), [Dk, Dv], []).result
            zero = B.c_float(0.0, et)
            seqs = B.loop(part, B.mdim(q, 0), parts)
            with ir.InsertionPoint(seqs.body):
                n = seqs.induction_variable
                B.memref_generic([], state, _dims(2), [PARALLEL] * 2, lambda _: zero)
                steps = B.loop(0, B.mdim(q, 1))
                with ir.InsertionPoint(steps.body):
                    t = steps.induction_variable
                    decay = B.load(a, n, t)
                    qt, kt = (B.subview(m, [n, t, 0], [1, 1, Dk], drop=[0, 1]) for m in (q, k))
                    vt = B.subview(v, [n, t, 0], [1, 1, Dv], drop=[0, 1])
                    ot = B.subview(out, [n, t, 0], [1, 1, Dv], drop=[0, 1])
                    i, j = _dims(2)
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
