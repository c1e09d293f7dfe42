"""cpu lowering of the `tensor` dialect's linear-algebra part: the triangular solve, by substitution, with each
row of X built in vector registers."""

from __future__ import annotations

import functools

from torch_mlir import ir
from torch_mlir.dialects import arith, scf, vector

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.context import KERNELS, KernelContext, element_type
from sparsa.backends.cpu.signature import Kernel
from sparsa.ir.core import Operation
from sparsa.ir.dialects import tensor_linalg as L

SOLVE_VECTORS = 4  # vectors of X's columns one pass over a row's solved rows accumulates (registers, not spills)


@KERNELS.lowers(L.SolveTriangularOp)
def solve_triangular_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """Batch items split over threads. In each, X's columns are taken SOLVE_VECTORS vectors at a time (then one
    vector, then a masked one), and for each row i, in the order of the substitution: acc = B[i] - sum over the
    rows j solved before it of A[i, j] * X[j] (j < i for a lower A, j > i for an upper one), X[i] = acc / A[i, i]
    (or acc, with `unit`). The solved rows of the column block stay in L1."""
    t = op.b.type
    et = element_type(t.dtype)
    lanes = cx.target.lanes(ir.FloatType(et).width)
    vt = ir.VectorType.get([lanes], et)
    mask_t = ir.VectorType.get([lanes], ir.IntegerType.get_signless(1))
    batch = t.rank - 2

    def build(a: ir.Value, b: ir.Value, out: ir.Value, part: ir.Value, parts: ir.Value) -> None:
        sizes = B.sizes_of(b)
        n, k = B.as_index(sizes[-2]), B.as_index(sizes[-1])
        count = functools.reduce(B.mul, [B.as_index(s) for s in sizes[:batch]], B.c_index(1))
        items = B.loop(*B.share(part, parts, count))
        with ir.InsertionPoint(items.body):
            at, rest = [], items.induction_variable
            for s in reversed(sizes[:batch]):  # the item's batch indices, last dim fastest
                at.insert(0, arith.RemUIOp(rest, B.as_index(s)).result)
                rest = arith.DivUIOp(rest, B.as_index(s)).result

            def block(c0: ir.Value, vectors: int, mask: ir.Value | None) -> None:
                """Columns c0 .. c0 + vectors * lanes of every row of X (masked by `mask` when given)."""
                def cols(v: int) -> ir.Value:
                    return B.add(c0, B.c_index(v * lanes))

                def read(m: ir.Value, row: ir.Value, v: int) -> ir.Value:
                    if mask is None:
                        return vector.LoadOp(vt, m, [*at, row, cols(v)]).result
                    return vector.MaskedLoadOp(vt, m, [*at, row, cols(v)], mask, B.splat(0.0, vt)).result

                rows = B.loop(0, n)
                with ir.InsertionPoint(rows.body):
                    ii = rows.induction_variable
                    i = B.sub(B.sub(n, B.c_index(1)), ii) if op.upper else ii
                    lo, hi = (B.add(i, B.c_index(1)), n) if op.upper else (B.c_index(0), i)
                    sub = B.loop(lo, hi, 1, [read(b, i, v) for v in range(vectors)])
                    with ir.InsertionPoint(sub.body):
                        j = sub.induction_variable
                        factor = vector.BroadcastOp(vt, arith.NegFOp(B.load(a, *at, i, j)).result).result
                        scf.YieldOp([vector.FMAOp(factor, read(out, j, v), acc).result
                                     for v, acc in enumerate(sub.inner_iter_args)])
                    row = list(sub.results)
                    if not op.unit:
                        inverse = vector.BroadcastOp(vt, arith.DivFOp(B.c_float(1.0, et), B.load(a, *at, i, i)).result)
                        row = [arith.MulFOp(x, inverse.result).result for x in row]
                    for v, x in enumerate(row):
                        if mask is None:
                            vector.StoreOp(x, out, [*at, i, cols(v)])
                        else:
                            vector.MaskedStoreOp(out, [*at, i, cols(v)], mask, x)
                    scf.YieldOp([])

            wide = SOLVE_VECTORS * lanes
            whole = B.round_down(k, wide)
            B.each(whole, lambda c0: block(c0, SOLVE_VECTORS, None), step=wide)
            vectors = B.round_down(k, lanes)
            B.each(vectors, lambda c0: block(c0, 1, None), start=whole, step=lanes)
            tail = B.if_(B.cmpi("lt", vectors, k))
            with ir.InsertionPoint(tail.then_block):
                block(vectors, 1, vector.CreateMaskOp(mask_t, [B.sub(k, vectors)]).result)
                scf.YieldOp([])
            scf.YieldOp([])

    return cx.plain(op, [op.a, op.b], build, parts=True)

