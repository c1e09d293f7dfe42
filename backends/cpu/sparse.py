"""cpu lowerings of the `sparse` dialect: BSR and N:M matmuls over the stored blocks only, a dense product
for sparse values that are not weights; layouts are packed by the host (once, for weights)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, memref, scf, tensor

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.context import (
    HOSTED,
    KERNELS,
    LAUNCHES,
    LOWERINGS,
    PARALLEL,
    REDUCTION,
    KernelContext,
    element_type,
    host,
)
from sparsa.backends.cpu.signature import Hosted, Kernel, Scratch
from sparsa.backends.cpu.tensor_shape import matmul
from sparsa.backends.cpu.threads import num_threads
from sparsa.ir.core import Operation, Value
from sparsa.ir.dialects import sparse as SP
from sparsa.ir.types import TensorType, numpy_dtype

# layout checks and packings whose sizes depend on the data: the host (the weights' once, cached)
KERNELS.lowers(SP.ConvertOp, SP.PackBsrOp, SP.PackNmOp)(host)


@LOWERINGS.lowers(SP.SparseMatmulOp)
def lower_sparse_matmul(cx: KernelContext, op: Operation) -> ir.Value:
    """x @ w for a sparse-layout w that is not a weight (lower-sparse-weights packs the weights): the
    value is the dense product."""
    return matmul(cx, op, op.x, op.w)


# ---- sparse weights ---------------------------------------------------------------------------------
@KERNELS.lowers(SP.BsrMatmulOp)
def bsr_matmul_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """x [M, K] @ W with W in BSR: for each stored block (r, c), out[:, c] += x[:, r] @ block; the
    empty blocks cost nothing. The host passes x and the output as 2-D and splits M across threads."""
    x2 = TensorType(op.x.type.dtype, (None, op.x.type.shape[-1]))
    out2 = TensorType(op.result.type.dtype, (None, op.cols))
    name, entry = cx.function(op, [x2, op.row_ptr.type, op.col_idx.type, op.blocks.type, out2], False)
    x, row_ptr, col_idx, blocks, out = entry.arguments
    et = element_type(out2.dtype)
    if all(isinstance(d, int) for d in op.blocks.type.shape[1:]):
        with ir.InsertionPoint(entry):
            _bsr_by_columns(cx, op, x, row_ptr, col_idx, blocks, out, et)
            func.ReturnOp([])
        return Kernel(name, op, list(op.operands), [op.result], "rows", [True, False, False, False])
    with ir.InsertionPoint(entry):
        xt, bt = B.read(x), B.read(blocks)
        M = B.mdim(x, 0)
        br, bc = B.mdim(blocks, 1), B.mdim(blocks, 2)
        acc0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty([M, op.cols], et)])
        rows = B.loop(0, B.sub(B.mdim(row_ptr, 0), B.c_index(1)), 1, [acc0])
        with ir.InsertionPoint(rows.body):
            r = rows.induction_variable
            xs = B.slice_tensor(xt, [0, B.mul(r, br)], [M, br])
            stored = B.loop(B.load(row_ptr, r), B.load(row_ptr, B.add(r, B.c_index(1))), 1,
                            [rows.inner_iter_args[0]])
            with ir.InsertionPoint(stored.body):
                i, acc = stored.induction_variable, stored.inner_iter_args[0]
                c0 = B.mul(B.as_index(B.load(col_idx, i)), bc)
                blk = B.slice_tensor(bt, [i, 0, 0], [1, br, bc], drop=[0])
                cur = B.slice_tensor(acc, [0, c0], [M, bc])
                new = cx.matmul_tile(xs, blk, M, bc, et, init=cur)
                scf.YieldOp([B.insert_slice(new, acc, [0, c0], [M, bc])])
            scf.YieldOp([stored.results[0]])
        B.write(rows.results[0], out)
        func.ReturnOp([])
    return Kernel(name, op, list(op.operands), [op.result], "rows", [True, False, False, False])


BSR_ROWS = 64  # rows of x a block column's output tile covers: [64, bc] accumulated in L1 over its blocks


def _bsr_by_columns(cx: KernelContext, op: Operation, x: ir.Value, row_ptr: ir.Value, col_idx: ir.Value,
                    blocks: ir.Value, out: ir.Value, et: ir.Type) -> None:
    """x @ W block column by block column: the stored blocks put in column order first (a counting sort of
    col_idx, O(blocks)), then for each BSR_ROWS rows of x and each block column, the column's blocks accumulate
    into one [BSR_ROWS, bc] tile that stays in L1 and is stored once (zeros where a column has no block). In
    row order every block read and wrote its [M, bc] column of the output: the output (16 MB for 2048 x 4096)
    streamed through memory once per stored block."""
    br, bc = op.blocks.type.shape[1:]
    idx = B.index()
    bt = B.read(blocks)
    M, nbr, nnz = B.mdim(x, 0), B.sub(B.mdim(row_ptr, 0), B.c_index(1)), B.mdim(col_idx, 0)
    ncb = op.cols // bc

    def buf(n: ir.Value | int, t: ir.Type) -> ir.Value:
        return memref.AllocOp(ir.MemRefType.get([B.DYN()], t), [B.as_index(n)], []).result

    col_ptr, cursor, order, brow = buf(ncb + 1, idx), buf(ncb + 1, idx), buf(nnz, idx), buf(nnz, idx)
    B.each(B.c_index(ncb + 1), lambda c: B.store(B.c_index(0), col_ptr, c))

    def stored(body: Any) -> None:  # body(block row, block index, its block column) over the stored blocks
        def row(r: ir.Value) -> None:
            each = B.loop(B.as_index(B.load(row_ptr, r)), B.as_index(B.load(row_ptr, B.add(r, B.c_index(1)))))
            with ir.InsertionPoint(each.body):
                i = each.induction_variable
                body(r, i, B.as_index(B.load(col_idx, i)))
                scf.YieldOp([])
        B.each(nbr, row)

    def count(r: ir.Value, i: ir.Value, c: ir.Value) -> None:
        at = B.add(c, B.c_index(1))
        B.store(B.add(B.load(col_ptr, at), B.c_index(1)), col_ptr, at)

    stored(count)
    B.each(B.c_index(ncb), lambda c: B.store(B.add(B.load(col_ptr, B.add(c, B.c_index(1))), B.load(col_ptr, c)),
                                             col_ptr, B.add(c, B.c_index(1))))
    B.each(B.c_index(ncb), lambda c: B.store(B.load(col_ptr, c), cursor, c))

    def place(r: ir.Value, i: ir.Value, c: ir.Value) -> None:
        p = B.load(cursor, c)
        B.store(i, order, p)
        B.store(r, brow, p)
        B.store(B.add(p, B.c_index(1)), cursor, c)

    stored(place)
    m = cx.target.tile[0]
    K = B.mdim(x, 1)
    tile = memref.AllocOp(ir.MemRefType.get([BSR_ROWS, bc], et), [], []).result
    packed = memref.AllocOp(ir.MemRefType.get([BSR_ROWS // m, B.DYN(), m], et), [K], []).result
    chunks = B.loop(0, M, BSR_ROWS)
    with ir.InsertionPoint(chunks.body):
        m0 = chunks.induction_variable
        mc = B.minsi(B.c_index(BSR_ROWS), B.sub(M, m0))
        tiles = B.ceil_div(mc, m)
        # the chunk's rows packed by register tile ([tiles, K, m], rows past M zero): a k step of a block's GEMM
        # reads m consecutive floats, not m rows a row of x apart
        xp = B.subview(packed, [0, 0, 0], [tiles, K, m])
        d = [ir.AffineDimExpr.get(k) for k in range(3)]
        zero = B.c_float(0.0, et)

        def row(*_: ir.Value) -> ir.Value:
            at = B.add(m0, B.add(B.mul(linalg.IndexOp(0).result, B.c_index(m)), linalg.IndexOp(2).result))
            inside = B.cmpi("lt", at, M)
            return B.select(inside, B.load(x, B.select(inside, at, B.c_index(0)), linalg.IndexOp(1).result), zero)

        B.memref_generic([], xp, d, [PARALLEL] * 3, row)
        xpt = B.read(xp)
        acc = B.subview(tile, [0, 0], [B.mul(tiles, B.c_index(m)), bc])
        columns = B.loop(0, ncb)
        with ir.InsertionPoint(columns.body):
            c = columns.induction_variable
            linalg.fill(zero, outs=[acc])
            column = B.loop(B.load(col_ptr, c), B.load(col_ptr, B.add(c, B.c_index(1))))
            with ir.InsertionPoint(column.body):
                p = column.induction_variable
                i, r = B.load(order, p), B.load(brow, p)
                ap = B.slice_tensor(xpt, [0, B.mul(r, B.c_index(br)), 0], [tiles, br, m])
                blk = B.slice_tensor(bt, [i, 0, 0], [1, br, bc], drop=[0])
                init = tensor.ExpandShapeOp(ir.RankedTensorType.get([B.DYN(), m, bc], et), B.read(acc, writable=True),
                                            B.reassociation([0, 1], [2]), [tiles], [B.DYN(), m, bc]).result
                y = cx.packed_matmul_tile(ap, blk, et, init)
                flat = ir.RankedTensorType.get([B.DYN(), bc], et)
                whole = tensor.CollapseShapeOp(flat, y, B.reassociation([0, 1], [2]))
                B.write(whole.result, acc)
                scf.YieldOp([])
            B.write(B.slice_tensor(B.read(acc), [0, 0], [mc, bc]), B.subview(out, [m0, B.mul(c, B.c_index(bc))],
                                                                                 [mc, bc]))
            scf.YieldOp([])
        scf.YieldOp([])



@KERNELS.lowers(SP.NmMatmulOp)
def nm_matmul_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """x [M, K] @ W with W stored N:M along K: each output reads only the n kept inputs of every m."""
    x2 = TensorType(op.x.type.dtype, (None, op.x.type.shape[-1]))
    out2 = TensorType(op.result.type.dtype, (None, op.values.type.shape[1]))
    name, entry = cx.function(op, [x2, op.values.type, op.indices.type, out2], False)
    x, values, indices, out = entry.arguments
    et = element_type(out2.dtype)
    with ir.InsertionPoint(entry):
        xt, vt, it = B.read(x), B.read(values), B.read(indices)
        M, N = B.mdim(x, 0), B.mdim(values, 1)
        init = linalg.fill(B.c_float(0.0, et), outs=[B.empty([M, N], et)])
        d = [ir.AffineDimExpr.get(i) for i in range(3)]
        g = linalg.GenericOp([init.type], [vt, it], [init], B.maps(3, [[d[2], d[1]], [d[2], d[1]], [d[0], d[1]]]),
                             B.iterators([PARALLEL, PARALLEL, REDUCTION]))
        block = g.regions[0].blocks.append(et, ir.IntegerType.get_signless(8), et)
        with ir.InsertionPoint(block):
            w, off, acc = block.arguments
            kk = linalg.IndexOp(2).result
            col = B.add(B.mul(arith.DivUIOp(kk, B.c_index(op.n)).result, B.c_index(op.m)), B.as_index(off))
            xv = B.extract(xt, linalg.IndexOp(0).result, col)
            linalg.YieldOp([arith.AddFOp(acc, arith.MulFOp(xv, w).result).result])
        B.write(g.result, out)
        func.ReturnOp([])
    return Kernel(name, op, list(op.operands), [op.result], "rows", [True, False, False])


@HOSTED.lowers(SP.BsrMatmulOp, SP.NmMatmulOp)
def hosted_rows(cx: KernelContext, op: Operation, k: Kernel) -> Hosted:
    """x and the result as 2-D rows: views of their buffers."""
    width = op.result.type.shape[-1]

    def rows(v: Value) -> Scratch:
        return Scratch(TensorType(v.type.dtype, (None, v.type.shape[-1])), lambda known, ctx: (
            math.prod(known[id(v)][:-1]), known[id(v)][-1]), f"{v.name_hint or 'result'}_rows", alias=v)

    shapes = (lambda known, ctx: [known[id(op.x)][:-1] + (width,)]) if isinstance(width, int) else None
    return Hosted(args=[rows(op.x), *k.inputs[1:], rows(op.result)], shapes=shapes)


@LAUNCHES.lowers(SP.BsrMatmulOp, SP.NmMatmulOp)
def launch_rows(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """x as 2-D rows, split over threads with the output."""
    op = k.op
    shape = host.shape_of(op.result.type)
    x = ins[0].reshape(-1, ins[0].shape[-1])
    out = np.empty((x.shape[0], shape[-1]), numpy_dtype(op.result.type.dtype))
    fn.rows(k, [x] + ins[1:], out, [True] + k.rows[1:], num_threads())
    return [out.reshape(shape)]
