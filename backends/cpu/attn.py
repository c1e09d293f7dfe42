"""cpu lowerings of the `attn` dialect: block-sparse flash attention over the key blocks its block map does
not mark EMPTY, masks and score modifiers inlined as scalar code (block maps of data masks: block_map.py)."""

from __future__ import annotations

from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, scf, vector
from torch_mlir.dialects import math as mmath

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.attn_decode import cast_index, decode_kernels, decodes
from sparsa.backends.cpu.build import exp
from sparsa.backends.cpu.context import (
    HOSTED,
    KERNELS,
    KernelContext,
    element_type,
)
from sparsa.backends.cpu.signature import Hosted, Kernel
from sparsa.ir.core import Operation
from sparsa.ir.dialects import attn as AT
from sparsa.ir.dialects.attn_blocks import EMPTY, FULL, outer_values


# ---- attention ------------------------------------------------------------------------------------
@KERNELS.lowers(AT.AttentionOp)
def attention_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """Flash attention per (batch, head, query block): an online softmax over the key blocks the block
    map does not mark EMPTY; FULL blocks skip the mask, PARTIAL ones evaluate it inline on the scores;
    grouped heads read their shared K/V in place; a row with nothing allowed gives zeros. The scores are made
    transposed, S^T = K Q^T (K's rows read in place; Q scaled and transposed once per query block), so the
    softmax's statistics run down the keys with a query row per vector lane (`softmax_columns`: no horizontal
    max or sum, the rescale factors a vector exp), and P^T is what the register tile of P V reads: a step of k
    is one run of consecutive floats. `attn.attention_lse` also writes each row's m + log(l) (+inf where nothing
    is allowed)."""
    data = []
    for region in (op.mask, op.score):
        if not region.empty:
            data += [v for v in outer_values(region) if all(v is not d for d in data)]
    inputs = [op.q, op.k, op.v] + ([op.block_map] if op.block_map is not None else []) + data
    types = [v.type for v in inputs]
    bq, bk = op.block_q or 64, op.block_k or 64
    name, entry = cx.function(op, types + [r.type for r in op.results], True)
    args = entry.arguments
    q, k, v = args[:3]
    bm = args[3] if op.block_map is not None else None
    out, *lse, part, parts = args[len(inputs):]
    et = element_type(op.q.type.dtype)
    masked = not op.mask.empty
    with ir.InsertionPoint(entry):
        for val, m in zip(data, args[len(inputs) - len(data):len(inputs)], strict=True):
            cx.values[id(val)] = B.read(m)
        qt, kr, vt = B.read(q), B.read(k), B.read(v)
        Bn, Hq, Sq, Dh = (B.mdim(q, i) for i in range(4))
        Hkv, Sk, Dv = B.mdim(k, 1), B.mdim(v, 2), B.mdim(v, 3)
        rep = arith.DivUIOp(Hq, Hkv).result
        NQ, NK = B.ceil_div(Sq, bq), B.ceil_div(Sk, bk)
        per_b = B.mul(Hq, NQ)
        items = B.loop(part, B.mul(Bn, per_b), parts)
        with ir.InsertionPoint(items.body):
            it = items.induction_variable
            b = arith.DivUIOp(it, per_b).result
            h = arith.RemUIOp(arith.DivUIOp(it, NQ).result, Hq).result
            i = arith.RemUIOp(it, NQ).result
            q0 = B.mul(i, B.c_index(bq))
            nq = B.minsi(B.c_index(bq), B.sub(Sq, q0))
            Q = B.slice_tensor(qt, [b, h, q0, 0], [1, 1, nq, Dh], drop=[0, 1])
            d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
            scale = B.c_float(float(op.scale), et)  # scale * (q . k) as (scale * q) . k: once per query block
            Q = cx.tile_map([(Q, [d1, d0])], [Dh, nq], et, lambda x: arith.MulFOp(x, scale).result)  # as Q^T
            ninf = B.c_float(float("-inf"), et)
            m0 = linalg.fill(ninf, outs=[B.empty([nq], et)])
            l0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty([nq], et)])
            a0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty([nq, Dv], et)])
            keys = B.loop(0, NK, 1, [m0, l0, a0])
            with ir.InsertionPoint(keys.body):
                j = keys.induction_variable
                state = list(keys.inner_iter_args)
                if bm is not None:
                    kind = tile_kind(bm, b, h, i, j)
                    live = B.if_(B.cmpi("ne", kind, B.c_int(EMPTY, 8)), [s.type for s in state])
                    with ir.InsertionPoint(live.then_block):
                        scf.YieldOp(attend(cx, op, Q, kr, vt, state, b, h, q0, nq, j, bk, Sk, Dh, Dv, rep, et,
                                                kind))
                    with ir.InsertionPoint(live.else_block):
                        scf.YieldOp(state)
                    scf.YieldOp(list(live.results))
                else:
                    scf.YieldOp(attend(cx, op, Q, kr, vt, state, b, h, q0, nq, j, bk, Sk, Dh, Dv, rep, et,
                                            B.c_int(1 if masked else FULL, 8)))
            _, l_fin, acc = keys.results
            zero = B.c_float(0.0, et)
            o = cx.tile_map([(acc, [d0, d1]), (l_fin, [d0])], [nq, Dv], et, lambda a, s: B.select(
                arith.CmpFOp(2, s, zero).result, arith.DivFOp(a, s).result, zero))
            B.write(o, B.subview(out, [b, h, q0, 0], [1, 1, nq, Dv], drop=[0, 1]))
            if lse:
                m_fin = keys.results[0]
                inf = B.c_float(float("inf"), et)
                lse_t = cx.tile_map([(m_fin, [d0]), (l_fin, [d0])], [nq], et, lambda m, s: B.select(
                    arith.CmpFOp(2, s, zero).result, arith.AddFOp(m, mmath.LogOp(s).result).result, inf))
                B.write(lse_t, B.subview(lse[0], [b, h, q0], [1, 1, nq], drop=[0, 1]))
            scf.YieldOp([])
        func.ReturnOp([])
    return Kernel(name, op, inputs, list(op.results), "parts", hosted=True)  # (a decode's kernels instead)


def tile_kind(bm: ir.Value, b: ir.Value, h: ir.Value, i: ir.Value, j: ir.Value) -> ir.Value:
    """The block map's EMPTY/PARTIAL/FULL of tile (i, j) for batch b, head h (the map broadcast over both)."""
    return B.load(bm, arith.RemUIOp(b, B.mdim(bm, 0)).result, arith.RemUIOp(h, B.mdim(bm, 1)).result, i, j)


def attend(cx: KernelContext, op: Operation, Q: ir.Value, kr: ir.Value, vt: ir.Value, state: list[ir.Value],
           b: ir.Value, h: ir.Value, q0: ir.Value, nq: ir.Value, j: ir.Value, bk: int, Sk: ir.Value, Dh: ir.Value,
           Dv: ir.Value, rep: ir.Value, et: ir.Type, kind: ir.Value) -> list[ir.Value]:
    """One key block of the online softmax: (m, l, acc) -> (m', l', acc'). Q comes scaled and transposed."""
    m, l_, acc = state
    k0 = B.mul(j, B.c_index(bk))
    nk = B.minsi(B.c_index(bk), B.sub(Sk, k0))
    hk = arith.DivUIOp(h, rep).result
    K = B.slice_tensor(kr, [b, hk, k0, 0], [1, 1, nk, Dh], drop=[0, 1])
    V = B.slice_tensor(vt, [b, hk, k0, 0], [1, 1, nk, Dv], drop=[0, 1])
    ST = cx.matmul_tile(K, Q, nk, nq, et)  # S^T [nk, nq]
    if op.mask.empty:
        ST = scores(cx, op, ST, b, h, q0, k0, nq, nk, et, False) if not op.score.empty else ST
    else:
        full = B.if_(B.cmpi("eq", kind, B.c_int(FULL, 8)), [ST.type])
        with ir.InsertionPoint(full.then_block):
            scf.YieldOp([scores(cx, op, ST, b, h, q0, k0, nq, nk, et, False) if not op.score.empty else ST])
        with ir.InsertionPoint(full.else_block):
            scf.YieldOp([scores(cx, op, ST, b, h, q0, k0, nq, nk, et, True)])
        ST = full.results[0]
    if isinstance(op.v.type.shape[3], int):
        m_new, l_new, PT, scaled = softmax_columns(ST, state, nk, nq, op.block_q or 64, op.v.type.shape[3], et)
        return [m_new, l_new, cx.matmul_tile(PT, V, nq, Dv, et, init=scaled, transpose_a=True)]
    d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
    S = cx.tile_map([(ST, [d1, d0])], [nq, nk], et, lambda s: s)  # (a Dv known only at run time: by rows)
    ninf, zero = B.c_float(float("-inf"), et), B.c_float(0.0, et)
    mx = cx.row_reduce(S, float("-inf"), lambda a, x: arith.MaximumFOp(a, x).result)
    m_new = cx.tile_map([(m, [d0]), (mx, [d0])], [nq], et, lambda a, x: arith.MaximumFOp(a, x).result)

    def safe(x: ir.Value) -> ir.Value:  # a row with nothing allowed yet keeps exp() at 0, never NaN
        return B.select(arith.CmpFOp(1, x, ninf).result, zero, x)

    P = cx.tile_map([(S, [d0, d1]), (m_new, [d0])], [nq, nk], et,
                      lambda s, mn: exp(arith.SubFOp(s, safe(mn)).result))
    alpha = cx.tile_map([(m, [d0]), (m_new, [d0])], [nq], et,
                          lambda mo, mn: exp(arith.SubFOp(mo, safe(mn)).result))
    total = cx.row_reduce(P, 0.0, lambda a, x: arith.AddFOp(a, x).result)
    l_new = cx.tile_map([(l_, [d0]), (alpha, [d0]), (total, [d0])], [nq], et,
                          lambda s, al, t: arith.AddFOp(arith.MulFOp(s, al).result, t).result)
    scaled = cx.tile_map([(acc, [d0, d1]), (alpha, [d0])], [nq, Dv], et, lambda a, al: arith.MulFOp(a, al).result)
    return [m_new, l_new, cx.matmul_tile(P, V, nq, Dv, et, init=scaled)]


def softmax_columns(ST: ir.Value, state: list[ir.Value], nk: ir.Value, nq: ir.Value, bq: int, dv: int,
                    et: ir.Type) -> tuple[ir.Value, ...]:
    """The online softmax's step for one key block on S^T [nk, nq], a query row per vector lane (the lanes past
    the block's rows read as -inf and are never written): down the keys the rows' max, m' = max(m, that); then
    P^T's rows exp(s - m') and their sum, l' = l * exp(m - m') + sum; acc's rows scaled by exp(m - m'). Returns
    (m', l', P^T, scaled acc). Nothing is reduced across lanes. (Before, a pass over S's rows with a horizontal
    max and sum and a scalar exp a row: 35% of causal attention's time.)"""
    m, l_, acc = state
    vt, vd = ir.VectorType.get([bq], et), ir.VectorType.get([dv], et)
    row = ir.AffineMap.get(2, 0, [ir.AffineDimExpr.get(1)])
    ninf, zero = B.c_float(float("-inf"), et), B.c_float(0.0, et)
    c0 = B.c_index(0)
    zeros, ninfs = vector.BroadcastOp(vt, zero).result, vector.BroadcastOp(vt, ninf).result
    one = ir.AffineMap.get_minor_identity(1, 1)  # m, l: one vector of the block's rows

    def largest(a: ir.Value, b: ir.Value) -> ir.Value:  # (one vmaxps: no NaN here to order)
        return arith.SelectOp(arith.CmpFOp(2, a, b).result, a, b).result

    def column(t: ir.Value, k: ir.Value) -> ir.Value:
        return vector.TransferReadOp(vt, t, [k, c0], row, ninf, [False]).result

    ups = B.loop(0, nk, 1, [ninfs])
    with ir.InsertionPoint(ups.body):
        scf.YieldOp([largest(column(ST, ups.induction_variable), ups.inner_iter_args[0])])
    mo = vector.TransferReadOp(vt, m, [c0], one, ninf, [False]).result
    lo = vector.TransferReadOp(vt, l_, [c0], one, zero, [False]).result
    mn = largest(ups.results[0], mo)
    safe = arith.SelectOp(arith.CmpFOp(1, mn, ninfs).result, zeros, mn).result
    alpha = exp(arith.SubFOp(mo, safe).result)  # a row with nothing allowed yet keeps exp() at 0, never NaN
    ps = B.loop(0, nk, 1, [B.empty([nk, nq], et), zeros])
    with ir.InsertionPoint(ps.body):
        k = ps.induction_variable
        PT, total = ps.inner_iter_args
        p = exp(arith.SubFOp(column(ST, k), safe).result)
        PT = vector.TransferWriteOp(PT.type, p, PT, [k, c0], row, [False]).result
        scf.YieldOp([PT, arith.AddFOp(total, p).result])
    PT, total = ps.results
    ln = arith.AddFOp(arith.MulFOp(lo, alpha).result, total).result
    m_new = vector.TransferWriteOp(m.type, mn, m, [c0], one, [False]).result
    l_new = vector.TransferWriteOp(l_.type, ln, l_, [c0], one, [False]).result
    factors = vector.TransferWriteOp(m.type, alpha, B.empty([nq], et), [c0], one, [False]).result
    rows = B.loop(0, nq, 1, [acc])
    with ir.InsertionPoint(rows.body):
        r = rows.induction_variable
        at = rows.inner_iter_args[0]
        a = vector.TransferReadOp(vd, at, [r, c0], row, zero, [True]).result
        a = arith.MulFOp(a, vector.BroadcastOp(vd, B.extract(factors, r)).result).result
        scf.YieldOp([vector.TransferWriteOp(at.type, a, at, [r, c0], row, [True]).result])
    return m_new, l_new, PT, rows.results[0]


def scores(cx: KernelContext, op: Operation, S: ir.Value, b: ir.Value, h: ir.Value, q0: ir.Value, k0: ir.Value,
           nq: ir.Value, nk: ir.Value, et: ir.Type, masked: bool) -> ir.Value:
    """s (scaled already: Q is), then the score modifier, then (PARTIAL blocks) -inf where the mask disallows."""
    d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)

    def body(s: ir.Value) -> ir.Value:  # (S^T: a key per row, a query per column)
        idx = [B.as_i64(b), B.as_i64(h), B.as_i64(B.add(q0, linalg.IndexOp(1).result)),
               B.as_i64(B.add(k0, linalg.IndexOp(0).result))]
        if not op.score.empty:
            (s,) = cx.inline(op.score, [s, *[cast_index(op.score, i + 1, x) for i, x in enumerate(idx)]],
                               True)
        if masked:
            (ok,) = cx.inline(op.mask, [cast_index(op.mask, i, x) for i, x in enumerate(idx)], True)
            s = B.select(ok, s, B.c_float(float("-inf"), et))
        return s

    return cx.tile_map([(S, [d0, d1])], [nk, nq], et, body)


@HOSTED.lowers(AT.AttentionOp)
def hosted_attention(cx: KernelContext, op: Operation, k: Kernel) -> Hosted:
    """The kernel on its operands; or, for a few query rows, the decode kernels (attn_decode.py), which read K and V
    once in place."""
    if decodes(cx, op):
        return Hosted(before=decode_kernels(cx, op), instead=True)
    return Hosted()
