"""`recognize-attention`: turn attention written out by hand into the `attention` op.

Recognized, rooted at the final `p @ v`:

    p = softmax(M, axis=-1), with M one of
        where(m, s, NEG)          where(m, NEG, s)  (masked_fill: the mask is `not m`)
        s + where(m, 0, NEG)      s                 (no mask)
    s = score(raw), raw = (q @ k^T) * c | (q @ k^T) / c | (q * c) @ k^T | q @ k^T

NEG is -inf or a large negative constant (<= -1e4). `m` must be built from `iota` index vectors
(`iota(S)[:, None]` is the query index, `iota(S)[None, :]` the key index), constants, elementwise
ops and gathers of data by those indices: it becomes a symbolic mask region. Elementwise ops on the
scores with constant operands become a score region. A query row whose mask is all false gives
zeros in the attention op (the hand-written form gives NaN there, or a uniform row for a finite NEG).

An attention op whose keys and values had each head repeated n times (transformers' repeat_kv, ahead of
SDPA with a mask) takes the unrepeated ones: its grouped-query mapping does the same without the copies.
"""

from __future__ import annotations

from sparsa.ir.core import Block, Operation, Region, Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.attn import AttentionOp
from sparsa.ir.dialects.func import YieldOp
from sparsa.ir.region_builder import NotRecognized, RegionBuilder
from sparsa.ir.types import TensorType, scalar
from sparsa.passes.rewrite import PatternPass, RewritePattern, Rewriter

INDEX = scalar("i64")


def _const(v: Value) -> float | None:
    op = v.defining_op
    return float(op.value) if isinstance(op, T.ConstantOp) and not isinstance(op.value, bool) else None


def _is_neg(v: Value) -> bool:
    c = _const(v)
    return c is not None and c <= -1e4


class RecognizeAttention(RewritePattern):
    """softmax(masked scaled q @ k^T) @ v, written with plain ops, becomes one attention op."""

    ROOT = S.MatmulOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        try:
            new = self.build(op)
        except NotRecognized:
            return False
        rewriter.insert_before(op, new)
        rewriter.replace_op(op, [new.result])
        return True

    def build(self, op: Operation) -> Operation:
        p, v = op.operands
        sm = p.defining_op
        if not isinstance(sm, R.SoftmaxOp) or sm.axis % p.type.rank != p.type.rank - 1 or p.type.rank != 4:
            raise NotRecognized()
        masked, mask_fn = self.split_mask(sm.x)
        raw, score_chain = self.split_score(masked)
        q, k, scale = self.split_scores(raw)
        if q.type.rank != 4 or k.type.rank != 4 or v.type.rank != 4:
            raise NotRecognized()
        mask_region = self.mask_region(mask_fn, p.type) if mask_fn is not None else Region()
        score_region = self.score_region(raw, score_chain, p.type) if score_chain else Region()
        new = AttentionOp.build(q, k, v, regions=[mask_region, score_region], scale=scale, loc=op.loc)
        if new.result.type != op.result.type:
            raise NotRecognized()
        return new

    def split_mask(self, x: Value) -> tuple[Value, tuple[Value, bool] | None]:
        """(scores before masking, (mask tensor, negate?)) for the masking forms."""
        op = x.defining_op
        if isinstance(op, T.WhereOp):
            if _is_neg(op.b):
                return op.a, (op.cond, False)
            if _is_neg(op.a):
                return op.b, (op.cond, True)
        if isinstance(op, T.AddOp):
            for s, bias in ((op.lhs, op.rhs), (op.rhs, op.lhs)):
                w = bias.defining_op
                if isinstance(w, T.WhereOp) and _const(w.a) == 0.0 and _is_neg(w.b) and s.type == x.type:
                    return s, (w.cond, False)
        return x, None

    def split_score(self, s: Value) -> tuple[Value, list[Operation]]:
        """Walk back through elementwise ops with constant side operands to the raw scaled scores."""
        chain: list[Operation] = []
        while True:
            op = s.defining_op
            if self.scaled_scores(s) is not None:
                return s, list(reversed(chain))
            if not isinstance(op, T.UnaryOp | T.BinaryOp) or isinstance(op, T.CmpOp):
                raise NotRecognized()
            tensors = [o for o in op.operands if o.type.rank == 4]
            consts = [o for o in op.operands if _const(o) is not None and o.type.rank == 0]
            if len(tensors) != 1 or len(tensors) + len(consts) != len(op.operands):
                raise NotRecognized()
            chain.append(op)
            s = tensors[0]

    def scaled_scores(self, s: Value) -> tuple[Value, Value, float] | None:
        try:
            return self.split_scores(s)
        except NotRecognized:
            return None

    def split_scores(self, raw: Value) -> tuple[Value, Value, float]:
        """(q, k, scale) from q @ k^T, optionally scaled before or after the matmul."""
        op = raw.defining_op
        scale = 1.0
        if isinstance(op, T.MulOp | T.DivOp):
            for t, c in ((op.lhs, op.rhs), (op.rhs, op.lhs)):
                cv = _const(c)
                if cv is not None and c.type.rank == 0 and isinstance(t.defining_op, S.MatmulOp):
                    if isinstance(op, T.DivOp) and t is op.rhs:
                        continue
                    scale = 1.0 / cv if isinstance(op, T.DivOp) else cv
                    op = t.defining_op
                    break
        if not isinstance(op, S.MatmulOp):
            raise NotRecognized()
        q, kt = op.operands
        tr = kt.defining_op
        if not isinstance(tr, S.TransposeOp) or list(tr.perm) != [0, 1, 3, 2]:
            raise NotRecognized()
        qop = q.defining_op
        if isinstance(qop, T.MulOp):
            for t, c in ((qop.lhs, qop.rhs), (qop.rhs, qop.lhs)):
                if _const(c) is not None and c.type.rank == 0 and t.type == q.type:
                    q, scale = t, scale * _const(c)
                    break
        return q, tr.x, scale

    def mask_region(self, mask: tuple[Value, bool], scores: TensorType) -> Region:
        m, negate = mask
        block = Block([INDEX] * 4, ["b", "h", "q", "k"])
        value = RegionBuilder(block, {}).value(m)
        if value.type.dtype != "i1":
            raise NotRecognized()
        if negate:
            value = _append(block, T.NotOp.build(value))
        block.append(YieldOp.build([value]))
        return Region([block])

    def score_region(self, raw: Value, chain: list[Operation], scores: TensorType) -> Region:
        block = Block([scalar(scores.dtype)] + [INDEX] * 4, ["s", "b", "h", "q", "k"])
        builder = RegionBuilder(block, {id(raw): block.args[0]})
        value = builder.value(chain[-1].results[0])
        block.append(YieldOp.build([value]))
        return Region([block])


def _append(block: Block, op: Operation) -> Value:
    block.append(op)
    return op.results[0]


def _repeated_heads(v: Value) -> tuple[Value, int] | None:
    """(x, Hkv) when v = reshape(broadcast_to(expand_dims(x, [2]), [B, Hkv, n, S, D]), [B, Hkv * n, S, D]):
    each of x's Hkv heads repeated n times in a row (transformers' repeat_kv)."""
    r = v.defining_op
    bt = r.x.defining_op if isinstance(r, S.ReshapeOp) else None
    ed = bt.x.defining_op if isinstance(bt, S.BroadcastToOp) else None
    if not (isinstance(ed, S.ExpandDimsOp) and tuple(ed.axes) == (2,) and ed.x.type.rank == 4):
        return None
    b, h, s, d = ed.x.type.shape
    n = bt.result.type.shape[2]
    if bt.result.type.shape != (b, h, n, s, d) or r.result.type.shape[0] != b or r.result.type.shape[2:] != (s, d):
        return None
    if not (isinstance(h, int) and isinstance(n, int) and r.result.type.shape[1] == h * n):
        return None
    return ed.x, h


class GroupedHeads(RewritePattern):
    """Attention on keys and values whose heads were each repeated n times (repeat_kv, for grouped-query
    attention) reads the unrepeated ones: the attention op maps query head h to key/value head
    h // (Hq / Hkv), which is what the repetition did, without the copies."""

    ROOT = AttentionOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        k, v = _repeated_heads(op.k), _repeated_heads(op.v)
        hq = op.q.type.shape[1]
        if k is None or v is None or k[1] != v[1] or not isinstance(hq, int) or hq % k[1]:
            return False
        rewriter.set_operand(op, 1, k[0])
        rewriter.set_operand(op, 2, v[0])
        return True


class RecognizeAttentionPass(PatternPass):
    """Turn hand-written softmax(masked q @ k^T) @ v into the attention op with mask and score regions, and
    let grouped-query attention read its keys and values unrepeated."""

    NAME = "recognize-attention"
    COUNTERS = {"RecognizeAttention": "attention ops recognized", "GroupedHeads": "repeated kv heads read once"}

    def patterns(self) -> list[RewritePattern]:
        return [RecognizeAttention(), GroupedHeads()]
