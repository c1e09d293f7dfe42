"""Attention at decode on the cpu target: a few query rows (static) against a long KV, Flash-Decoding style.

The keys are cut into chunks of CHUNK rows. A work item is (batch, KV head, chunk): each query head of the group
and each query row gets its scores against the chunk's key rows (read in place, untransposed: a dot product of
contiguous rows, in vectors of the target's width), their max, and the softmax-weighted sum of the chunk's value
rows, written as a partial (acc, m, l). A second kernel merges each row's partials by their log-sum-exp. K and V
are read once, which is what decode is bound by; the prefill kernel (attn.py) would transpose K first and tile
one query row into a register tile meant for 64."""

from __future__ import annotations

from torch_mlir import ir
from torch_mlir.dialects import arith, func, scf, vector
from torch_mlir.dialects import math as mmath

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.build import exp
from sparsa.backends.cpu.context import KernelContext, element_type
from sparsa.backends.cpu.signature import Kernel, Scratch
from sparsa.ir.core import Operation, Region
from sparsa.ir.dialects.attn_blocks import outer_values
from sparsa.ir.types import TensorType

DECODE_ROWS = 4  # static query rows at or under which attention decodes
CHUNK = 256  # key rows per work item: 256 x 64 floats of K and of V stay in L2 between the two passes


def decodes(cx: KernelContext, op: Operation) -> bool:
    """Whether `op` runs as decode: static query rows at most DECODE_ROWS, float32 head dims (static) that are
    whole vectors of the target's. A mask and a score modifier are evaluated inline on every score (their data
    read in place); a block map is not needed (one query row's tiles are as cheap to test element by element)."""
    q, v = op.q.type, op.v.type
    lanes = cx.target.lanes()
    return (isinstance(q.shape[2], int) and q.shape[2] <= DECODE_ROWS and q.dtype == "f32"
            and all(isinstance(d, int) and d % lanes == 0 for d in (q.shape[3], v.shape[3])))


def decode_kernels(cx: KernelContext, op: Operation) -> list[Kernel]:
    """The chunk kernel (writing a Scratch of partials) and the merge kernel (writing op's result)."""
    q_t, k_t, v_t = op.q.type, op.k.type, op.v.type
    Dh, Dv = q_t.shape[3], v_t.shape[3]
    et = element_type(q_t.dtype)
    lanes = cx.target.lanes()
    vt = ir.VectorType.get([lanes], et)
    partial_type = TensorType(q_t.dtype, q_t.shape[:3] + (None, Dv + 2))
    partials = Scratch(partial_type, lambda known, ctx: known[id(op.q)][:3] + (
        -(-known[id(op.k)][2] // CHUNK), Dv + 2), "decode_partials")
    reassoc = ir.Attribute.parse("#arith.fastmath<reassoc>")
    add = ir.Attribute.parse("#vector.kind<add>")
    ninf, zero = float("-inf"), 0.0

    data = []
    for region in (op.mask, op.score):
        if not region.empty:
            data += [x for x in outer_values(region) if all(x is not d for d in data)]
    start = len(cx.tiled)
    name, entry = cx.function(op, [q_t, k_t, v_t, *[d.type for d in data], partial_type], True, "attention_decode")
    q, k, v, *data_m, part_m, part, parts = entry.arguments
    with ir.InsertionPoint(entry):
        for x, m in zip(data, data_m, strict=True):
            cx.values[id(x)] = B.read(m)
        Hq, Sq = B.mdim(q, 1), B.mdim(q, 2)
        Bn, Hk, Sk = B.mdim(k, 0), B.mdim(k, 1), B.mdim(k, 2)
        rep = arith.DivUIOp(Hq, Hk).result
        NC = B.ceil_div(Sk, CHUNK)
        buf = B.alloca(B.c_index(CHUNK), et)
        scale = B.c_float(float(op.scale), et)
        items = B.loop(part, B.mul(B.mul(Bn, Hk), NC), parts)
        with ir.InsertionPoint(items.body):
            it = items.induction_variable
            c = arith.RemUIOp(it, NC).result
            bh = arith.DivUIOp(it, NC).result
            hk, b = arith.RemUIOp(bh, Hk).result, arith.DivUIOp(bh, Hk).result
            k0 = B.mul(c, B.c_index(CHUNK))
            nk = B.minsi(B.c_index(CHUNK), B.sub(Sk, k0))
            with B.nest([rep, Sq]) as (r, qi):
                h = B.add(B.mul(hk, rep), r)
                qv = [vector.LoadOp(vt, q, [b, h, qi, B.c_index(d)]).result for d in range(0, Dh, lanes)]
                scores = B.loop(0, nk, 1, [B.c_float(ninf, et)])  # pass 1: scores and their max
                with ir.InsertionPoint(scores.body):
                    j = scores.induction_variable
                    row = B.add(k0, j)
                    dot = None
                    for n, d in enumerate(range(0, Dh, lanes)):
                        kv = vector.LoadOp(vt, k, [b, hk, row, B.c_index(d)]).result
                        dot = arith.MulFOp(qv[n], kv).result if dot is None else vector.FMAOp(qv[n], kv, dot).result
                    s = arith.MulFOp(vector.ReductionOp(et, add, dot, fastmath=reassoc).result, scale).result
                    s = modified(cx, op, s, [b, h, qi, row], et)
                    B.store(s, buf, j)
                    scf.YieldOp([arith.MaximumFOp(scores.inner_iter_args[0], s).result])
                m = scores.results[0]
                # a chunk with nothing allowed (m = -inf) gives p = 0 everywhere, never NaN; the merge weighs it 0
                m_safe = B.select(arith.CmpFOp(1, m, B.c_float(ninf, et)).result, B.c_float(zero, et), m)
                acc0 = [vector.BroadcastOp(vt, B.c_float(zero, et)).result for _ in range(0, Dv, lanes)]
                sums = B.loop(0, nk, 1, [B.c_float(zero, et), *acc0])  # pass 2: exp, their sum, sum of p * V
                with ir.InsertionPoint(sums.body):
                    j = sums.induction_variable
                    p = exp(arith.SubFOp(B.load(buf, j), m_safe).result)
                    pv = vector.BroadcastOp(vt, p).result
                    accs = [vector.FMAOp(pv, vector.LoadOp(vt, v, [b, hk, B.add(k0, j), B.c_index(d)]).result,
                                         a).result for a, d in zip(sums.inner_iter_args[1:], range(0, Dv, lanes),
                                                                   strict=True)]
                    scf.YieldOp([arith.AddFOp(sums.inner_iter_args[0], p).result, *accs])
                for a, d in zip(sums.results[1:], range(0, Dv, lanes), strict=True):
                    vector.StoreOp(a, part_m, [b, h, qi, c, B.c_index(d)])
                B.store(m, part_m, b, h, qi, c, Dv)
                B.store(sums.results[0], part_m, b, h, qi, c, Dv + 1)
            scf.YieldOp([])
        func.ReturnOp([])
    chunks = cx.extra(Kernel(name, op, [op.q, op.k, op.v, *data], [partials], "parts"), start)

    start = len(cx.tiled)
    results = list(op.results)  # the output, and for attn.attention_lse each row's log-sum-exp
    name, entry = cx.function(op, [partial_type, *[r.type for r in results]], True, "attention_merge")
    part_m, out, *lse, part, parts = entry.arguments
    with ir.InsertionPoint(entry):
        Bn, Hq, Sq, NC = (B.mdim(part_m, i) for i in range(4))
        rows = B.loop(part, B.mul(B.mul(Bn, Hq), Sq), parts)
        with ir.InsertionPoint(rows.body):
            it = rows.induction_variable
            qi = arith.RemUIOp(it, Sq).result
            h = arith.RemUIOp(arith.DivUIOp(it, Sq).result, Hq).result
            b = arith.DivUIOp(it, B.mul(Sq, Hq)).result
            top = B.fold(NC, B.c_float(ninf, et), lambda c, a: arith.MaximumFOp(a, B.load(part_m, b, h, qi, c, Dv))
                         .result)
            # a chunk's weight exp(m_c - M): 0 for a chunk with nothing in it (and everywhere when there are no keys)
            safe = B.select(arith.CmpFOp(1, top, B.c_float(ninf, et)).result, B.c_float(zero, et), top)

            def weight(c: ir.Value) -> ir.Value:
                return exp(arith.SubFOp(B.load(part_m, b, h, qi, c, Dv), safe).result)

            den = B.fold(NC, B.c_float(zero, et), lambda c, a: arith.AddFOp(a, arith.MulFOp(
                weight(c), B.load(part_m, b, h, qi, c, Dv + 1)).result).result)
            positive = arith.CmpFOp(2, den, B.c_float(zero, et)).result

            def column(d: ir.Value) -> None:
                num = B.fold(NC, B.c_float(zero, et), lambda c, a: arith.AddFOp(a, arith.MulFOp(
                    weight(c), B.load(part_m, b, h, qi, c, d)).result).result)
                B.store(B.select(positive, arith.DivFOp(num, den).result, B.c_float(zero, et)), out, b, h, qi, d)

            B.each(B.c_index(Dv), column)
            if lse:  # M + log(sum), +inf for a row with nothing allowed (as the prefill kernel writes it)
                B.store(B.select(positive, arith.AddFOp(safe, mmath.LogOp(den).result).result,
                                 B.c_float(float("inf"), et)), lse[0], b, h, qi)
            scf.YieldOp([])
        func.ReturnOp([])
    merge = cx.extra(Kernel(name, op, [partials], results, "parts"), start)
    return [chunks, merge]


def modified(cx: KernelContext, op: Operation, s: ir.Value, at: list[ir.Value], et: ir.Type) -> ir.Value:
    """A scaled score through the score modifier, then -inf where the mask disallows (b, h, q, k)."""
    idx = [B.as_i64(i) for i in at]
    if not op.score.empty:
        (s,) = cx.inline(op.score, [s, *[cast_index(op.score, i + 1, x) for i, x in enumerate(idx)]], True)
    if not op.mask.empty:
        (ok,) = cx.inline(op.mask, [cast_index(op.mask, i, x) for i, x in enumerate(idx)], True)
        s = B.select(ok, s, B.c_float(float("-inf"), et))
    return s


def cast_index(region: Region, arg: int, x: ir.Value) -> ir.Value:
    """An i64 index as the integer type region argument `arg` declares."""
    want = element_type(region.block.args[arg].type.dtype)
    return x if want == x.type else arith.TruncIOp(want, x).result
