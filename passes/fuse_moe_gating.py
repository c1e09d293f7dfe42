"""`fuse-moe-gating`: fold the router in front of a `moe` into one `moe.route` op with explicit attributes.

Recognized shapes (idx and gates of the moe, traced back through plain ops):

    Mixtral / Switch   p = softmax(L); w, e = topk(p, k); [w = w / sum(w, -1, keepdim)]; [w = w * c]
    Qwen / OLMoE       l, e = topk(L, k); w = softmax(l)                      (= softmax, renormalized)
    DeepSeek-V3        s = sigmoid(L); _, e = topk(s + bias, k); w = s[iota(T)[:, None], e];
                       [w = w / sum(w, -1, keepdim)]; [w = w * c]             (bias only selects)
    group-limited      sel masked to the best groups before the top-k:
                         top, _ = topk(reshape(sel, [T, G, E // G]), k=J); _, kept = topk(sum(top, -1), k=KEPT)
                         ok = sum(cast(kept[:, :, None] == (iota(E) // (E // G))[None, None, :], f32), 1) > 0
                         _, e = topk(where(ok, sel, -inf), k)

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
    groups: tuple[int, int, int] = (1, 2, 1)  # (groups, top scores summed per group, groups kept)


def _int_splat(v: Value) -> int | None:
    op = v.defining_op
    ok = isinstance(op, T.ConstantOp) and v.type.rank == 0 and not isinstance(op.value, bool | float)
    return op.value if ok else None


def _expanded(v: Value, axes: tuple[int, ...]) -> Value | None:
    op = v.defining_op
    if isinstance(op, S.ExpandDimsOp) and tuple(a % v.type.rank for a in op.axes) == axes:
        return op.x
    return None


def match_group_limit(masked: Value) -> tuple[Value, tuple[int, int, int]] | None:
    """(sel, (groups, group_top, groups_kept)) if `masked` keeps only the experts of the best groups."""
    w = masked.defining_op
    if not isinstance(w, T.WhereOp) or _splat(w.b) is None or _splat(w.b) > -1e4:
        return None
    sel, ok = w.a, w.cond.defining_op
    if not (isinstance(ok, T.CmpOp) and ok.pred == "gt" and _splat(ok.rhs) == 0.0):
        return None
    red = ok.lhs.defining_op
    if not isinstance(red, R.SumOp | R.MaxOp) or red.keepdim or tuple(a % 3 for a in red.axes) != (1,):
        return None
    cast = red.x.defining_op
    member = cast.x.defining_op if isinstance(cast, T.CastOp) else None
    if not (isinstance(member, T.CmpOp) and member.pred == "eq"):
        return None
    for a, b in ((member.lhs, member.rhs), (member.rhs, member.lhs)):
        kept, expert_group = _expanded(a, (2,)), _expanded(b, (0, 1))
        if kept is not None and expert_group is not None:
            break
    else:
        return None
    outer = kept.defining_op
    div = expert_group.defining_op
    if not (isinstance(outer, R.TopkOp) and kept is outer.indices and isinstance(div, T.FloorDivOp)
            and isinstance(div.lhs.defining_op, T.IotaOp)):
        return None
    total = outer.x.defining_op
    inner = total.x.defining_op if isinstance(total, R.SumOp) else None
    if not (isinstance(inner, R.TopkOp) and total.x is inner.values and tuple(a % 3 for a in total.axes) == (2,)
            and not total.keepdim):
        return None
    grouped = inner.x.defining_op
    if not (isinstance(grouped, S.ReshapeOp) and grouped.x is sel and len(grouped.shape) == 3):
        return None
    G, per_group = grouped.shape[1], grouped.shape[2]
    experts = sel.type.shape[1]
    if not (isinstance(G, int) and isinstance(per_group, int) and _int_splat(div.rhs) == per_group
            and experts == G * per_group and div.lhs.type.shape == (experts,)):
        return None
    return sel, (G, inner.k, outer.k)


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
    groups = (1, 2, 1)
    limited = match_group_limit(sel)
    if limited is not None:
        sel, groups = limited
    w, scale = _peel_scale(gates)
    w, renorm = _peel_renormalize(w)
    src = sel.defining_op
    if isinstance(src, R.SoftmaxOp) and _last_axis(src, src.axis) and w is tk.values and limited is None:
        return Router(src.x, "softmax", tk.k, renorm, scale)
    sm = w.defining_op
    if (isinstance(sm, R.SoftmaxOp) and _last_axis(sm, sm.axis) and sm.x is tk.values and not renorm
            and not isinstance(src, R.SoftmaxOp | T.SigmoidOp) and limited is None):
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
    if (w is tk.values and bias is None and limited is None) or _is_row_gather(w, scores, idx):
        return Router(sig.x, "sigmoid", tk.k, renorm, scale, bias, groups)
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
        groups, group_top, kept = r.groups
        route = RouteOp.build(r.logits, r.bias, score=r.score, k=r.k, renormalize=r.renormalize, scale=r.scale,
                              groups=groups, group_top=group_top, groups_kept=kept, loc=op.idx.defining_op.loc)
        rewriter.insert_before(op, route)
        rewriter.set_operand(op, 1, route.results[1])
        rewriter.set_operand(op, 2, route.results[0])
        return True


class FuseMoeGating(PatternPass):
    """Fold the router in front of each moe (softmax/sigmoid, top-k, renormalize, bias, scale) into moe.route."""

    NAME = "fuse-moe-gating"
    COUNTERS = {"FuseGating": "routers fused"}

    def patterns(self) -> list[RewritePattern]:
        return [FuseGating()]
