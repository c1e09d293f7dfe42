"""cpu lowerings of the `tensor` dialect's shape part: matmul (NumPy's rules, register-tiled by the schedule
when both sides are matrices), transpose, expand_dims and squeeze in kernel bodies, gathers (single elements in
scalar mode), concat as copies into slices of the output; the views the host takes without a kernel."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, memref, scf, tensor, vector

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.context import (
    HOSTED,
    KERNELS,
    LAUNCHES,
    LOWERINGS,
    PARALLEL,
    REDUCTION,
    CpuLoweringError,
    KernelContext,
    element_type,
    host,
)
from sparsa.backends.cpu.signature import Hosted, Kernel, Scratch
from sparsa.ir.core import Operation, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.types import TensorType, is_float

# views: the host reshapes, slices and broadcasts without moving data
KERNELS.lowers(S.ReshapeOp, S.ExpandDimsOp, S.SqueezeOp, S.SplitOp, S.BroadcastToOp, S.SliceOp)(host)


@LOWERINGS.lowers(S.MatmulOp)
def lower_matmul(cx: KernelContext, op: Operation) -> ir.Value:
    return matmul(cx, op, op.lhs, op.rhs)


def matmul(cx: KernelContext, op: Operation, lhs: Value, rhs: Value) -> ir.Value:
    """NumPy's matmul: batch dims broadcast; a 1-D lhs is a row and a 1-D rhs a column, dropped from the
    result. Tagged for the register-tiled schedule when both sides are matrices."""
    a, b = lhs.type, rhs.type
    out = op.result.type
    if a.rank < 1 or b.rank < 1 or not is_float(out.dtype):
        raise CpuLoweringError("cpu matmul needs float operands of rank >= 1", op.loc)
    has_m, has_n = a.rank >= 2, b.rank >= 2
    nb = out.rank - has_m - has_n
    d = [ir.AffineDimExpr.get(i) for i in range(out.rank + 1)]
    m, n, k = d[nb], d[nb + has_m], d[out.rank]
    ba, bb = a.shape[:-2], b.shape[:-2]
    batch_a = [ir.AffineConstantExpr.get(0) if s == 1 else d[nb - len(ba) + i] for i, s in enumerate(ba)]
    batch_b = [ir.AffineConstantExpr.get(0) if s == 1 else d[nb - len(bb) + i] for i, s in enumerate(bb)]
    av, bv = cx.get(lhs), cx.get(rhs)
    sources = cx.out_sources(TensorType(out.dtype, out.shape[:nb]), [(av, a.with_shape(ba)),
                                                                      (bv, b.with_shape(bb))])
    sources += [(av, a.rank - 2)] * has_m + [(bv, b.rank - 1)] * has_n
    init = cx.zero_filled(out, sources)
    result = cx.generic(out, [(av, batch_a + [m] * has_m + [k]), (bv, batch_b + [k] + [n] * has_n)], init,
                          [PARALLEL] * out.rank + [REDUCTION], d[:out.rank],
                          lambda x, y, acc: arith.AddFOp(acc, arith.MulFOp(x, y).result).result)
    if has_m and has_n:
        cx.tag(result, "matmul", out)
    return result


@LOWERINGS.lowers(S.TransposeOp)
def lower_transpose(cx: KernelContext, op: Operation) -> ir.Value:
    out = op.result.type
    x = cx.get(op.x)
    d = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
    src = [None] * out.rank
    for i, p in enumerate(op.perm):
        src[p] = d[i]
    init = cx.empty_like_dims(out, [(x, p) for p in op.perm])
    return cx.generic(out, [(x, src)], init, [PARALLEL] * out.rank, d, lambda v, _: v)


@KERNELS.lowers(S.TransposeOp)
def transpose_op_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """The last two axes swapped (a Linear's weight read as W^T under torch.compile, a weight gradient):
    `swap_last_axes`. Other permutations stay the generic (`lower_transpose`)."""
    rank = op.x.type.rank
    if rank < 2 or tuple(op.perm) != (*range(rank - 2), rank - 1, rank - 2):
        return cx.dense(op)
    return cx.plain(op, [op.x], lambda x, out, part, parts: swap_last_axes(cx, x, out, part, parts), parts=True)


def swap_last_axes(cx: KernelContext, x: ir.Value, out: ir.Value, part: ir.Value, parts: ir.Value) -> None:
    """out = x with its last two axes swapped (contiguous memrefs, rank >= 2). Blocks of lanes x lanes elements are
    read as rows of vectors, transposed in registers (`B.transpose_square`) and stored as rows of vectors; the rows
    past the last whole block, a last partial block of columns, and bools go an element at a time. Parts take
    blocks of `lanes` columns of one slice of the leading dims (each writes its own rows of out). Element by
    element, a 4 MB Linear weight took ~3.5 ms (~1 GB/s); by blocks 0.3 ms (Zen 4, two threads)."""
    rank = _rank(x)
    et = ir.MemRefType(x.type).element_type
    bits = ir.FloatType(et).width if isinstance(et, ir.FloatType) else \
        ir.IntegerType(et).width if isinstance(et, ir.IntegerType) else 0
    lanes = cx.target.lanes(bits) if bits in (32, 64) else 1
    if lanes & (lanes - 1):
        lanes = 1
    if rank != 3:  # the leading dims as one, or one of them
        groups = [range(rank - 2), [rank - 2], [rank - 1]] if rank > 3 else None
        x, out = (_three_d(m, et, groups) for m in (x, out))
    R, C = B.mdim(x, 1), B.mdim(x, 2)
    blocks = B.ceil_div(C, lanes)
    items = B.loop(part, B.mul(B.mdim(x, 0), blocks), parts)
    with ir.InsertionPoint(items.body):
        item = items.induction_variable
        b = arith.DivUIOp(item, blocks).result
        c0 = B.mul(arith.RemUIOp(item, blocks).result, B.c_index(lanes))

        def one(r: ir.Value, c: ir.Value) -> None:
            B.store(B.load(x, b, r, c), out, b, c, r)

        if lanes == 1:
            with B.nest([R]) as (r,):
                one(r, c0)
            scf.YieldOp([])
            return
        vt = ir.VectorType.get([lanes], et)
        whole_rows = B.round_down(R, lanes)
        whole = B.if_(B.cmpi("le", B.add(c0, B.c_index(lanes)), C), has_else=True)
        with ir.InsertionPoint(whole.then_block):
            steps = B.loop(0, whole_rows, lanes)
            with ir.InsertionPoint(steps.body):
                r0 = steps.induction_variable
                rows = [vector.LoadOp(vt, x, [b, B.add(r0, B.c_index(i)), c0]).result for i in range(lanes)]
                for j, col in enumerate(B.transpose_square(rows)):
                    vector.StoreOp(col, out, [b, B.add(c0, B.c_index(j)), r0])
                scf.YieldOp([])
            rest = B.loop(whole_rows, R)
            with ir.InsertionPoint(rest.body):
                for j in range(lanes):
                    one(rest.induction_variable, B.add(c0, B.c_index(j)))
                scf.YieldOp([])
            scf.YieldOp([])
        with ir.InsertionPoint(whole.else_block):  # the last columns, fewer than lanes
            with B.nest([B.sub(C, c0), R]) as (j, r):
                one(r, B.add(c0, j))
            scf.YieldOp([])
        scf.YieldOp([])


def _rank(m: ir.Value) -> int:
    """A memref's rank."""
    return ir.MemRefType(m.type).rank


def _three_d(m: ir.Value, et: ir.Type, groups: list | None) -> ir.Value:
    """A contiguous memref as [leading, rows, cols]: its leading dims collapsed (`groups`), or a unit one added."""
    i64 = ir.IntegerType.get_signless(64)
    shape = ir.MemRefType(m.type).shape
    if groups is not None:
        sizes = [B.DYN() if any(shape[a] == B.DYN() for a in axes) else math.prod(shape[a] for a in axes)
                 for axes in groups]
        return memref.CollapseShapeOp(ir.MemRefType.get(sizes, et), m, ir.ArrayAttr.get([ir.ArrayAttr.get(
            [ir.IntegerAttr.get(i64, a) for a in axes]) for axes in groups])).result
    dynamic = [B.mdim(m, i) for i, d in enumerate(shape) if d == B.DYN()]
    return memref.ExpandShapeOp(ir.MemRefType.get([1, *shape], et), m, B.reassociation([0, 1], [2]), dynamic,
                                [1, *shape]).result


@LOWERINGS.lowers(S.ExpandDimsOp)
def lower_expand_dims(cx: KernelContext, op: Operation) -> ir.Value:
    out = op.result.type
    x = cx.get(op.x)
    new = {a % out.rank for a in op.axes}
    d = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
    kept = [i for i in range(out.rank) if i not in new]
    init = cx.empty_like_dims(out, [(x, kept.index(i)) if i in kept else (x, 0) for i in range(out.rank)])
    return cx.generic(out, [(x, [d[i] for i in kept])], init, [PARALLEL] * out.rank, d, lambda v, _: v)


@LOWERINGS.lowers(S.SqueezeOp)
def lower_squeeze(cx: KernelContext, op: Operation) -> ir.Value:
    return drop_axes(cx, cx.get(op.x), op.x.type, {a % op.x.type.rank for a in op.axes}, op.result.type)


def drop_axes(cx: KernelContext, x: ir.Value, t: TensorType, gone: set[int], out: TensorType) -> ir.Value:
    """x of type t without its size-1 axes `gone` (type out)."""
    kept = [i for i in range(t.rank) if i not in gone]
    d = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
    src = [ir.AffineConstantExpr.get(0) if i in gone else d[kept.index(i)] for i in range(t.rank)]
    init = cx.empty_like_dims(out, [(x, i) for i in kept])
    return cx.generic(out, [(x, src)], init, [PARALLEL] * out.rank, d, lambda v, _: v)


@LOWERINGS.lowers(S.GatherOp)
def lower_gather(cx: KernelContext, op: Operation) -> ir.Value:
    x, t = cx.get(op.x), op.x.type
    n = len(op.indices)
    if cx.scalar_mode:
        if n != t.rank:
            raise CpuLoweringError("a gather inside a mask must pick single elements", op.loc)
        return tensor.ExtractOp(x, [wrapped(cx, cx.get(i), x, a) for a, i in enumerate(op.indices)]).result
    out = op.result.type
    lead = out.rank - (t.rank - n)
    lead_type = TensorType(out.dtype, out.shape[:lead])
    operands = [(cx.get(i), i.type) for i in op.indices]
    sources = cx.out_sources(lead_type, operands) + [(x, n + j) for j in range(t.rank - n)]
    init = cx.empty_like_dims(out, sources)
    d = [ir.AffineDimExpr.get(i) for i in range(out.rank)]
    ins = [(v, cx.broadcast_exprs(it, lead)) for v, it in operands]

    def body(*args: ir.Value) -> ir.Value:
        picks = [wrapped(cx, v, x, a) for a, v in enumerate(args[:n])]
        picks += [linalg.IndexOp(lead + j).result for j in range(t.rank - n)]
        return tensor.ExtractOp(x, picks).result

    return cx.generic(out, ins, init, [PARALLEL] * out.rank, d, body)


@KERNELS.lowers(S.GatherOp)
def gather_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """x[i] with one index tensor into x's leading axis: each picked row a contiguous copy (an inner loop LLVM
    vectorizes), the rows split over the parts. The generic kernel (`lower_gather`: an element at a time, the index
    read and wrapped at each) took 519 us for 2552 rows of 512 floats, against NumPy's 134. Other gathers (several
    index tensors, single elements) are that generic kernel."""
    if len(op.indices) != 1 or op.x.type.rank < 2 or op.indices[0].type.rank < 1:
        return cx.dense(op)
    inputs = [op.x, op.indices[0]]
    name, entry = cx.function(op, [v.type for v in inputs] + [op.result.type], True)
    x, idx, out, part, parts = entry.arguments
    with ir.InsertionPoint(entry):
        flat_x, flat_i, flat_out = _flat(x), _flat(idx), _flat(out)
        run = B.c_index(1)
        for a in range(1, op.x.type.rank):
            run = B.mul(run, B.mdim(x, a))
        lo, hi = B.share(part, parts, B.mdim(flat_i, 0))
        rows = B.loop(lo, hi)
        with ir.InsertionPoint(rows.body):
            p = rows.induction_variable
            v = B.as_index(B.load(flat_i, p))
            v = B.select(B.cmpi("lt", v, B.c_index(0)), B.add(v, B.mdim(x, 0)), v)  # from the end, as NumPy's
            src, dst = B.mul(v, run), B.mul(p, run)
            B.each(run, lambda j: B.store(B.load(flat_x, B.add(src, j)), flat_out, B.add(dst, j)))
            scf.YieldOp([])
        func.ReturnOp([])
    return Kernel(name, op, inputs, [op.result], "parts")


def wrapped(cx: KernelContext, i: ir.Value, x: ir.Value, axis: int) -> ir.Value:
    """An index into `axis` of x from an integer, negative ones counted from the end (as NumPy does)."""
    i = arith.IndexCastOp(ir.IndexType.get(), i).result if not isinstance(i.type, ir.IndexType) else i
    zero = arith.ConstantOp(ir.IndexType.get(), 0).result
    neg = arith.CmpIOp(2, i, zero).result
    return arith.SelectOp(neg, arith.AddIOp(i, tensor.DimOp(x, arith.ConstantOp(ir.IndexType.get(), axis)
                                                            .result).result).result, i).result


# ---- scatter-add (a gather's transpose) ------------------------------------------------------------------
@KERNELS.lowers(S.ScatterAddOp)
def scatter_add_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """out = base, then out[i0[p], i1[p], ...] += updates[p] for every place p in order, on one thread (places
    may repeat)."""
    inputs = [op.base, op.updates, *op.indices]
    name, entry = cx.function(op, [v.type for v in inputs] + [op.result.type], False)
    base, upd, *idx, out = entry.arguments
    n, rank = len(op.indices), op.base.type.rank
    with ir.InsertionPoint(entry):
        memref.CopyOp(base, out)
        lead = [B.mdim(idx[0], a) for a in range(op.indices[0].type.rank)]
        with B.nest(lead) as ps:
            picks = []
            for a, i in enumerate(idx):  # negative places count from the end, as NumPy's
                v = B.as_index(B.load(i, *ps))
                picks.append(B.select(B.cmpi("lt", v, B.c_index(0)), B.add(v, B.mdim(base, a)), v))
            with B.nest([B.mdim(base, a) for a in range(n, rank)]) as rs:
                u, cur = B.load(upd, *ps, *rs), B.load(out, *picks, *rs)
                total = arith.AddFOp(cur, u).result if is_float(op.base.type.dtype) else arith.AddIOp(cur, u).result
                B.store(total, out, *picks, *rs)
        func.ReturnOp([])
    return Kernel(name, op, inputs, [op.result])


@HOSTED.lowers(S.ScatterAddOp)
def hosted_scatter_add(cx: KernelContext, op: Operation, k: Kernel) -> Hosted:
    return Hosted(checks=[(i, within(op.base, a)) for a, i in enumerate(op.indices)])


@LAUNCHES.lowers(S.ScatterAddOp)
def launch_scatter_add(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """Places checked first: the kernel writes without checking."""
    op = k.op
    try:
        S.GatherOp.check_indices(ins[0].shape, ins[2:])
    except IndexError as e:
        raise SparsaError(f"'{op.NAME}' failed at run time: {e}", op.loc) from None
    return fn.run(k, host, ins)


# ---- concat ------------------------------------------------------------------------------------------
@KERNELS.lowers(S.ConcatOp)
def concat_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """Each input a run of contiguous elements per index of the dims before the axis (the parts split those):
    out.flat[o * total + at_i + j] = x_i.flat[o * run_i + j], an inner loop LLVM vectorizes (two expert weights'
    gradients joined into gate_up's, 32 MB: a copy's time)."""
    rank = op.result.type.rank
    axis = op.axis % rank

    def product(m: ir.Value, dims: range) -> ir.Value:
        n = B.c_index(1)
        for a in dims:
            n = B.mul(n, B.as_index(B.sizes_of(m)[a]))
        return n

    runs = [math.prod(v.type.shape[axis:]) if all(isinstance(d, int) for d in v.type.shape[axis:]) else None
            for v in op.inputs]
    et = element_type(op.result.type.dtype)
    bits = ir.FloatType(et).width if isinstance(et, ir.FloatType) else ir.IntegerType(et).width
    lanes = cx.target.lanes(bits) if bits >= 8 else 1
    interleave = lanes > 1 and None not in runs and 0 not in runs and sum(runs) <= INTERLEAVED  # type: ignore[arg-type]

    def build(*args: ir.Value) -> None:
        *ins, out, part, parts = args
        flat_out, total = _flat(out), product(out, range(axis, rank))
        pieces = [(_flat(m), product(m, range(axis, rank))) for m in ins]  # each input flat, and its run
        lo, hi = B.share(part, parts, product(out, range(axis)))
        if interleave:  # lanes indices of the outer dims at a time, the runs interleaved in registers
            whole = B.add(lo, B.round_down(B.sub(hi, lo), lanes))
            groups = B.loop(lo, whole, lanes)
            with ir.InsertionPoint(groups.body):
                interleaved(flat_out, [flat for flat, _ in pieces], runs, groups.induction_variable, lanes)
                scf.YieldOp([])
            lo = whole  # the scalar loop takes what is left
        outer = B.loop(lo, hi)
        with ir.InsertionPoint(outer.body):
            o, at = outer.induction_variable, B.c_index(0)
            for flat, run in pieces:
                src, dst = B.mul(o, run), B.add(B.mul(o, total), at)
                with B.nest([run]) as (j,):
                    B.store(B.load(flat, B.add(src, j)), flat_out, B.add(dst, j))
                at = B.add(at, run)
            scf.YieldOp([])

    return cx.plain(op, list(op.inputs), build, parts=True)


INTERLEAVED = 4  # concat's largest whole run (elements per outer index) joined in registers


def interleaved(out: ir.Value, ins: list[ir.Value], runs: list[int], o: ir.Value, lanes: int) -> None:
    """out[(o + q) * R + at_i + j] = ins[i][(o + q) * run_i + j] for q < lanes (R the runs' sum, at_i the sum
    before i): a vector of lanes * run_i from each input, joined into one and permuted into the output's order
    by shuffles, one store (GPT-OSS's interleaved gate_up gradient: two runs of 1, 32 MB from 10 ms to a copy's
    time). LLVM does not vectorize the scalar loop: its stores may alias the inputs."""
    et = ir.MemRefType(out.type).element_type
    joined, starts = None, []
    for m, run in zip(ins, runs, strict=True):
        v = vector.LoadOp(ir.VectorType.get([lanes * run], et), m, [B.mul(o, B.c_index(run))]).result
        starts.append(0 if joined is None else ir.VectorType(joined.type).shape[0])
        joined = v if joined is None else vector.ShuffleOp(joined, v, list(range(starts[-1] + lanes * run))).result
    total, order = sum(runs), []
    for q in range(lanes):
        for start, run in zip(starts, runs, strict=True):
            order += [start + q * run + j for j in range(run)]
    assert joined is not None and len(order) == lanes * total
    vector.StoreOp(vector.ShuffleOp(joined, joined, order).result, out, [B.mul(o, B.c_index(total))])


@HOSTED.lowers(S.GatherOp)
def hosted_gather(cx: KernelContext, op: Operation, k: Kernel) -> Hosted:
    return Hosted(checks=[(i, within(op.x, a)) for a, i in enumerate(op.indices)])


def within(v: Value, axis: int) -> Any:
    """The bounds of an index into `axis` of v: -n..n-1 (negative ones count from the end, as NumPy's)."""
    return lambda known: (-known[id(v)][axis], known[id(v)][axis])


# ---- strided views the native host copies out ---------------------------------------------------------
@HOSTED.lowers(S.SliceOp, S.SplitOp)
def hosted_view(cx: KernelContext, op: Operation, k: Kernel | None) -> Hosted:
    """Each result copied out of the view NumPy's semantics make of the operand (its offset and strides); none
    where only grouped GEMMs' pack kernels read through it (`cx.packed`: half of a fused gate_up weight)."""
    if id(op) in cx.packed:
        return Hosted(virtual=True)
    return Hosted(before=[view_copy_kernel(cx, op, i) for i in range(len(op.results))])


@HOSTED.lowers(S.BroadcastToOp)
def hosted_broadcast_to(cx: KernelContext, op: Operation, k: Kernel | None) -> Hosted:
    """Copied out of NumPy's broadcast view (stride 0 on the broadcast axes)."""
    return Hosted(before=[view_copy_kernel(cx, op, 0, lambda ctx, x: np.broadcast_to(x, [ctx.dim(d)
                                                                                         for d in op.shape]))])


def view_geometry(op: Operation, index: int, shape: tuple[int, ...], ctx: Any, view: Any = None) -> np.ndarray:
    """[offset, strides...] in elements of result `index` of view op `op` on a contiguous operand of `shape`: the
    op's reference (or `view(ctx, x)`) run on an array with that layout and no memory behind it (views read
    nothing)."""
    dtype = np.dtype(np.float32)
    strides = [dtype.itemsize * math.prod(shape[a + 1:]) for a in range(len(shape))]
    base = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, strides)
    views = (view or op.reference)(ctx, base)
    view = views[index] if isinstance(views, tuple) else views
    offset = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // dtype.itemsize
    return np.array([offset, *[s // dtype.itemsize for s in view.strides]], np.int64)


def view_copy_kernel(cx: KernelContext, op: Operation, index: int, view: Any = None) -> Kernel:
    """A kernel copying result `index` of a view op out of its contiguous operand: out[i] = x.flat[offset + i .
    strides], offset and strides (a Scratch made per set of shapes by `view_geometry`) its second argument. The
    leading dim is split over the parts; where the last stride is 1 (a slice of whole rows' runs) the innermost
    loop reads consecutive elements, which LLVM vectorizes (a weight's half, 16 MB: 9 -> ms)."""
    x, out = op.operands[0], op.results[index]
    rank = out.type.rank
    geometry = Scratch(TensorType("i64", (rank + 1,)), lambda known, ctx: (rank + 1,), f"{op.NAME}_geometry",
                       lambda known, ctx: view_geometry(op, index, known[id(x)], ctx, view))
    start = len(cx.tiled)
    name, entry = cx.function(op, [x.type, geometry.type, out.type], rank > 0, "view_copy")
    src, at, dst = entry.arguments[:3]
    with ir.InsertionPoint(entry):
        if rank == 0:  # a scalar: its one element
            B.store(B.load(src) if x.type.rank == 0 else B.load(_flat(src), B.as_index(B.load(at, 0))), dst)
            func.ReturnOp([])
            return cx.extra(Kernel(name, op, [x, geometry], [out]), start)
        flat = _flat(src) if x.type.rank else src

        def read(place: ir.Value) -> ir.Value:  # a scalar operand (broadcast) has its one element everywhere
            return B.load(flat, place) if x.type.rank else B.load(flat)

        part, parts = entry.arguments[3:]
        sizes = B.sizes_of(dst)
        stride = [B.as_index(B.load(at, a + 1)) for a in range(rank)]
        lead = B.loop(*B.share(part, parts, sizes[0]))
        with ir.InsertionPoint(lead.body):
            ivs = [lead.induction_variable]
            with B.nest(sizes[1:-1]) as inner:
                ivs += inner
                place = B.as_index(B.load(at, 0))
                for i, s in zip(ivs, stride, strict=False):
                    place = B.add(place, B.mul(i, s))
                if rank == 1:
                    B.store(read(place), dst, *ivs)
                else:
                    unit = B.if_(B.cmpi("eq", stride[-1], B.c_index(1)), has_else=True)
                    for block, step in ((unit.then_block, None), (unit.else_block, stride[-1])):
                        with ir.InsertionPoint(block):
                            with B.nest([sizes[-1]]) as (j,):
                                B.store(read(B.add(place, j if step is None else B.mul(j, step))), dst, *ivs, j)
                            scf.YieldOp([])
            scf.YieldOp([])
        func.ReturnOp([])
    return cx.extra(Kernel(name, op, [x, geometry], [out], "parts" if rank else "none"), start)


def _flat(src: ir.Value) -> ir.Value:
    """A contiguous memref as one dimension."""
    dims = ir.MemRefType(src.type).shape
    if len(dims) <= 1:
        return src
    size = math.prod(dims) if B.DYN() not in dims else B.DYN()
    flat_type = ir.MemRefType.get([size], ir.MemRefType(src.type).element_type)
    return memref.CollapseShapeOp(flat_type, src, ir.ArrayAttr.get([ir.ArrayAttr.get(
        [ir.IntegerAttr.get(ir.IntegerType.get_signless(64), a) for a in range(len(dims))])])).result


# ---- transposes the native host makes for other kernels ------------------------------------------------
def transpose_kernel(cx: KernelContext, op: Operation, v: Value) -> tuple[Kernel, Scratch]:
    """A kernel writing v ([..., S, D]) with its last two dims swapped into a Scratch buffer (`swap_last_axes`):
    the native host's `threads.transposed`."""
    t = v.type
    swapped = TensorType(t.dtype, t.shape[:-2] + (t.shape[-1], t.shape[-2]))
    scratch = Scratch(swapped, lambda known, ctx: known[id(v)][:-2] + known[id(v)][-2:][::-1], f"{v.name_hint}_t")
    start = len(cx.tiled)
    name, entry = cx.function(op, [t, swapped], True, "transpose")
    with ir.InsertionPoint(entry):
        swap_last_axes(cx, *entry.arguments)
        func.ReturnOp([])
    return cx.extra(Kernel(name, op, [v], [scratch], "parts"), start), scratch


@LAUNCHES.lowers(S.GatherOp)
def launch_gather(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """Indices checked first: the kernel reads without checking."""
    op = k.op
    try:
        op.check_indices(ins[0].shape, ins[1:])
    except IndexError as e:
        raise SparsaError(f"'{op.NAME}' failed at run time: {e}", op.loc) from None
    return fn.run(k, host, ins)
