"""`fuse-moe-gating`: fold the router in front of a `moe` into one `moe.route` op with explicit attributes.

Recognized shapes (idx and gates of the moe, traced back through plain ops):

    Mixtral / Switch   p = softmax(L); w, e = topk(p, k); [w = w / sum(w, -1, keepdim)]; [w = w * c]
    Qwen / OLMoE       l, e = topk(L, k); w = softmax(l)                      (= softmax, renormalized)
    DeepSeek-V3        s = sigmoid(L); _, e = topk(s + bias, k); w = s[iota(T)[:, None], e];
                       [w = w / sum(w, -1, keepdim)]; [w = w * c]             (bias only selects)

Anything else stays as ordinary ops and runs as written.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsa.ir.core import Operation, Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.moe import MoeOp, RouteOp
from sparsa.passes.rewrite import PatternPass, RewritePattern, Rewriter


@dataclass
class Router:
    logits: Value
    score: str
    k: int
    renormalize: bool = False
    scale: float = 1.0
    bias: Value | None = None


def _last_axis(op: Operation, axis: int) -> bool:
    return axis % op.operands[0].type.rank == op.operands[0].type.rank - 1


def _splat(v: Value) -> float | None:
    op = v.defining_op
    return float(op.value) if isinstance(op, T.ConstantOp) and v.type.rank == 0 else None


def _peel_scale(w: Value) -> tuple[Value, float]:
    op = w.defining_op
    if isinstance(op, T.MulOp):
        for t, c in ((op.lhs, op.rhs), (op.rhs, op.lhs)):
            if _splat(c) is not None and t.type == w.type:
                return t, _splat(c)
    return w, 1.0


def _peel_renormalize(w: Value) -> tuple[Value, bool]:
    op = w.defining_op
    if isinstance(op, T.DivOp):
        s = op.rhs.defining_op
        if isinstance(s, R.SumOp) and s.x is op.lhs and s.keepdim and len(s.axes) == 1 and _last_axis(s, s.axes[0]):
            return op.lhs, True
    return w, False


def _is_row_gather(w: Value, scores: Value, idx: Value) -> bool:
    """w = scores[iota(T)[:, None], idx]: each token's scores at its chosen experts."""
    op = w.defining_op
    if not isinstance(op, S.GatherOp) or op.x is not scores or len(op.indices) != 2 or op.indices[1] is not idx:
        return False
    rows = op.indices[0].defining_op
    return (isinstance(rows, S.ExpandDimsOp) and tuple(rows.axes) in ((1,), (-1,))
            and isinstance(rows.x.defining_op, T.IotaOp) and rows.x.type.shape[0] == scores.type.shape[0])


def match_router(idx: Value, gates: Value) -> Router | None:
    """The router that produced (idx, gates), or None if it is not one of the known shapes."""
    tk = idx.defining_op
    if not isinstance(tk, R.TopkOp) or idx is not tk.indices:
        return None
    sel = tk.x
    w, scale = _peel_scale(gates)
    w, renorm = _peel_renormalize(w)
    src = sel.defining_op
    if isinstance(src, R.SoftmaxOp) and _last_axis(src, src.axis) and w is tk.values:
        return Router(src.x, "softmax", tk.k, renorm, scale)
    sm = w.defining_op
    if (isinstance(sm, R.SoftmaxOp) and _last_axis(sm, sm.axis) and sm.x is tk.values and not renorm
            and not isinstance(src, R.SoftmaxOp | T.SigmoidOp)):
        return Router(sel, "softmax", tk.k, True, scale)
    bias = None
    scores = sel
    if isinstance(src, T.AddOp):
        for s, b in ((src.lhs, src.rhs), (src.rhs, src.lhs)):
            if isinstance(s.defining_op, T.SigmoidOp) and b.type.rank == 1 and s.type == sel.type:
                scores, bias = s, b
                break
    sig = scores.defining_op
    if not isinstance(sig, T.SigmoidOp):
        return None
    if w is tk.values and bias is None or _is_row_gather(w, scores, idx):
        return Router(sig.x, "sigmoid", tk.k, renorm, scale, bias)
    return None


class FuseGating(RewritePattern):
    """A moe whose idx and gates come from a recognized router reads them from one moe.route op."""

    ROOT = MoeOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        if isinstance(op.idx.defining_op, RouteOp):
            return False
        r = match_router(op.idx, op.gates)
        if r is None or r.logits.type.dtype != op.gates.type.dtype:
            return False
        route = RouteOp.build(r.logits, r.bias, score=r.score, k=r.k, renormalize=r.renormalize, scale=r.scale,
                              loc=op.idx.defining_op.loc)
        rewriter.insert_before(op, route)
        op.set_operand(1, route.results[1])
        op.set_operand(2, route.results[0])
        return True


class FuseMoeGating(PatternPass):
    """Fold the router in front of each moe (softmax/sigmoid, top-k, renormalize, bias, scale) into moe.route."""

    NAME = "fuse-moe-gating"
    COUNTERS = {"FuseGating": "routers fused"}

    def patterns(self) -> list[RewritePattern]:
        return [FuseGating()]
