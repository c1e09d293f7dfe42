"""The MoE kernels: routing (every router family, scores in float64), dispatch (a counting sort by expert
with capacity, segments padded to the dispatch block) and the grouped GEMMs over expert segments, rows
read through the permutation, the epilogue inlined and the combine fused. Their operands' packed layouts are
moe_pack.py's."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, llvm, memref, scf, tensor
from torch_mlir.dialects import math as mmath

from sparsa.backends.cpu import CpuLoweringError
from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.context import (
    HOSTED,
    KERNELS,
    LAUNCHES,
    KernelContext,
    element_type,
    host,
)
from sparsa.backends.cpu.moe_pack import (
    cached_panels,
    first_tile,
    pack_kernel,
    pack_panels,
    pack_rows,
    pack_rows_kernel,
    packable,
    panels_scratch,
    panels_shape,
)
from sparsa.backends.cpu.signature import Hosted, Kernel, Scratch
from sparsa.backends.cpu.target import PANEL, ROW_BLOCK
from sparsa.backends.cpu.threads import num_threads
from sparsa.ir.core import Operation, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import moe as M
from sparsa.ir.dialects import moe_exchange as X
from sparsa.ir.dialects.attn_blocks import outer_values
from sparsa.ir.types import TensorType, numpy_dtype
from sparsa.knobs import deterministic

ROWS = ROW_BLOCK  # rows of one grouped-GEMM work item (the dispatch block of the cpu pipeline)
FEW_ROWS = (2,)  # register tiles of fewer rows than the target's, for segments with that few (decode: `few_rows`)
# Parts of a grouped GEMM under SPARSA_DETERMINISTIC=1, whatever the threads: the combine's slices are summed in
# this fixed number and order.
DETERMINISTIC_PARTS = 4

# The exchange among ranks (expert parallel) is the host's: it calls the process group (torch.distributed) with
# the arrays the kernels made, and the NumPy plan over [T, K] ids is small next to the GEMMs around it.
KERNELS.lowers(X.ExchangePlanOp, X.AllToAllOp, X.AllToAllStartOp, X.AllToAllWaitOp, X.CombineRowsOp,
               X.LocalExpertsOp, X.RankRowsOp, X.InsertOwnRowsOp)(host)


# ---- MoE: routing -------------------------------------------------------------------------------
@KERNELS.lowers(M.RouteOp)
def route_kernel(cx: KernelContext, op: Operation) -> Kernel:
    inputs = [op.logits] + ([op.bias] if op.bias is not None else [])
    name, entry = cx.function(op, [v.type for v in inputs] + [r.type for r in op.results], True)
    args = entry.arguments
    logits, bias = args[0], (args[1] if op.bias is not None else None)
    w_out, i_out, part, parts = args[len(inputs):]
    f64 = ir.F64Type.get()
    et = element_type(op.logits.type.dtype)
    with ir.InsertionPoint(entry):
        T_, E = B.mdim(logits, 0), B.mdim(logits, 1)
        score = B.alloca(E, f64)
        sel = B.alloca(E, f64)
        picked = B.alloca(E, ir.IntegerType.get_signless(1))
        G = op.groups
        gscore = B.alloca(B.c_index(G), f64) if G > 1 else None
        gkept = B.alloca(B.c_index(G), ir.IntegerType.get_signless(1)) if G > 1 else None
        ninf, zero, one = B.c_float(float("-inf"), f64), B.c_float(0.0, f64), B.c_float(1.0, f64)
        tok = B.loop(*B.share(part, parts, T_))  # contiguous tokens: a token's k outputs share cache lines
        with ir.InsertionPoint(tok.body):
            t = tok.induction_variable
            # scores in float64, as the reference computes them
            mx = B.fold(E, ninf, lambda e, m: arith.MaximumFOp(m, _ext(B.load(logits, t, e), f64)).result)
            if op.score == "softmax":
                def exp_at(e: ir.Value, s: ir.Value) -> ir.Value:  # each exp once: kept in score, summed
                    x = mmath.ExpOp(arith.SubFOp(_ext(B.load(logits, t, e), f64), mx).result).result
                    B.store(x, score, e)
                    return arith.AddFOp(s, x).result
                total = B.fold(E, zero, exp_at)
                B.each(E, lambda e: B.store(arith.DivFOp(B.load(score, e), total).result, score, e))
            else:
                def sig(e: ir.Value) -> ir.Value:
                    x = _ext(B.load(logits, t, e), f64)
                    return arith.DivFOp(one, arith.AddFOp(one, mmath.ExpOp(arith.NegFOp(x).result)
                                                          .result).result).result
                B.each(E, lambda e: B.store(sig(e), score, e))

            def selection(e: ir.Value) -> None:
                s = B.load(score, e)
                if bias is not None:
                    s = arith.AddFOp(s, _ext(B.load(bias, e), f64)).result
                B.store(s, sel, e)
                B.store(B.c_int(0, 1), picked, e)
            B.each(E, selection)
            if G > 1:
                keep_groups(cx, op, E, sel, picked, gscore, gkept)
            # top-k: k passes of a first-max search over the experts not picked yet
            for j in range(op.k):
                best = _argmax(E, sel, picked)
                B.store(B.c_int(1, 1), picked, best)
                B.store(B.as_i64(best), i_out, t, j)
                B.store(B.load(score, best), sel, best)  # sel now holds the picked weights' scores
            weights = [B.load(sel, B.as_index(B.load(i_out, t, j))) for j in range(op.k)]
            total = zero
            for w in weights:
                total = arith.AddFOp(total, w).result
            for j, w in enumerate(weights):
                if op.renormalize:
                    w = arith.DivFOp(w, total).result
                w = arith.MulFOp(w, B.c_float(float(op.scale), f64)).result
                B.store(arith.TruncFOp(et, w).result if et != f64 else w, w_out, t, j)
            scf.YieldOp([])
        func.ReturnOp([])
    return Kernel(name, op, inputs, list(op.results), "parts")


def keep_groups(cx: KernelContext, op: Operation, E: ir.Value, sel: ir.Value, picked: ir.Value, gscore: ir.Value,
                gkept: ir.Value) -> None:
    """DeepSeek's group-limited routing: score each group by the sum of its best `group_top`
    selection scores, keep the best `groups_kept` groups, and mark the other groups' experts picked."""
    G = op.groups
    size = B.as_index(arith.DivUIOp(E, B.c_index(G)).result)
    f64 = ir.F64Type.get()
    for g in range(G):
        lo = B.mul(B.c_index(g), size)
        total = B.c_float(0.0, f64)
        for _ in range(op.group_top):
            best = _argmax(size, sel, picked, lo)
            B.store(B.c_int(1, 1), picked, best)
            total = arith.AddFOp(total, B.load(sel, best)).result
        B.store(total, gscore, g)
        B.each(size, lambda e, lo=lo: B.store(B.c_int(0, 1), picked, B.add(lo, e)))
        B.store(B.c_int(0, 1), gkept, g)
    for _ in range(op.groups_kept):
        best = _argmax(B.c_index(G), gscore, gkept)
        B.store(B.c_int(1, 1), gkept, best)
    for g in range(G):  # experts of dropped groups can no longer be chosen
        dropped = arith.XOrIOp(B.load(gkept, g), B.c_int(1, 1)).result
        lo = B.mul(B.c_index(g), size)
        B.each(size, lambda e, lo=lo, dropped=dropped: B.store(dropped, picked, B.add(lo, e)))


# ---- MoE: dispatch ------------------------------------------------------------------------------
@KERNELS.lowers(M.DispatchOp)
def dispatch_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """Counting sort of assignments by expert (stable: token order, then slot order), capacity applied
    in that order; segments padded to `block` with -1. perm is allocated by the host at its upper bound
    T*K + E*(block-1); offsets[E] says how much of it is used."""
    limit = TensorType("i64", (1,))  # the op's capacity_limit, computed by the host (one rule for every target)
    name, entry = cx.function(op, [op.experts.type, limit] + [r.type for r in op.results], False)
    experts, limit_mem, perm, offsets = entry.arguments
    i64 = ir.IntegerType.get_signless(64)
    E = op.num_experts
    with ir.InsertionPoint(entry):
        n = B.mul(B.mdim(experts, 0), B.mdim(experts, 1))
        flat = _flatten(experts)
        count = B.alloca(B.c_index(E), i64)
        cap = B.load(limit_mem, 0)
        zero, one = B.c_int(0), B.c_int(1)
        B.each(B.c_index(E), lambda e: B.store(zero, count, e))

        def place(write: bool) -> None:
            loop = B.loop(0, n)
            with ir.InsertionPoint(loop.body):
                a = loop.induction_variable
                eid = B.load(flat, a)
                real = B.if_(B.cmpi("ge", eid, zero)) if op.drop_negative else None  # -1: no assignment
                with ir.InsertionPoint(real.then_block) if real is not None else nullcontext():
                    e = B.as_index(eid)
                    c = B.load(count, e)
                    keep = B.if_(B.cmpi("lt", c, cap))
                    with ir.InsertionPoint(keep.then_block):
                        if write:
                            B.store(B.as_i64(a), perm, B.add(B.as_index(B.load(offsets, e)), B.as_index(c)))
                        B.store(B.add(c, one), count, e)
                        scf.YieldOp([])
                    if real is not None:
                        scf.YieldOp([])
                scf.YieldOp([])

        place(False)
        blk = B.c_int(op.block)
        B.store(zero, offsets, 0)
        running = zero
        for e in range(E):
            c = B.load(count, e)
            padded = B.mul(arith.DivSIOp(B.add(c, B.c_int(op.block - 1)), blk).result, blk)
            running = B.add(running, padded)
            B.store(running, offsets, e + 1)
            B.store(zero, count, e)
        fill = B.loop(0, B.mdim(perm, 0))  # the segments' padding, and past offsets[E] to the bound (the host's)
        with ir.InsertionPoint(fill.body):
            B.store(B.c_int(-1), perm, fill.induction_variable)
            scf.YieldOp([])
        place(True)
        func.ReturnOp([])
    return Kernel(name, op, [op.experts], list(op.results))


# ---- MoE: grouped GEMM over expert segments -------------------------------------------------------
@KERNELS.lowers(M.GroupedMatmulOp)
def grouped_matmul_kernel(cx: KernelContext, op: Operation) -> Kernel:
    return grouped(cx, op, list(op.weights), None)


@KERNELS.lowers(M.GroupedMatmulCombineOp)
def grouped_matmul_combine_kernel(cx: KernelContext, op: Operation) -> Kernel:
    return grouped(cx, op, [op.weight], op.gates)


def grouped(cx: KernelContext, op: Operation, weights: list[Value], gates: Value | None) -> Kernel:
    """Work items are chunks of up to ROWS rows of one expert's segment (or, with weights in panels, one expert
    and a group of its panels: `grouped_items`): the chunk's tokens are read through perm (gather; with panels,
    packed by register tile once, before: `pack_rows`), multiplied by each of the expert's weights (tiled GEMMs),
    the epilogue is applied, and the rows are stored at their perm positions — or, with gates, scaled and added
    into this part's slice of the [parts, T, N] output (each part zeroes its slice first; the host sums them).

    The threads take work items in order as they free up, from a counter they share (the host passes it
    zeroed; an atomic add claims the next item): segments end in partial chunks and experts get
    different numbers of rows, so a fixed share (item % parts) left one thread waiting on the other.
    With SPARSA_DETERMINISTIC=1 the share is fixed (item % parts, over a fixed number of parts), so every
    slice of a combine sums the same rows in the same order, whatever the threads.

    Weights that are parameters come packed in panels of PANEL columns (contiguous [K, PANEL] blocks,
    packed once per loaded weights by the host), and an elementwise epilogue runs panel by panel: the
    GEMM then reads B sequentially instead of one row of B per page (TLB misses at large N)."""
    outer = outer_values(op.epilogue)  # 0-d values from outside the body (a scale): arguments of the kernel
    if any(v.type.rank for v in outer):  # (the cpu pipeline's fuse-moe-dispatch leaves such epilogues as tensor ops)
        raise CpuLoweringError(f"'{op.NAME}' whose epilogue reads tensors from outside the expert body is not "
                               "supported by the cpu backend (run fuse-moe-dispatch{outside_values=false})", op.loc)
    inputs = [op.rows, op.perm, op.offsets] + weights + ([gates] if gates is not None else []) + outer
    rt = op.result.type
    out_type = TensorType(rt.dtype, (None,) + rt.shape) if gates is not None else rt
    panels = packable(op, weights, cx.fixed)
    m = rows_packing(cx, op, panels)
    types = [v.type for v in inputs]
    if panels:
        for i, w in enumerate(weights):
            types[3 + i] = TensorType(w.type.dtype, (w.type.shape[0], None, w.type.shape[1], PANEL))
    if m:
        types[0] = TensorType(op.rows.type.dtype, (None, op.rows.type.shape[1], m))
    name, entry = cx.function(op, types + [out_type, TensorType("i64", (1,))], True)
    args = entry.arguments
    rows_m, perm, offsets = args[:3]
    w_ms = args[3:3 + len(weights)]
    gates_m = args[3 + len(weights)] if gates is not None else None
    out, counter, part, parts = args[len(inputs):]
    fixed = deterministic()  # items part, part + parts, ...: the same rows meet in the same slice every time

    def first() -> ir.Value:
        return part if fixed else _claim(counter)

    def following(claimed: ir.Value) -> ir.Value:
        return B.add(claimed, parts) if fixed else _claim(counter)

    et = element_type(rt.dtype)
    E = weights[0].type.shape[0]
    with ir.InsertionPoint(entry):
        if gates is not None:  # this part's slice of the output, zeroed here: in parallel, where it is used
            linalg.fill(B.c_float(0.0, et), outs=[B.subview(out, [part, 0, 0], [1, B.mdim(out, 1),
                                                                               B.mdim(out, 2)], drop=[0])])
        rows_t = B.read(rows_m)
        w_ts = [B.read(w) for w in w_ms]
        for v, m_v in zip(outer, args[len(inputs) - len(outer):len(inputs)], strict=True):
            cx.values[id(v)] = B.read(m_v)
        D = B.mdim(rows_m, 1)
        n_experts = B.sub(B.mdim(offsets, 0), B.c_index(1)) if not isinstance(E, int) else B.c_index(E)
        if panels and (m or not op.gather):  # items of weight panel groups
            k_dim = weights[0].type.shape[1]
            group = cx.target.weight_group(k_dim if isinstance(k_dim, int) else 1024, len(weights))
            grouped_items(cx, op, rows_t, perm, offsets, w_ts, n_experts, out, gates_m, part, et, m, group,
                          first, following)
        else:  # items of ROWS rows, over every column
            experts = B.loop(0, n_experts, 1, [B.c_index(0), first()])
            with ir.InsertionPoint(experts.body):
                e = experts.induction_variable
                lo, hi = B.as_index(B.load(offsets, e)), B.as_index(B.load(offsets, B.add(e, B.c_index(1))))
                steps = B.loop(lo, hi, ROWS, list(experts.inner_iter_args))
                with ir.InsertionPoint(steps.body):
                    start = steps.induction_variable
                    g, claimed = steps.inner_iter_args
                    work = B.if_(B.cmpi("eq", g, claimed), [B.index()])
                    with ir.InsertionPoint(work.then_block):
                        size = B.minsi(B.c_index(ROWS), B.sub(hi, start))
                        grouped_chunk(cx, op, rows_t, perm, w_ts, e, start, size, D, out, gates_m, part, et,
                                      panels)
                        scf.YieldOp([following(claimed)])
                    with ir.InsertionPoint(work.else_block):
                        scf.YieldOp([claimed])
                    scf.YieldOp([B.add(g, B.c_index(1)), work.results[0]])
                scf.YieldOp(list(steps.results))
        if gates is None:  # the rows past offsets[E] (perm at its bound: the native host's) are padding too
            _zero_rows(out, B.as_index(B.load(offsets, n_experts)), B.sub(B.mdim(out, 0), B.as_index(B.load(
                offsets, n_experts))), B.cmpi("eq", part, B.c_index(0)), et)
        func.ReturnOp([])
    return Kernel(name, op, inputs, [op.result], "parts", panels=[3 + i for i in range(len(weights))] if panels
                  else [], repacked=[3 + i for i, w in enumerate(weights) if panels and id(w) not in cx.fixed],
                  packed_rows=m)


def rows_packing(cx: KernelContext, op: Operation, panels: bool) -> int:
    """The rows of the register tile when a grouped GEMM reads its rows packed by tile (`pack_rows`), else 0: its
    weights come in panels, it gathers its rows (the gather is a copy: packing them costs nothing more) and every
    segment starts a tile: at a multiple of the work items' ROWS (the dispatch's block; the tile then has
    `CpuTarget.packed_rows` rows, 6 on AVX2, which need not divide the block: `block_tiles`), else at a multiple of the
    register tile's rows."""
    d = op.perm.defining_op
    if not (panels and op.gather and isinstance(d, M.DispatchOp)):
        return 0
    if d.block % ROWS == 0:
        return cx.target.packed_rows
    m = cx.target.tile[0]
    return m if d.block % m == 0 and ROWS % m == 0 else 0


def grouped_items(cx: KernelContext, op: Operation, xp: ir.Value, perm: ir.Value, offsets: ir.Value,
                  w_ts: list[ir.Value], n_experts: ir.Value, out: ir.Value, gates: ir.Value | None, part: ir.Value,
                  et: ir.Type, m: int, group: int, first: Any, following: Any) -> None:
    """The work items of a grouped GEMM with packed weights whose rows are in perm's order (not gathered) or come
    packed (xp [tiles, D, m], `pack_rows`, where m): an item is one expert and a group of `group` weight panels
    (`CpuTarget.weight_group`), over every chunk of ROWS rows of the expert's segment. The group's panels are
    read from L2 by each chunk after the first, where a chunk over every panel streamed the whole expert's
    weights from memory once per 64 rows (B's bandwidth, not the FMAs, then bounded the GEMM: ~130 against
    ~180 GFLOP/s a core on an AVX-512 Xeon). A chunk's rows are a slice of xp (or of the rows): no gather
    here."""
    n_panels = B.mdim(w_ts[0], 1)
    n_groups = B.ceil_div(n_panels, group)
    D = B.mdim(w_ts[0], 2)
    N = B.mdim(out, 2 if gates is not None else 1)
    experts = B.loop(0, n_experts, 1, [B.c_index(0), first()])
    with ir.InsertionPoint(experts.body):
        e = experts.induction_variable
        lo, hi = B.as_index(B.load(offsets, e)), B.as_index(B.load(offsets, B.add(e, B.c_index(1))))
        groups = B.loop(0, n_groups, 1, list(experts.inner_iter_args))
        with ir.InsertionPoint(groups.body):
            grp = groups.induction_variable
            g, claimed = groups.inner_iter_args
            work = B.if_(B.cmpi("eq", g, claimed), [B.index()])
            with ir.InsertionPoint(work.then_block):
                p0 = B.mul(grp, B.c_index(group))
                p1 = B.minsi(B.add(p0, B.c_index(group)), n_panels)
                steps = B.loop(lo, hi, ROWS)
                with ir.InsertionPoint(steps.body):
                    start = steps.induction_variable
                    size = B.minsi(B.c_index(ROWS), B.sub(hi, start))
                    real = _real_rows(perm, start, size)
                    has = B.if_(B.cmpi("gt", real, B.c_index(0)))
                    with ir.InsertionPoint(has.then_block):

                        def over_panels(x: ir.Value, rows: ir.Value) -> None:
                            pl = B.loop(p0, p1)
                            with ir.InsertionPoint(pl.body):
                                j = pl.induction_variable
                                n0 = B.mul(j, B.c_index(PANEL))
                                ws = [B.slice_tensor(w, [e, j, 0, 0], [1, 1, D, PANEL], drop=[0, 1]) for w in w_ts]
                                cx.dim_map = {op.result.type.shape[-1]: PANEL}  # the epilogue sees PANEL columns
                                chunk_out(cx, op, x, ws, rows, real, n0, B.minsi(B.c_index(PANEL), B.sub(N, n0)),
                                          start, perm, out, gates, part, et)
                                cx.dim_map = {}
                                scf.YieldOp([])

                        few_rows(xp, start, real, size, D, m or cx.target.tile[0], bool(m), over_panels)
                        scf.YieldOp([])
                    if gates is None:  # the segment's padding rows (after its real ones) are zero rows: item 0's
                        _zero_rows(out, B.add(start, real), B.sub(size, real), B.cmpi("eq", grp, B.c_index(0)), et)
                    scf.YieldOp([])
                scf.YieldOp([following(claimed)])
            with ir.InsertionPoint(work.else_block):
                scf.YieldOp([claimed])
            scf.YieldOp([B.add(g, B.c_index(1)), work.results[0]])
        scf.YieldOp(list(groups.results))


def few_rows(xp: ir.Value, start: ir.Value, real: ir.Value, size: ir.Value, D: ir.Value, m: int, packed: bool,
             gemm: Any) -> None:
    """gemm(x, rows) on the `real` rows of a chunk of `size` from row `start` of xp: its real rows rounded up to whole
    register tiles of m rows (where the padding has that many: `size`), or where they are at most one of FEW_ROWS
    (< m), that many rows (a register tile of r rows, its shape static). xp is [rows, D], or [tiles, D, m] with
    `packed` rows (`pack_rows`; x then [tiles or 1, D, m or r]). An expert at decode gets a row or two: padded to m
    rows, its GEMM did m / r times the multiplications (for the same reads of its weights)."""
    first = first_tile(start, m) if packed else None  # the chunk's first tile
    few = [r for r in FEW_ROWS if r < m]

    def variant(i: int) -> None:
        if i == len(few) and packed:
            tiles = B.ceil_div(real, m)
            gemm(B.slice_tensor(xp, [first, 0, 0], [tiles, D, m]), B.mul(tiles, B.c_index(m)))
            return
        if i == len(few):
            rows = B.minsi(B.mul(B.ceil_div(real, m), B.c_index(m)), size)
            gemm(B.slice_tensor(xp, [start, 0], [rows, D]), rows)
            return
        r = few[i]
        fits = B.if_(arith.AndIOp(B.cmpi("le", real, B.c_index(r)), B.cmpi("ge", size, B.c_index(r))).result,
                     has_else=True)
        with ir.InsertionPoint(fits.then_block):
            gemm(B.slice_tensor(xp, [first, 0, 0], [1, D, r]) if packed else B.slice_tensor(xp, [start, 0], [r, D]),
                 r)
            scf.YieldOp([])
        with ir.InsertionPoint(fits.else_block):
            variant(i + 1)
            scf.YieldOp([])

    variant(0)


def grouped_chunk(cx: KernelContext, op: Operation, rows_t: ir.Value, perm: ir.Value, w_ts: list[ir.Value], e: ir.Value,
                  start: ir.Value, size: ir.Value, D: ir.Value, out: ir.Value, gates: ir.Value | None,
                  part: ir.Value, et: ir.Type, panels: bool) -> None:
    """One work item: the chunk's real rows (they come first in a segment; the padding (-1) after them is
    skipped) read through perm, times each weight, the epilogue, the store or combine — over the whole
    width, or one panel of PANEL columns at a time with packed weights. The GEMMs run over the real rows
    rounded up to a whole register tile where the segment's padding has that many (it does with the
    pipeline's block of 64): the padding rows' results are dropped, and no rows are left to the scalar
    remainder loop (a 64-row chunk with 3 real rows in it cost as much as one with 40)."""

    real = _real_rows(perm, start, size)
    has = B.if_(B.cmpi("gt", real, B.c_index(0)))
    with ir.InsertionPoint(has.then_block):
        if panels:
            x = gather_packed(op, rows_t, perm, start, real, D, et, cx.target.tile[0])
            rows = B.mul(B.mdim(x, 0), B.c_index(cx.target.tile[0]))
        else:
            tile_m = cx.target.tile[0]
            rows = B.minsi(B.mul(B.ceil_div(real, tile_m), B.c_index(tile_m)), size)
            x = gather_rows(cx, op, rows_t, perm, start, rows, D, et)
        if not panels:
            ws = [B.slice_tensor(w, [e, 0, 0], [1, D, B.mdim(w, 2)], drop=[0]) for w in w_ts]
            chunk_out(cx, op, x, ws, rows, real, B.c_index(0), None, start, perm, out, gates, part, et)
        else:
            N = B.mdim(out, 2 if gates is not None else 1)
            pl = B.loop(0, B.mdim(w_ts[0], 1))
            with ir.InsertionPoint(pl.body):
                j = pl.induction_variable
                n0 = B.mul(j, B.c_index(PANEL))
                ws = [B.slice_tensor(w, [e, j, 0, 0], [1, 1, D, PANEL], drop=[0, 1]) for w in w_ts]
                cx.dim_map = {op.result.type.shape[-1]: PANEL}  # the epilogue sees PANEL columns, not N
                chunk_out(cx, op, x, ws, rows, real, n0, B.minsi(B.c_index(PANEL), B.sub(N, n0)), start, perm,
                               out, gates, part, et)
                cx.dim_map = {}
                scf.YieldOp([])
        scf.YieldOp([])
    if gates is None:  # the segment's padding rows (after its real ones) are zero rows
        _zero_rows(out, B.add(start, real), B.sub(size, real), None, et)


def _real_rows(perm: ir.Value, start: ir.Value, size: ir.Value) -> ir.Value:
    """How many of the chunk perm[start:start + size] are real rows (>= 0): a segment's come first, its padding
    (-1) after them."""
    return B.fold(size, B.c_index(0), lambda r, n: B.select(
        B.cmpi("ge", B.load(perm, B.add(start, r)), B.c_int(0)), B.add(n, B.c_index(1)), n))


def _zero_rows(out: ir.Value, lo: ir.Value, n: ir.Value, also: ir.Value | None, et: ir.Type) -> None:
    """out[lo:lo + n] = 0 where n > 0 (and `also` holds)."""
    cond = B.cmpi("gt", n, B.c_index(0))
    when = B.if_(cond if also is None else arith.AndIOp(cond, also).result)
    with ir.InsertionPoint(when.then_block):
        linalg.fill(B.c_float(0.0, et), outs=[B.subview(out, [lo, 0], [n, B.mdim(out, 1)])])
        scf.YieldOp([])


def chunk_out(cx: KernelContext, op: Operation, x: ir.Value, ws: list[ir.Value], rows: ir.Value, real: ir.Value,
              col0: ir.Value, width: ir.Value | None, start: ir.Value, perm: ir.Value, out: ir.Value,
              gates: ir.Value | None, part: ir.Value, et: ir.Type) -> None:
    """x (`rows` rows) @ each of ws, the epilogue, then the first `real` rows' columns col0.. of the
    output (`width` of them; None: all)."""
    if ir.RankedTensorType(x.type).rank == 3:  # rows packed by register tile (gather_packed)
        tiles = [_rows(cx.packed_matmul_tile(x, w, et)) for w in ws]
    else:
        tiles = [cx.matmul_tile(x, w, rows, B.sizes_of(w)[1], et) for w in ws]
    (y,) = cx.inline(op.epilogue, tiles, False)
    width = B.mdim(y, 1) if width is None else width
    y = B.slice_tensor(y, [0, 0], [real, width])
    if gates is None:
        B.write(y, B.subview(out, [start, col0], [real, width]))
    else:
        scatter_add(cx, op, y, perm, start, real, width, gates, out, part, col0)


def gather_packed(op: Operation, rows_t: ir.Value, perm: ir.Value, start: ir.Value, n: ir.Value, D: ir.Value,
                  et: ir.Type, m: int) -> ir.Value:
    """The chunk's n rows (as gather_rows) packed by register tile of m rows: [ceil(n / m), D, m], the rows
    past n zero (their products are dropped; zeros, not whatever the buffer held, keep them cheap)."""
    tiles = B.ceil_div(n, m)
    xp = B.empty([tiles, D, m], et)
    zero = linalg.fill(B.c_float(0.0, et), outs=[B.empty([1, D, m], et)])
    xp = B.insert_slice(zero, xp, [B.sub(tiles, B.c_index(1)), 0, 0], [1, D, m])
    rows = B.loop(0, n, 1, [xp])
    with ir.InsertionPoint(rows.body):
        i = rows.induction_variable
        if op.gather:
            a = arith.MaxSIOp(B.load(perm, B.add(start, i)), B.c_int(0)).result
            tok = B.as_index(arith.DivSIOp(a, B.c_int(op.topk)).result)
        else:
            tok = B.add(start, i)
        row = B.slice_tensor(rows_t, [tok, 0], [1, D], drop=[0])
        at = [arith.DivUIOp(i, B.c_index(m)).result, 0, arith.RemUIOp(i, B.c_index(m)).result]
        scf.YieldOp([B.insert_slice(row, rows.inner_iter_args[0], at, [1, D, 1])])
    return rows.results[0]


def _rows(y: ir.Value) -> ir.Value:
    """[tiles, m, n] as [tiles * m, n]."""
    t = ir.RankedTensorType(y.type)
    n = t.shape[2]
    out = ir.RankedTensorType.get([B.DYN(), n], t.element_type)
    return tensor.CollapseShapeOp(out, y, B.reassociation([0, 1], [2])).result


def gather_rows(cx: KernelContext, op: Operation, rows_t: ir.Value, perm: ir.Value, start: ir.Value, n: ir.Value,
                D: ir.Value, et: ir.Type) -> ir.Value:
    """rows[perm[start + i] // topk] (or rows[start + i] when the rows are already permuted); a padding
    row (perm -1) reads row 0."""
    if not op.gather:
        return B.slice_tensor(rows_t, [start, 0], [n, D])
    rows = B.loop(0, n, 1, [B.empty([n, D], et)])  # row by row: each a contiguous copy
    with ir.InsertionPoint(rows.body):
        i = rows.induction_variable
        a = arith.MaxSIOp(B.load(perm, B.add(start, i)), B.c_int(0)).result
        tok = B.as_index(arith.DivSIOp(a, B.c_int(op.topk)).result)
        row = B.slice_tensor(rows_t, [tok, 0], [1, D])
        scf.YieldOp([B.insert_slice(row, rows.inner_iter_args[0], [i, 0], [1, D])])
    return rows.results[0]


def scatter_add(cx: KernelContext, op: Operation, y: ir.Value, perm: ir.Value, start: ir.Value, n: ir.Value,
                N: ir.Value, gates: ir.Value, out: ir.Value, part: ir.Value, col0: ir.Value) -> None:
    """out[part, a // K, col0:col0 + N] += gates[a // K, a % K] * y[i] for the chunk's assignments
    a = perm[start + i]."""
    K = B.c_int(op.topk)
    rows = B.loop(0, n)
    with ir.InsertionPoint(rows.body):
        i = rows.induction_variable
        a = B.load(perm, B.add(start, i))
        t, j = B.as_index(arith.DivSIOp(a, K).result), B.as_index(arith.RemSIOp(a, K).result)
        g = B.load(gates, t, j)
        cols = B.loop(0, N)
        with ir.InsertionPoint(cols.body):
            c = cols.induction_variable
            # the product rounded before it is added (a fence: no FMA): a token's sum of gated rows is then the
            # same whichever parts, ranks or order its assignments are summed in (K = 2: bitwise)
            v = llvm.intr_arithmetic_fence(arith.MulFOp(g, B.extract(y, i, c)).result)
            oc = B.add(col0, c)
            B.store(arith.AddFOp(B.load(out, part, t, oc), v).result, out, part, t, oc)
            scf.YieldOp([])
        scf.YieldOp([])


def _claim(counter: ir.Value) -> ir.Value:
    """The next work item: counter[0], atomically incremented (every thread gets a different one)."""
    add = ir.IntegerAttr.get(ir.IntegerType.get_signless(64), 1)  # arith's AtomicRMWKind.addi
    return B.as_index(memref.AtomicRMWOp(add, B.c_int(1), counter, [B.c_index(0)]).result)


def _flatten(m: ir.Value) -> ir.Value:
    mt = ir.MemRefType(m.type)
    n = 1
    for s in mt.shape:
        n = B.DYN() if s == B.DYN() or n == B.DYN() else n * s
    out = ir.MemRefType.get([n], mt.element_type)
    return memref.CollapseShapeOp(out, m, B.reassociation(range(mt.rank))).result


def _ext(v: ir.Value, to: ir.Type) -> ir.Value:
    return v if v.type == to else arith.ExtFOp(to, v).result


def _argmax(n: ir.Value, values: ir.Value, taken: ir.Value, lo: ir.Value | None = None) -> ir.Value:
    """The first index in lo..lo+n of the largest value not yet taken (the lowest index on ties)."""
    f64 = ir.F64Type.get()
    lo = lo if lo is not None else B.c_index(0)
    loop = B.loop(0, n, 1, [B.c_float(float("-inf"), f64), B.c_index(-1)])
    with ir.InsertionPoint(loop.body):
        e = B.add(lo, loop.induction_variable)
        best, at = loop.inner_iter_args
        v = B.load(values, e)
        free = arith.XOrIOp(B.load(taken, e), B.c_int(1, 1)).result
        better = arith.OrIOp(B.cmpi("lt", at, B.c_index(0)), arith.CmpFOp(2, v, best).result).result
        take = arith.AndIOp(free, better).result
        scf.YieldOp([B.select(take, v, best), B.select(take, e, at)])
    return loop.results[1]


# ---- the host side ------------------------------------------------------------------------------------------
@LAUNCHES.lowers(M.DispatchOp)
def launch_dispatch(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """The permutation at its upper bound (every segment padded to the block), cut to its length after."""
    op = k.op
    t, kk = ins[0].shape
    e = op.num_experts
    lowest = -1 if op.drop_negative else 0
    if ins[0].size and (ins[0].min() < lowest or ins[0].max() >= e):
        raise SparsaError(f"moe.dispatch: expert id outside {lowest}..{e - 1}", op.loc)
    perm, offsets = np.empty(t * kk + e * (op.block - 1), np.int64), np.empty(e + 1, np.int64)
    fn.call(k, [ins[0], np.array([op.capacity_limit(t, kk)], np.int64), perm, offsets])
    return [perm[: offsets[-1]], offsets]


@LAUNCHES.lowers(M.GroupedMatmulOp, M.GroupedMatmulCombineOp)
def launch_grouped(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """Weights packed in panels once per loaded weights (kept with the weight-only results); chunks claimed
    from a shared counter; a combine's parts each write their own slice, summed here."""
    op = k.op
    weight_n = host.values[id(k.inputs[3])].shape[2]
    if k.packed_rows:
        ins[0] = pack_rows(ins[0], ins[1], op, k.packed_rows)
    for i in k.panels:
        if i in k.repacked:  # a weight that may change between calls: packed now, from what the host holds
            w = host.values[id(k.inputs[i])]
            ins[i] = pack_panels(w, fn.scratch((k.name, i), panels_shape(w.shape), w.dtype))
            continue
        ins[i] = cached_panels(host, k.inputs[i])
    threads = num_threads()
    n = DETERMINISTIC_PARTS if deterministic() else threads  # slices: fixed, or one per thread
    rt_ = op.result.type
    width = rt_.shape[1] if isinstance(rt_.shape[1], int) else weight_n
    if isinstance(op, M.GroupedMatmulCombineOp):
        out = np.empty((n, ins[4].shape[0], width), numpy_dtype(rt_.dtype))  # each part zeroes its slice
        fn.parts(k, ins + [out, np.zeros(1, np.int64)], n, threads)
        total = out[0] if n == 1 else np.add(out[0], out[1])  # the parts' sum, into a new array
        for p in range(2, n):
            total += out[p]
        return [total]
    out = np.empty((ins[1].shape[0], width), numpy_dtype(rt_.dtype))
    fn.parts(k, ins + [out, np.zeros(1, np.int64)], n, threads)  # (padding rows zeroed by the kernel)
    return [out]


# ---- the native host's side (host.py) ---------------------------------------------------------------------
@HOSTED.lowers(M.DispatchOp)
def hosted_dispatch(cx: KernelContext, op: Operation, k: Kernel) -> Hosted:
    """Expert ids checked first; the capacity limit made once per set of shapes; the permutation kept at its bound
    (T*K + E*(block-1), what offsets[E] says is used marked, the rest never read): only the grouped GEMMs read it."""
    ex = op.experts
    lowest = -1 if op.drop_negative else 0
    limit = Scratch(TensorType("i64", (1,)), lambda known, ctx: (1,), "capacity_limit",
                    lambda known, ctx: np.array([op.capacity_limit(*known[id(ex)])], np.int64))

    def shapes(known: dict, ctx: Any) -> list[tuple[int, ...]]:
        t, kk = known[id(ex)]
        return [(t * kk + op.num_experts * (op.block - 1),), (op.num_experts + 1,)]

    return Hosted(checks=[(ex, lambda known: (lowest, op.num_experts))], args=[ex, limit, *op.results],
                  shapes=shapes, padded=[op.results[0]])


@HOSTED.lowers(M.GroupedMatmulOp, M.GroupedMatmulCombineOp)
def hosted_grouped(cx: KernelContext, op: Operation, k: Kernel) -> Hosted | str:
    """The weights' panels as the Python host packed them (kept in the call's cache); a zeroed counter the parts
    claim chunks from; a combine's parts each write a slice of a workspace buffer, summed into the result after."""
    args: list[Any] = list(k.inputs)
    before = []
    if k.packed_rows:
        step, args[0] = pack_rows_kernel(cx, op, k.packed_rows)
        before.append(step)
    for i in k.panels:
        w = k.inputs[i]
        if i in k.repacked:  # a weight that may change between calls: packed at each call, by a kernel
            step, args[i] = pack_kernel(cx, op, w)
            before.append(step)
            continue
        args[i] = panels_scratch(w)
    counter = Scratch(TensorType("i64", (1,)), lambda known, ctx: (1,), "chunks_claimed")
    weight = k.inputs[3]
    rt = op.result.type

    def width(known: dict) -> int:
        return rt.shape[1] if isinstance(rt.shape[1], int) else known[id(weight)][2]

    def parts(ctx: Any) -> int:
        return DETERMINISTIC_PARTS if ctx.exact else ctx.threads

    if isinstance(op, M.GroupedMatmulCombineOp):
        slices = Scratch(TensorType(rt.dtype, (None,) + rt.shape), lambda known, ctx: (
            parts(ctx), known[id(op.gates)][0], width(known)), "part_slices")
        return Hosted(before, args=[*args, slices, counter], zeroed=[counter], items=parts,
                      sum_parts=[(slices, op.result)],
                      shapes=lambda known, ctx: [(known[id(op.gates)][0], width(known))])
    return Hosted(before, args=[*args, op.result, counter], zeroed=[counter], items=parts,
                  shapes=lambda known, ctx: [(known[id(op.perm)][0], width(known))], padded=[op.result])
