"""Attention's reverse mode: the forward that also returns each row's log-sum-exp, and the backward op that walks
the forward's block map (dQ over a query block's row of tiles, dK/dV over a key block's column).

With P = exp(score(s0) - lse) where the mask allows (0 elsewhere), s0 = scale * q @ k^T, and
delta = rowsum(dO * O):

    dV = P^T dO          dP = dO V^T          dS = P * (dP - delta)          dS0 = dS * score'(s0)
    dQ = scale * dS0 K   dK = scale * dS0^T Q    (grouped heads: dK, dV summed over the heads sharing them)

`score'` is the score region differentiated by its ops' own rules: the `score_grad` region of (s0, ds, b, h, q, k)
yields ds * d score / d s0. EMPTY tiles of the block map are never visited; FULL ones evaluate no mask.

A score modifier that reads a learned value (a weight or a value computed from the inputs: ALiBi slopes, a relative
position bias table) gives that value a gradient too. The `value_grad` region of (s0, ds, b, h, q, k) yields, for each
read of one (`value_reads`: which of the score region's outer values it reads), ds * d score / d read and the indices
read; the backward adds it there (a scatter-add over the visited tiles' allowed elements, never a dense [S, S]).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.analysis import Cost
from sparsa.ir.core import Attr, Block, Operand, Region, RegionField, Result, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects.attn import AttentionBase, AttentionOp, _check_region
from sparsa.ir.dialects.attn_blocks import outer_values
from sparsa.ir.dialects.func import YieldOp
from sparsa.ir.dims import compatible
from sparsa.ir.types import TensorType, is_float, is_int


class AttentionLseOp(AttentionOp):
    """attn.attention that also returns each query row's log-sum-exp of its allowed scores (+inf for a row with
    none allowed), [B, Hq, Sq]: the residual the backward reads."""

    NAME = "attn.attention_lse"
    lse = Result()

    def infer(self) -> list[TensorType]:
        out = super().infer()[0]
        return [out, TensorType(out.dtype, out.shape[:3])]

    def reference(self, ctx: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                  block_map: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        out = super().reference(ctx, q, k, v, block_map)
        lse = np.empty(q.shape[:3], dtype=np.float64)
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                _, s, allowed, _ = self.head_scores(ctx, q, k, b, h)
                lse[b, h] = logsumexp_rows(s, allowed)
        return out, lse


def logsumexp_rows(s: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """log sum exp over each row's allowed entries; +inf for a row with none (exp(s - lse) is then 0)."""
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, axis=-1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = safe + np.log(np.exp(s - safe[:, None]).sum(axis=-1))
    return np.where(np.isfinite(m), out, np.inf)


class AttentionGradOp(AttentionBase):
    """attention's backward: dq over each query block's row of the block map, dk and dv over each key block's
    column (the transposed map), summed over the query heads that share a key/value head; EMPTY tiles skipped.
    Beyond q, k, v and the block map it reads the output's cotangent dout, the forward's log-sum-exp and
    delta = rowsum(dout * out), and has the score modifier's derivative region."""

    NAME = "attn.attention_grad"
    dout = Operand()
    lse = Operand()
    delta = Operand()
    score_grad = RegionField(optional=True)
    value_grad = RegionField(optional=True)
    value_reads = Attr(A.INTS, default=None)
    dq = Result()
    dk = Result()
    dv = Result()
    dvalues = Result(variadic=True)

    def infer(self) -> list[TensorType]:
        self.check_qkv()
        return [self.q.type.without_layout(), self.k.type.without_layout(), self.v.type.without_layout(),
                *[v.type.without_layout() for v in self.learned()]]

    def learned(self) -> list[Value]:
        """The learned values the score modifier reads, in the order of their gradients (`dvalues`)."""
        outer = outer_values(self.score) if not self.score.empty else []
        reads = list(dict.fromkeys(self.value_reads or ()))
        if any(not 0 <= i < len(outer) for i in reads):
            raise self.error(f"value_reads {self.value_reads} index the score region's {len(outer)} outer values")
        return [outer[i] for i in reads]

    def read_groups(self) -> list[tuple[int, int]]:
        """Per read the value_grad region yields: (its learned value's position in `learned()`, how many indices)."""
        order, learned = list(dict.fromkeys(self.value_reads or ())), self.learned()
        return [(order.index(i), learned[order.index(i)].type.rank) for i in self.value_reads or ()]

    def verify(self) -> None:
        super().verify()
        q, d = self.q.type, self.dout.type
        if d.rank != 4 or d.dtype != q.dtype or not all(map(compatible, d.shape[:3], q.shape[:3])):
            raise self.error(f"needs dout [B, Hq, Sq, Dv] like the output, got {d} for q {q}")
        for what, t in (("lse", self.lse.type), ("delta", self.delta.type)):
            if t.rank != 3 or t.dtype != q.dtype:
                raise self.error(f"needs {what} [B, Hq, Sq] of {q.dtype}, got {t}")
        if self.score.empty != self.score_grad.empty:
            raise self.error("needs a score_grad region exactly when it has a score region")
        _check_region(self, self.score_grad, 6, None, "score_grad", ("s", "ds"))
        self._verify_value_grad()

    def _verify_value_grad(self) -> None:
        reads, region = self.value_reads or [], self.value_grad
        if region.empty != (not reads):
            raise self.error("needs a value_grad region exactly when it has value_reads")
        if region.empty:
            return
        self.learned()
        outer = outer_values(self.score)
        for i in reads:
            if not is_float(outer[i].type.dtype):
                raise self.error(f"value_reads: the score region's outer value {i} is {outer[i].type}, not float")
        if len(region.block.args) != 6:
            raise self.error(f"value_grad region takes 6 arguments (s, ds, b, h, q, k), got {len(region.block.args)}")
        term = region.block.terminator
        want = [(outer[i].type.dtype, rank) for i, (_, rank) in zip(reads, self.read_groups(), strict=True)]
        got = [] if term is None else [v.type for v in term.operands]
        n = sum(1 + rank for _, rank in want)
        if term is None or term.NAME != "func.yield" or len(got) != n or any(t.rank for t in got):
            raise self.error(f"value_grad region must yield {n} scalars (per read: d score / d read, then its "
                             f"indices), got {len(got)}")
        pos = 0
        for dtype, rank in want:
            if got[pos].dtype != dtype or not all(is_int(t.dtype) for t in got[pos + 1:pos + 1 + rank]):
                raise self.error(f"value_grad region: a read's derivative must be {dtype} and its {rank} indices "
                                 "integers")
            pos += 1 + rank

    def reference(self, ctx: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                  *rest: np.ndarray) -> tuple[np.ndarray, ...]:
        """dq, dk, dv and the learned values' gradients in float64 (dense per head: a sound block map's EMPTY tiles
        are all masked)."""
        dout, lse, delta = rest[-3:]
        rep = q.shape[1] // k.shape[1]
        dq = np.zeros(q.shape, np.float64)
        dk, dv = np.zeros(k.shape, np.float64), np.zeros(v.shape, np.float64)
        dvalues = [np.zeros(np.shape(ctx.values[id(x)]), np.float64) for x in self.learned()]
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                s0, s, allowed, idx = self.head_scores(ctx, q, k, b, h)
                with np.errstate(over="ignore", invalid="ignore"):
                    p = np.where(allowed, np.exp(s - lse[b, h].astype(np.float64)[:, None]), 0.0)
                do = dout[b, h].astype(np.float64)
                ds = p * (do @ v[b, h // rep].astype(np.float64).T - delta[b, h].astype(np.float64)[:, None])
                if dvalues:
                    self._add_value_grads(ctx, dvalues, s0, ds, idx, allowed)
                if not self.score_grad.empty:
                    (ds,) = ctx.run_region(self.score_grad, [s0, ds, *idx])
                    ds = np.where(allowed, np.broadcast_to(np.asarray(ds, np.float64), s0.shape), 0.0)
                dq[b, h] = self.scale * ds @ k[b, h // rep].astype(np.float64)
                dk[b, h // rep] += self.scale * ds.T @ q[b, h].astype(np.float64)
                dv[b, h // rep] += p.T @ do
        return (dq, dk, dv, *dvalues)

    def _add_value_grads(self, ctx: Any, dvalues: list[np.ndarray], s0: np.ndarray, ds: np.ndarray,
                         idx: list[np.ndarray], allowed: np.ndarray) -> None:
        """Each read's ds * d score / d read added at the indices it read, over one head's allowed elements."""
        outs = ctx.run_region(self.value_grad, [s0, ds, *idx])
        pos = 0
        for which, rank in self.read_groups():
            c, ix = outs[pos], outs[pos + 1:pos + 1 + rank]
            pos += 1 + rank
            c = np.broadcast_to(np.asarray(c, np.float64), s0.shape)[allowed]
            at = tuple(np.broadcast_to(np.asarray(i), s0.shape)[allowed] for i in ix)
            if rank:
                np.add.at(dvalues[which], at, c)
            else:
                dvalues[which] += c.sum()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]] | None:
        return None if self.value_reads else [shapes[0], shapes[1], shapes[2]]

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        """Five products a visited tile (FlashAttention-2's backward)."""
        q, k = args[0], args[1]
        dense = 2.0 * 5 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        bm = args[3] if self.block_map is not None else None
        if bm is None:
            return Cost(dense, dense, "dense backward" + (", masked" if not self.mask.empty else ""))
        full = np.broadcast_to(bm, (q.shape[0], q.shape[1]) + bm.shape[2:])
        return Cost(dense, dense * float((full != 0).mean()),
                    f"block-sparse backward {self.block_q}x{self.block_k}: {int((bm == 0).sum())} empty tiles skipped",
                    block_map=bm)


# ---- the rule ---------------------------------------------------------------------------------------------
def attention_vjp(op: AttentionOp, g: Any, dys: list, xs: list, ys: list, bias_grads: bool = True) -> list:
    """attn.attention's vector-Jacobian rule: the forward made to return its log-sum-exp, delta from the output,
    and the backward op over the same block map, mask and score regions. A learned value the score modifier reads
    (one computed from the model's inputs or weights) gets its gradient from the backward op too, unless
    `bias_grads` is False (then it gets none: the caller takes no gradient for it)."""
    from sparsa.ir.clone import clone_region

    if len(dys) > 1 and dys[1] is not None:
        raise SparsaError("attention's log-sum-exp has no derivative (it is the backward's residual)", op.loc)
    dout = dys[0]
    if dout is None:
        return [None] * len(xs)
    if isinstance(op, AttentionLseOp):
        lse = ys[1]
    else:
        op = g.swap(op, AttentionLseOp.NAME)  # the same op, its regions moved over, now also giving lse
        lse = op.results[1]
    delta = g.sum(g.mul(dout, ys[0]), [-1])
    score_grad, value_grad, reads = (Region(), Region(), []) if op.score.empty else \
        score_grad_regions(op, bias_grads)
    operands = [*xs[:3], *xs[3:4], dout, lse, delta]
    attrs = {"scale": op.scale, "block_q": op.block_q, "block_k": op.block_k, "kernel": op.kernel,
             "value_reads": reads or None}
    grads = g.op(AttentionGradOp.NAME, *operands, **attrs,
                 regions=[clone_region(op.mask), clone_region(op.score), score_grad, value_grad])
    for v, d in zip(grads.learned(), grads.dvalues, strict=True):
        g.flow(v, d)
    return [*grads.results[:3]] + [None] * (len(xs) - 3)


def _region_block(region: Region) -> Block:
    """A block of (s0, ds, b, h, q, k) for a derivative of the score region (s0, b, h, q, k)."""
    args = region.block.args
    return Block([args[0].type, args[0].type, *[a.type for a in args[1:]]],
                 ["s", "ds", *[a.name_hint for a in args[1:]]])


def score_grad_regions(op: AttentionBase, learned: bool = True) -> tuple[Region, Region, list[int]]:
    """The score region differentiated by its ops' rules: (s0, ds, b, h, q, k) -> ds * d score / d s0; and, for the
    learned values it reads (float values computed from the model's inputs or weights; none unless `learned`), the
    value_grad region and its value_reads (see the module's docstring)."""
    from sparsa.ir.autodiff import Grad

    region = op.score
    outer = outer_values(region)
    block = _region_block(region)
    sub = Grad(block)
    sub.loc = op.loc
    s, ds, *idx = block.args
    (d_s,) = sub.region(region, [s, *idx], [ds])[:1]
    block.append(YieldOp.build([d_s if d_s is not None else sub.scalar(0.0, s.type.dtype)]))
    _drop_dead(block)
    wanted = [i for i, v in enumerate(outer) if learned and is_float(v.type.dtype) and _reads_model_values(v)]
    if not wanted:
        return Region([block]), Region(), []
    vblock = _region_block(region)
    sub = Grad(vblock)
    sub.loc = op.loc
    s, ds, *idx = vblock.args
    inlined = sub.inline(region, [s, *idx])
    sub.region(region, [s, *idx], [ds], inlined)
    yields: list[Value] = []
    reads: list[int] = []
    for i in wanted:
        v = outer[i]
        if v.type.rank == 0:  # a learned scalar read as it is (no gather takes one): what flowed to it
            if id(v) in sub.grads:
                yields.append(sub.grads[id(v)])
                reads.append(i)
            continue
        for u in inlined[1]:
            if not any(x is v for x in u.operands):
                continue
            if u.NAME != "tensor.gather" or u.operands[0] is not v or len(u.operands) - 1 != v.type.rank \
                    or any(x is v for x in u.operands[1:]):
                raise SparsaError(f"attention's score modifier reads the learned value {v.type} other than as one "
                                  "element at a time (value[i, ...]): its gradient is not supported", op.loc)
            d = sub.grads.get(id(u.results[0]))
            if d is not None:
                yields += [d, *u.operands[1:]]
                reads.append(i)
    if not reads:
        return Region([block]), Region(), []
    vblock.append(YieldOp.build(yields))
    _drop_dead(vblock)
    return Region([block]), Region([vblock]), reads


def _drop_dead(block: Block) -> None:
    """Erase the ops whose results nothing reads (the cotangents of outer values the region computed on the way)."""
    for inner in reversed(list(block.ops)):
        if not inner.TERMINATOR and inner.PURE and all(not r.uses for r in inner.results):
            inner.erase()


def _reads_model_values(v: Value) -> bool:
    """Whether v is computed from a function argument or a weight (not only constants and indices)."""
    seen: set[int] = set()
    stack = [v]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        op = x.defining_op
        if op is None or op.NAME == "func.param":
            return True
        stack.extend(op.operands)
    return False
