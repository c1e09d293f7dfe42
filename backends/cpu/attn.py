"""cpu lowerings of the `attn` dialect: block-sparse flash attention over the key blocks its block map does
not mark EMPTY, masks and score modifiers inlined as scalar code; block maps of data masks are the host's."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, scf, tensor, vector
from torch_mlir.dialects import math as mmath

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.attn_decode import cast_index, decode_kernels, decodes
from sparsa.backends.cpu.build import exp
from sparsa.backends.cpu.context import (
    HOSTED,
    KERNELS,
    LAUNCHES,
    KernelContext,
    element_type,
    host,
)
from sparsa.backends.cpu.signature import Hosted, Kernel
from sparsa.backends.cpu.tensor_shape import transpose_kernel
from sparsa.backends.cpu.threads import transposed_blocks
from sparsa.ir.core import Operation
from sparsa.ir.dialects import attn as AT
from sparsa.ir.dialects.attn_blocks import EMPTY, FULL, BlockMapOp, outer_values
from sparsa.ir.types import TensorType

# a block map of a data mask: the interval classification of attn_blocks.py, O(blocks) per call on the host
KERNELS.lowers(BlockMapOp)(host)


# ---- attention ------------------------------------------------------------------------------------
@KERNELS.lowers(AT.AttentionOp)
def attention_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """Flash attention per (batch, head, query block): an online softmax over the key blocks the block
    map does not mark EMPTY; FULL blocks skip the mask, PARTIAL ones evaluate it inline on the scores;
    grouped heads read their shared K/V in place; a row with nothing allowed gives zeros. K comes
    transposed by key block ([B, Hk, NK, Dh, bk], one copy per call by the host): Q @ K^T with K^T's rows
    contiguous runs 20-25% faster than reading K's columns in the register tile, and a block's K^T in one run
    another ~8% (rows of a whole K^T lay Sk * 4 bytes apart: at Sk = 4096 all in the same few L1 sets).
    `attn.attention_lse` also writes each row's m + log(l) (+inf where nothing is allowed)."""
    data = []
    for region in (op.mask, op.score):
        if not region.empty:
            data += [v for v in outer_values(region) if all(v is not d for d in data)]
    inputs = [op.q, op.k, op.v] + ([op.block_map] if op.block_map is not None else []) + data
    types = [v.type for v in inputs]
    kt_ = op.k.type  # the host passes K transposed by key block, [B, Hk, NK, Dh, bk]: Q @ K^T reads rows of one
    bq, bk = op.block_q or 64, op.block_k or 64
    types[1] = TensorType(kt_.dtype, kt_.shape[:2] + (None, kt_.shape[3], bk))
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
        qt, kt, vt = B.read(q), B.read(k), B.read(v)
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
            Q = cx.tile_map([(Q, [d0, d1])], [nq, Dh], et, lambda x: arith.MulFOp(x, scale).result)
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
                        scf.YieldOp(attend(cx, op, Q, kt, vt, state, b, h, q0, nq, j, bk, Sk, Dh, Dv, rep, et,
                                                kind))
                    with ir.InsertionPoint(live.else_block):
                        scf.YieldOp(state)
                    scf.YieldOp(list(live.results))
                else:
                    scf.YieldOp(attend(cx, op, Q, kt, vt, state, b, h, q0, nq, j, bk, Sk, Dh, Dv, rep, et,
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
    return Kernel(name, op, inputs, list(op.results), "parts")


def tile_kind(bm: ir.Value, b: ir.Value, h: ir.Value, i: ir.Value, j: ir.Value) -> ir.Value:
    """The block map's EMPTY/PARTIAL/FULL of tile (i, j) for batch b, head h (the map broadcast over both)."""
    return B.load(bm, arith.RemUIOp(b, B.mdim(bm, 0)).result, arith.RemUIOp(h, B.mdim(bm, 1)).result, i, j)


def attend(cx: KernelContext, op: Operation, Q: ir.Value, kt: ir.Value, vt: ir.Value, state: list[ir.Value],
           b: ir.Value, h: ir.Value, q0: ir.Value, nq: ir.Value, j: ir.Value, bk: int, Sk: ir.Value, Dh: ir.Value,
           Dv: ir.Value, rep: ir.Value, et: ir.Type, kind: ir.Value) -> list[ir.Value]:
    """One key block of the online softmax: (m, l, acc) -> (m', l', acc')."""
    m, l_, acc = state
    k0 = B.mul(j, B.c_index(bk))
    nk = B.minsi(B.c_index(bk), B.sub(Sk, k0))
    hk = arith.DivUIOp(h, rep).result
    KT = B.slice_tensor(kt, [b, hk, j, 0, 0], [1, 1, 1, Dh, nk], drop=[0, 1, 2])
    V = B.slice_tensor(vt, [b, hk, k0, 0], [1, 1, nk, Dv], drop=[0, 1])
    S = cx.matmul_tile(Q, KT, nq, nk, et)  # Q comes scaled
    if op.mask.empty:
        S = scores(cx, op, S, b, h, q0, k0, nq, nk, et, False) if not op.score.empty else S
    else:
        full = B.if_(B.cmpi("eq", kind, B.c_int(FULL, 8)), [S.type])
        with ir.InsertionPoint(full.then_block):
            scf.YieldOp([scores(cx, op, S, b, h, q0, k0, nq, nk, et, False) if not op.score.empty else S])
        with ir.InsertionPoint(full.else_block):
            scf.YieldOp([scores(cx, op, S, b, h, q0, k0, nq, nk, et, True)])
        S = full.results[0]
    if isinstance(op.v.type.shape[3], int):
        m_new, l_new, P, scaled = softmax_rows(S, state, nq, bk, op.v.type.shape[3], et)
        P = B.slice_tensor(P, [0, 0], [nq, nk])  # a last block narrower than bk: its columns
        return [m_new, l_new, cx.matmul_tile(P, V, nq, Dv, et, init=scaled)]
    d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
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


def softmax_rows(S: ir.Value, state: list[ir.Value], nq: ir.Value, bk: int, dv: int,
                 et: ir.Type) -> tuple[ir.Value, ...]:
    """The online softmax's step for one key block in one pass over its rows, each row's scores one vector of bk
    (the columns past the block's width read as -inf, weighing nothing): its max, m' = max(m, that), P's row
    exp(s - m'), l' = l * exp(m - m') + the row's sum, and acc's row scaled by exp(m - m'). Returns
    (m', l', P, scaled acc). Before, each step was a tile op of its own over the block (the sums scalar, through
    memory): half the kernel's time on causal S=4096."""
    m, l_, acc = state
    vt, vd = ir.VectorType.get([bk], et), ir.VectorType.get([dv], et)
    row = ir.AffineMap.get(2, 0, [ir.AffineDimExpr.get(1)])
    ninf, zero = B.c_float(float("-inf"), et), B.c_float(0.0, et)
    biggest, add = ir.Attribute.parse("#vector.kind<maximumf>"), ir.Attribute.parse("#vector.kind<add>")
    reassoc = ir.Attribute.parse("#arith.fastmath<reassoc>")
    c0 = B.c_index(0)
    loop = B.loop(0, nq, 1, [B.empty([nq, bk], et), m, l_, acc])
    with ir.InsertionPoint(loop.body):
        r = loop.induction_variable
        P, mt, lt, at = loop.inner_iter_args
        s = vector.TransferReadOp(vt, S, [r, c0], row, ninf, [False]).result
        mo, lo = B.extract(mt, r), B.extract(lt, r)
        mn = arith.MaximumFOp(mo, vector.ReductionOp(et, biggest, s).result).result
        safe = B.select(arith.CmpFOp(1, mn, ninf).result, zero, mn)  # nothing allowed yet: exp() stays 0
        p = exp(arith.SubFOp(s, vector.BroadcastOp(vt, safe).result).result)
        P = vector.TransferWriteOp(P.type, p, P, [r, c0], row, [False]).result
        alpha = exp(arith.SubFOp(mo, safe).result)
        ln = arith.AddFOp(arith.MulFOp(lo, alpha).result, vector.ReductionOp(et, add, p, fastmath=reassoc).result)
        a = vector.TransferReadOp(vd, at, [r, c0], row, zero, [True]).result
        a = arith.MulFOp(a, vector.BroadcastOp(vd, alpha).result).result
        at = vector.TransferWriteOp(at.type, a, at, [r, c0], row, [True]).result
        scf.YieldOp([P, tensor.InsertOp(mn, mt, [r]).result, tensor.InsertOp(ln.result, lt, [r]).result, at])
    P, m_new, l_new, scaled = loop.results
    return m_new, l_new, P, scaled


def scores(cx: KernelContext, op: Operation, S: ir.Value, b: ir.Value, h: ir.Value, q0: ir.Value, k0: ir.Value,
           nq: ir.Value, nk: ir.Value, et: ir.Type, masked: bool) -> ir.Value:
    """s (scaled already: Q is), then the score modifier, then (PARTIAL blocks) -inf where the mask disallows."""
    d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)

    def body(s: ir.Value) -> ir.Value:
        idx = [B.as_i64(b), B.as_i64(h), B.as_i64(B.add(q0, linalg.IndexOp(0).result)),
               B.as_i64(B.add(k0, linalg.IndexOp(1).result))]
        if not op.score.empty:
            (s,) = cx.inline(op.score, [s, *[cast_index(op.score, i + 1, x) for i, x in enumerate(idx)]],
                               True)
        if masked:
            (ok,) = cx.inline(op.mask, [cast_index(op.mask, i, x) for i, x in enumerate(idx)], True)
            s = B.select(ok, s, B.c_float(float("-inf"), et))
        return s

    return cx.tile_map([(S, [d0, d1])], [nq, nk], et, body)


@HOSTED.lowers(AT.AttentionOp)
def hosted_attention(cx: KernelContext, op: Operation, k: Kernel) -> Hosted:
    """K transposed into a workspace buffer first, by a kernel of its own; or, for a few query rows, the decode
    kernels (attn_decode.py), which read K and V once in place."""
    if decodes(cx, op):
        return Hosted(before=decode_kernels(cx, op), instead=True)
    step, kt = transpose_kernel(cx, op, op.k, op.block_k or 64)
    args = [*k.inputs, *k.outputs]
    args[1] = kt
    return Hosted(before=[step], args=args)


@LAUNCHES.lowers(AT.AttentionOp)
def launch_attention(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """K transposed once per call: the kernel reads K^T."""
    ins[1] = transposed_blocks(ins[1], k.op.block_k or 64)
    return fn.run(k, host, ins)
