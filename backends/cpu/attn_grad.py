"""cpu lowering of attention's backward (ir/dialects/attn_grad.py): flash-attention-2's loop order over the
forward's block map, the probabilities recomputed per tile from the forward's log-sum-exp.

Per (batch, key/value head, key block), for each query head that shares it and each query block of its column of
the map that is not EMPTY, the tile transposed (S^T = K Q^T): P^T = exp(S^T - lse), dV += P^T dO,
dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q, and dS K added into this thread's partial dQ: five
products a tile. dK and dV rows are each item's own; the partial dQs (one per part) are summed by the host. FULL
tiles evaluate no mask, PARTIAL ones inline it; the score modifier and its derivative region are inlined as scalar
code. The host passes Q^T and dO^T, transposed on the kernel threads, so every product reads rows. A learned value
the score modifier reads gets, per tile, each allowed element's ds * d score / d read added at the element it read, in
this part's partial gradient (one per part, summed by the host like dQ's).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, memref, scf

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.attn import cast_index, tile_kind
from sparsa.backends.cpu.build import exp
from sparsa.backends.cpu.context import HOSTED, KERNELS, LAUNCHES, KernelContext, element_type
from sparsa.backends.cpu.signature import Hosted, Kernel, Scratch
from sparsa.backends.cpu.tensor_shape import transpose_kernel
from sparsa.backends.cpu.threads import num_threads, transposed
from sparsa.ir.core import Value
from sparsa.ir.dialects.attn_blocks import EMPTY, FULL, outer_values
from sparsa.ir.dialects.attn_grad import AttentionGradOp
from sparsa.ir.types import TensorType


def _transposed(t: TensorType) -> TensorType:
    return TensorType(t.dtype, t.shape[:2] + (t.shape[3], t.shape[2]))


def _start(cx: KernelContext, op: AttentionGradOp, extra: list[TensorType]) -> tuple:
    """The kernel function (operands, the mask's and score's data, the host's transposed copies, the results;
    split in parts), its arguments, the data read into the kernel, and the operands' memrefs by name."""
    data: list[Value] = []
    for region in (op.mask, op.score, op.score_grad, op.value_grad):
        if not region.empty:
            data += [v for v in outer_values(region) if all(v is not d for d in data)]
    inputs = list(op.operands) + data
    name, entry = cx.function(op, [v.type for v in inputs] + extra + [r.type for r in op.results], True)
    args = list(entry.arguments)
    named = dict(zip(["q", "k", "v"], args[:3], strict=True))
    rest = args[3:len(op.operands)]
    if op.block_map is not None:
        named["bm"], rest = rest[0], rest[1:]
    named.update(zip(["dout", "lse", "delta"], rest, strict=True))
    with ir.InsertionPoint(entry):
        for val, m in zip(data, args[len(op.operands):len(inputs)], strict=True):
            cx.values[id(val)] = B.read(m)
    return name, entry, inputs, named, args[len(inputs):]


def _tile_kind(op: AttentionGradOp, bm: ir.Value | None, b: ir.Value, h: ir.Value, i: ir.Value,
               j: ir.Value) -> ir.Value:
    if bm is None:
        return B.c_int(FULL if op.mask.empty else 1, 8)
    return tile_kind(bm, b, h, i, j)


def _visit(bm: ir.Value | None, kind: ir.Value, state: list[ir.Value], step) -> None:
    """step(state) on a tile the map does not mark EMPTY; the state unchanged on one it does."""
    if bm is None:
        scf.YieldOp(step(state))
        return
    live = B.if_(B.cmpi("ne", kind, B.c_int(EMPTY, 8)), [s.type for s in state], True)
    with ir.InsertionPoint(live.then_block):
        scf.YieldOp(step(state))
    with ir.InsertionPoint(live.else_block):
        scf.YieldOp(state)
    scf.YieldOp(list(live.results))


class _Tile:
    """One tile's elementwise steps, transposed: rows are the key block's keys, columns the query block's queries."""

    def __init__(self, cx: KernelContext, op: AttentionGradOp, b: ir.Value, h: ir.Value, q0: ir.Value,
                 k0: ir.Value, rows: ir.Value, cols: ir.Value, et: ir.Type):
        self.cx, self.op, self.b, self.h, self.q0, self.k0 = cx, op, b, h, q0, k0
        self.sizes, self.et = [rows, cols], et
        d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
        self.tile, self.row = [d0, d1], [d1]  # `row`: a per-query vector (lse, delta) along the columns

    def index(self, region: Any) -> list[ir.Value]:
        idx = [B.as_i64(self.b), B.as_i64(self.h), B.as_i64(B.add(self.q0, linalg.IndexOp(1).result)),
               B.as_i64(B.add(self.k0, linalg.IndexOp(0).result))]
        first = len(region.block.args) - 4
        return [cast_index(region, first + n, x) for n, x in enumerate(idx)]

    def probs(self, s: ir.Value, lse: ir.Value, kind: ir.Value) -> ir.Value:
        """P = exp(score(scale * s) - lse), 0 where the mask disallows (FULL tiles: no mask evaluated)."""
        if self.op.mask.empty:
            return self._probs(s, lse, False)
        full = B.if_(B.cmpi("eq", kind, B.c_int(FULL, 8)), [s.type], True)
        with ir.InsertionPoint(full.then_block):
            scf.YieldOp([self._probs(s, lse, False)])
        with ir.InsertionPoint(full.else_block):
            scf.YieldOp([self._probs(s, lse, True)])
        return full.results[0]

    def _probs(self, s: ir.Value, lse: ir.Value, masked: bool) -> ir.Value:
        op, cx, et = self.op, self.cx, self.et
        scale, zero = B.c_float(float(op.scale), et), B.c_float(0.0, et)

        def body(x: ir.Value, lv: ir.Value) -> ir.Value:
            x = arith.MulFOp(x, scale).result
            if not op.score.empty:
                (x,) = cx.inline(op.score, [x, *self.index(op.score)], True)
            p = exp(arith.SubFOp(x, lv).result)
            if masked:
                (ok,) = cx.inline(op.mask, self.index(op.mask), True)
                p = B.select(ok, p, zero)
            return p

        return cx.tile_map([(s, self.tile), (lse, self.row)], self.sizes, et, body)

    def add_value_grads(self, s: ir.Value, p: ir.Value, dp: ir.Value, delta: ir.Value, parts: list[ir.Value],
                        part: ir.Value) -> None:
        """Each element the mask allows (P != 0: where P is 0, so is ds): ds = P (dP - delta), and each read's
        ds * d score / d read added at the indices it read in this part's partial gradient of its value."""
        op, cx, et = self.op, self.cx, self.et
        scale = B.c_float(float(op.scale), et)
        groups = op.read_groups()
        with B.nest(self.sizes) as (r, c):
            pv = B.extract(p, r, c)
            live = B.if_(arith.CmpFOp(arith.CmpFPredicate.ONE, pv, B.c_float(0.0, et)).result)
            with ir.InsertionPoint(live.then_block):
                ds = arith.MulFOp(pv, arith.SubFOp(B.extract(dp, r, c), B.extract(delta, c)).result).result
                x = arith.MulFOp(B.extract(s, r, c), scale).result
                idx = [B.as_i64(self.b), B.as_i64(self.h), B.as_i64(B.add(self.q0, c)), B.as_i64(B.add(self.k0, r))]
                outs = cx.inline(op.value_grad, [x, ds] + [cast_index(op.value_grad, 2 + n, v)
                                                          for n, v in enumerate(idx)], True)
                pos = 0
                for which, rank in groups:
                    at = [part]
                    for axis, i in enumerate(outs[pos + 1:pos + 1 + rank]):  # negative: from the end, as gather
                        i = B.as_index(i)
                        n = B.mdim(parts[which], axis + 1)
                        at.append(B.select(B.cmpi("lt", i, B.c_index(0)), B.add(i, n), i))
                    old = memref.LoadOp(parts[which], at).result
                    memref.StoreOp(arith.AddFOp(old, outs[pos]).result, parts[which], at)
                    pos += 1 + rank
                scf.YieldOp([])

    def dscores(self, s: ir.Value, p: ir.Value, dp: ir.Value, delta: ir.Value) -> ir.Value:
        """scale * score'(scale * s) * P * (dP - delta): the raw scores' cotangent."""
        op, cx, et = self.op, self.cx, self.et
        scale = B.c_float(float(op.scale), et)

        def body(x: ir.Value, pv: ir.Value, dpv: ir.Value, dl: ir.Value) -> ir.Value:
            ds = arith.MulFOp(pv, arith.SubFOp(dpv, dl).result).result
            if not op.score_grad.empty:
                x = arith.MulFOp(x, scale).result
                (ds,) = cx.inline(op.score_grad, [x, ds, *self.index(op.score_grad)], True)
            return arith.MulFOp(ds, scale).result

        return cx.tile_map([(s, self.tile), (p, self.tile), (dp, self.tile), (delta, self.row)], self.sizes, et,
                           body)


@KERNELS.lowers(AttentionGradOp)
def grad_kernel(cx: KernelContext, op: AttentionGradOp) -> Kernel:
    """dK and dV per (batch, key/value head, key block) over its column of the block map, for each query head
    that reads it; each tile's dS K added into this part's partial dQ (the host sums the parts)."""
    q_t = op.q.type
    partials = TensorType(q_t.dtype, (None, *q_t.shape))
    learned = op.learned()
    name, entry, inputs, m, rest = _start(cx, op, [_transposed(op.q.type), _transposed(op.dout.type), partials,
                                                   *[_parts_type(v) for v in learned]])
    (qt, dot, dq_parts), value_parts = rest[:3], rest[3:3 + len(learned)]
    _, dk_out, dv_out = rest[3 + len(learned):6 + len(learned)]
    part, parts = rest[-2:]
    et = element_type(op.q.type.dtype)
    bq, bk = op.block_q or 64, op.block_k or 64
    with ir.InsertionPoint(entry):
        q, k, v, dout, lse, delta = (B.read(m[n]) for n in ("q", "k", "v", "dout", "lse", "delta"))
        qt_, dot_ = B.read(qt), B.read(dot)
        Bn, Hq, Sq, Dh = (B.mdim(m["q"], i) for i in range(4))
        Hkv, Sk, Dv = B.mdim(m["k"], 1), B.mdim(m["k"], 2), B.mdim(m["v"], 3)
        rep = arith.DivUIOp(Hq, Hkv).result
        NQ, NK = B.ceil_div(Sq, bq), B.ceil_div(Sk, bk)
        per_b = B.mul(Hkv, NK)
        items = B.loop(part, B.mul(Bn, per_b), parts)
        with ir.InsertionPoint(items.body):
            it = items.induction_variable
            b = arith.DivUIOp(it, per_b).result
            hk = arith.RemUIOp(arith.DivUIOp(it, NK).result, Hkv).result
            j = arith.RemUIOp(it, NK).result
            k0 = B.mul(j, B.c_index(bk))
            nk = B.minsi(B.c_index(bk), B.sub(Sk, k0))
            K = B.slice_tensor(k, [b, hk, k0, 0], [1, 1, nk, Dh], drop=[0, 1])
            V = B.slice_tensor(v, [b, hk, k0, 0], [1, 1, nk, Dv], drop=[0, 1])
            zero = B.c_float(0.0, et)
            init = [linalg.fill(zero, outs=[B.empty([nk, Dh], et)]), linalg.fill(zero, outs=[B.empty([nk, Dv], et)])]
            heads = B.loop(0, rep, 1, init)
            with ir.InsertionPoint(heads.body):
                h = B.add(B.mul(hk, rep), heads.induction_variable)
                blocks = B.loop(0, NQ, 1, list(heads.inner_iter_args))
                with ir.InsertionPoint(blocks.body):
                    i = blocks.induction_variable
                    kind = _tile_kind(op, m.get("bm"), b, h, i, j)

                    def step(state: list[ir.Value], h: ir.Value = h, i: ir.Value = i,
                             kind: ir.Value = kind) -> list[ir.Value]:
                        q0 = B.mul(i, B.c_index(bq))
                        nq = B.minsi(B.c_index(bq), B.sub(Sq, q0))
                        tile = _Tile(cx, op, b, h, q0, k0, nk, nq, et)
                        L = B.slice_tensor(lse, [b, h, q0], [1, 1, nq], drop=[0, 1])
                        Dl = B.slice_tensor(delta, [b, h, q0], [1, 1, nq], drop=[0, 1])
                        ST = cx.matmul_tile(K, B.slice_tensor(qt_, [b, h, 0, q0], [1, 1, Dh, nq], drop=[0, 1]), nk, nq,
                                            et)
                        PT = tile.probs(ST, L, kind)
                        dO = B.slice_tensor(dout, [b, h, q0, 0], [1, 1, nq, Dv], drop=[0, 1])
                        dV = cx.matmul_tile(PT, dO, nk, Dv, et, init=state[1])
                        dPT = cx.matmul_tile(V, B.slice_tensor(dot_, [b, h, 0, q0], [1, 1, Dv, nq], drop=[0, 1]), nk,
                                             nq, et)
                        if learned:
                            tile.add_value_grads(ST, PT, dPT, Dl, value_parts, part)
                        dST = tile.dscores(ST, PT, dPT, Dl)
                        Q = B.slice_tensor(q, [b, h, q0, 0], [1, 1, nq, Dh], drop=[0, 1])
                        view = B.subview(dq_parts, [part, b, h, q0, 0], [1, 1, 1, nq, Dh], drop=[0, 1, 2])
                        B.write(cx.matmul_tile(dST, K, nq, Dh, et, init=B.read(view), transpose_a=True), view)
                        return [cx.matmul_tile(dST, Q, nk, Dh, et, init=state[0]), dV]

                    _visit(m.get("bm"), kind, list(blocks.inner_iter_args), step)
                scf.YieldOp(list(blocks.results))
            dK, dV = heads.results
            B.write(dK, B.subview(dk_out, [b, hk, k0, 0], [1, 1, nk, Dh], drop=[0, 1]))
            B.write(dV, B.subview(dv_out, [b, hk, k0, 0], [1, 1, nk, Dv], drop=[0, 1]))
            scf.YieldOp([])
        func.ReturnOp([])
    return Kernel(name, op, inputs, list(op.results), "parts")


def _parts_type(v: Value) -> TensorType:
    """A learned value's partial gradients, one per part."""
    return TensorType(v.type.dtype, (None, *v.type.shape))


@HOSTED.lowers(AttentionGradOp)
def hosted_grad(cx: KernelContext, op: AttentionGradOp, k: Kernel) -> Hosted:
    """Q^T and dO^T by kernels of their own, zeroed partial dQs and learned values' gradients (one per part) in the
    workspace, summed into dQ and those gradients."""
    to_q, qt = transpose_kernel(cx, op, op.q)
    to_dout, dot = transpose_kernel(cx, op, op.dout)
    sums = [(op.q, op.results[0], "dq_parts")] + [(v, d, "dvalue_parts") for v, d in zip(op.learned(), op.dvalues,
                                                                                          strict=True)]
    partials = [Scratch(_parts_type(v), lambda known, ctx, v=v: (ctx.threads, *known[id(v)]), hint)
                for v, _, hint in sums]
    shapes = None
    if op.value_reads:
        def shapes(known: dict, ctx: Any) -> list[tuple[int, ...]]:
            return [known[id(v)] for v in (op.q, op.k, op.v, *op.learned())]
    return Hosted(before=[to_q, to_dout], args=[*k.inputs, qt, dot, *partials, *k.outputs], zeroed=partials,
                  sum_parts=[(s, d) for s, (_, d, _) in zip(partials, sums, strict=True)], shapes=shapes)


@LAUNCHES.lowers(AttentionGradOp)
def launch_grad(fn: Any, k: Kernel, host: Any, ins: list[np.ndarray]) -> list[np.ndarray]:
    """Q^T and dO^T (one copy each per call) and zeroed partial dQs and learned values' gradients, one per part,
    after the kernel's operands; dQ and those gradients are their sums."""
    op = k.op
    dout = ins[4 if op.block_map is not None else 3]
    learned = [ins[k.inputs.index(v)] for v in op.learned()]
    partials = [np.zeros((num_threads(), *x.shape), x.dtype) for x in [ins[0], *learned]]
    outs = fn.run(k, host, ins + transposed(ins[0], dout) + partials)
    for n, x in zip([0, *range(3, 3 + len(learned))], partials, strict=True):
        np.sum(x, axis=0, out=outs[n])
    return outs
