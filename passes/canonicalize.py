"""`canonicalize`: fold constants, apply algebraic identities, and erase dead code, to a fixpoint."""

from __future__ import annotations

import numpy as np

from sparsa.ir.core import Module, Operation, Value
from sparsa.ir.dialects import moe as M
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dims import broadcast_shapes
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import is_float, round_to_dtype
from sparsa.passes.base import Option, Pass
from sparsa.passes.rewrite import RewritePattern, Rewriter, apply_patterns_greedily


def splat_value(op: Operation | None) -> int | float | bool | None:
    """The splat value if `op` is a `tensor.constant`, else None."""
    return op.value if isinstance(op, T.ConstantOp) else None


class FoldConstants(RewritePattern):
    """An elementwise op whose operands are all splat constants becomes one splat constant."""

    ROOT = Elementwise

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        values = [splat_value(v.defining_op) for v in op.operands]
        if any(v is None for v in values):
            return False
        if isinstance(op, T.FloorDivOp | T.ModOp) and op.result.type.dtype in ("i32", "i64") and values[1] == 0:
            return False  # integer division by zero stays a run-time matter
        args = [round_to_dtype(np.array(v), o.type.dtype) for v, o in zip(values, op.operands, strict=True)]
        with np.errstate(all="ignore"):
            out = round_to_dtype(np.asarray(op.reference(None, *args)), op.result.type.dtype)
        const = T.ConstantOp.build(value=out.item(), result_types=[op.result.type], loc=op.loc)
        rewriter.insert_before(op, const)
        rewriter.replace_op(op, [const.result])
        return True


class ElideIdentity(RewritePattern):
    """x + 0, 0 + x, x - 0, x * 1, 1 * x, x / 1, x ** 1 become x when that keeps the result type."""

    ROOT = (T.AddOp, T.SubOp, T.MulOp, T.DivOp, T.PowOp)
    NEUTRAL = {T.AddOp: (0, 0), T.SubOp: (None, 0), T.MulOp: (1, 1), T.DivOp: (None, 1), T.PowOp: (None, 1)}

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        left_unit, right_unit = self.NEUTRAL[type(op)]
        lhs, rhs = op.operands
        if right_unit is not None and splat_value(rhs.defining_op) == right_unit and lhs.type == op.result.type:
            rewriter.replace_op(op, [lhs])
            return True
        if left_unit is not None and splat_value(lhs.defining_op) == left_unit and rhs.type == op.result.type:
            rewriter.replace_op(op, [rhs])
            return True
        return False


class SquareByMultiply(RewritePattern):
    """x ** 2 becomes x * x (the same float: a square is exactly rounded either way); RMSNorm writes
    x.pow(2), and a general pow costs a libm call per element on the cpu target (11x the time of a mul)."""

    ROOT = T.PowOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        x, e = op.operands
        if splat_value(e.defining_op) != 2 or x.type != op.result.type or not is_float(x.type.dtype):
            return False
        square = T.MulOp.build(x, x, loc=op.loc)
        rewriter.insert_before(op, square)
        rewriter.replace_op(op, [square.result])
        return True


class FoldInvolution(RewritePattern):
    """neg(neg(x)) and not(not(x)) become x."""

    ROOT = (T.NegOp, T.NotOp)

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        inner = op.operands[0].defining_op
        if type(inner) is not type(op):
            return False
        rewriter.replace_op(op, [inner.operands[0]])
        return True


class NegateAfterSum(RewritePattern):
    """sum(neg(x)) becomes neg(sum(x)): the negation on the smaller result (the rules of sub and max end so)."""

    ROOT = R.SumOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        neg = op.x.defining_op
        if not isinstance(neg, T.NegOp) or len(op.x.uses) != 1:
            return False
        total = R.SumOp.build(neg.x, axes=list(op.axes), keepdim=op.keepdim, loc=op.loc)
        rewriter.insert_before(op, total)
        out = T.NegOp.build(total.result, loc=neg.loc)
        rewriter.insert_before(op, out)
        rewriter.replace_op(op, [out.result])
        return True


class ElideNoOpCast(RewritePattern):
    """A cast to the element type the value already has is the value."""

    ROOT = T.CastOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        if op.x.type.without_layout() != op.result.type:
            return False
        rewriter.replace_op(op, [op.x])
        return True


class ComposeTransposes(RewritePattern):
    """transpose(transpose(x, p), q) becomes one transpose; the identity permutation disappears."""

    ROOT = S.TransposeOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        if list(op.perm) == list(range(len(op.perm))):
            rewriter.replace_op(op, [op.x])
            return True
        inner = op.x.defining_op
        if not isinstance(inner, S.TransposeOp):
            return False
        perm = [inner.perm[p] for p in op.perm]
        new = S.TransposeOp.build(inner.x, perm=tuple(perm), loc=op.loc)
        rewriter.insert_before(op, new)
        rewriter.replace_op(op, [new.result])
        return True


class TransposedWeightGrad(RewritePattern):
    """transpose(grouped_weight_grad, [0, 2, 1]) is the weight gradient computed transposed (dY_seg^T X_seg): the
    gradient of an expert weight PyTorch stores [E, N, K] is written in its layout, never transposed after."""

    ROOT = S.TransposeOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        inner = op.x.defining_op
        if not isinstance(inner, M.GroupedWeightGradOp) or tuple(op.perm) != (0, 2, 1) or len(op.x.uses) != 1:
            return False
        new = M.GroupedWeightGradOp.build(*inner.operands, loc=op.loc,
                                          **{**inner.attributes, "transposed": not inner.transposed})
        rewriter.insert_before(op, new)
        rewriter.replace_op(op, [new.result])
        return True


class SplatView(RewritePattern):
    """A view of a splat constant (reshape, expand_dims, squeeze, slice, transpose, broadcast_to) is a splat of the
    view's type: zeros padded around a slice's gradient are then zeros, whatever view made them."""

    ROOT = (S.ReshapeOp, S.ExpandDimsOp, S.SqueezeOp, S.SliceOp, S.TransposeOp, S.BroadcastToOp)

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        value = splat_value(op.x.defining_op)
        if value is None or None in op.result.type.shape:
            return False
        const = T.ConstantOp.build(value=value, result_types=[op.result.type.without_layout()], loc=op.loc)
        rewriter.insert_before(op, const)
        rewriter.replace_op(op, [const.result])
        return True


def _pieces(concat: Operation) -> list[tuple[int, int, Value]] | None:
    """(start, stop, input) of each input of a concat along its axis, or None where a size is not static."""
    axis, out, at = concat.axis % concat.result.type.rank, [], 0
    for v in concat.inputs:
        n = v.type.shape[axis]
        if not isinstance(n, int):
            return None
        out.append((at, at + n, v))
        at += n
    return out


def _take(rewriter: Rewriter, at: Operation, v: Value, axis: int, lo: int, hi: int,
          others: tuple[list, list, list] | None = None) -> Value:
    """v[lo:hi] along `axis` (v itself where that is all of it and `others`, the other axes' starts, stops and
    steps, take everything; SplatView folds a slice of a splat)."""
    rank = v.type.rank
    starts, stops, steps = (list(x) for x in others) if others else ([0] * rank, [None] * rank, [1] * rank)
    starts[axis], stops[axis], steps[axis] = lo, hi, 1
    if all(a == 0 and s == 1 and (b is None or b == n) for a, b, s, n in zip(starts, stops, steps, v.type.shape,
                                                                               strict=True)):
        return v
    op = S.SliceOp.build(v, starts=starts, stops=stops, steps=steps, loc=at.loc)
    rewriter.insert_before(at, op)
    return op.result


def _splat(rewriter: Rewriter, at: Operation, like: Value, axis: int, n: int) -> Value:
    """The splat `like` is, n long along `axis`."""
    t = like.type
    op = T.ConstantOp.build(value=splat_value(like.defining_op), loc=at.loc,
                            result_types=[t.with_shape(t.shape[:axis] + (n,) + t.shape[axis + 1:])])
    rewriter.insert_before(at, op)
    return op.result


def _joined(rewriter: Rewriter, at: Operation, parts: list[Value], axis: int) -> Value:
    if len(parts) == 1:
        return parts[0]
    op = S.ConcatOp.build(parts, axis=axis, loc=at.loc)
    rewriter.insert_before(at, op)
    return op.result


class AddConcats(RewritePattern):
    """concat(...) + concat(...) along one axis is one concat of the sums of their overlapping pieces, where a
    zero piece contributes nothing: the gradients of slices, each put back among zeros and summed, become one
    concat of the slices' gradients (a fused gate_up's two halves; a loop over chunks, whose running sum of
    padded chunk gradients would otherwise cost the whole tensor per chunk). Fires only where some overlap has a
    zero side."""

    ROOT = T.AddOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        a, b = (v.defining_op for v in (op.lhs, op.rhs))
        if not (isinstance(a, S.ConcatOp) and isinstance(b, S.ConcatOp)) or \
                a.axis % op.result.type.rank != b.axis % op.result.type.rank or \
                not op.lhs.type == op.rhs.type == op.result.type:
            return False
        axis = a.axis % op.result.type.rank
        sides = _pieces(a), _pieces(b)
        if sides[0] is None or sides[1] is None:
            return False
        cuts = sorted({s for side in sides for piece in side for s in piece[:2]})
        spans = []  # (lo, hi, the piece of each side over it)
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            spans.append((lo, hi, [next(p for p in side if p[0] <= lo and hi <= p[1]) for side in sides]))
        zero = [[splat_value(p[2].defining_op) == 0 for p in over] for _, _, over in spans]
        if not any(any(z) for z in zero):
            return False
        parts: list[Value] = []
        zeros_from = None  # where the run of spans zero on both sides began
        for i, ((lo, hi, over), zs) in enumerate(zip(spans, zero, strict=True)):
            if all(zs):
                zeros_from = lo if zeros_from is None else zeros_from
                if i + 1 < len(spans) and all(zero[i + 1]):
                    continue
                parts.append(_splat(rewriter, op, over[0][2], axis, hi - zeros_from))
                zeros_from = None
                continue
            taken = [_take(rewriter, op, v, axis, lo - start, hi - start)
                     for (start, _, v), z in zip(over, zs, strict=True) if not z]
            if len(taken) == 2:
                total = T.AddOp.build(*taken, loc=op.loc)
                rewriter.insert_before(op, total)
                taken = [total.result]
            parts.append(taken[0])
        rewriter.replace_op(op, [_joined(rewriter, op, parts, axis)])
        return True


class FlattenConcats(RewritePattern):
    """A concat reading another concat along the same axis reads that one's inputs instead: one copy of each
    piece, not two."""

    ROOT = S.ConcatOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        axis = op.axis % op.result.type.rank
        inner = [isinstance(v.defining_op, S.ConcatOp) and v.defining_op.axis % v.type.rank == axis
                 for v in op.inputs]
        if not any(inner):
            return False
        parts = [w for v, flat in zip(op.inputs, inner, strict=True) for w in (v.defining_op.inputs if flat else [v])]
        new = S.ConcatOp.build(parts, axis=op.axis, loc=op.loc)
        rewriter.insert_before(op, new)
        rewriter.replace_op(op, [new.result])
        return True


class SliceOfConcat(RewritePattern):
    """A slice of a concat along its axis (step 1, static bounds) reads the concat's inputs it covers: a slice
    of one of them, or, where only slices read the concat (so that it goes), a concat of their slices. A loop
    writing one chunk at a time (slice_scatter, a concat of the old tensor's slices around the new chunk) then
    builds its result from the chunks once, not a copy of the whole per chunk."""

    ROOT = S.SliceOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        concat = op.x.defining_op
        if not isinstance(concat, S.ConcatOp):
            return False
        axis = concat.axis % op.x.type.rank
        pieces = _pieces(concat)
        start, stop, step = op.starts[axis], op.stops[axis], op.steps[axis]
        if pieces is None or step != 1 or not isinstance(start, int) or start < 0 or \
                not (stop is None or isinstance(stop, int) and stop >= 0):
            return False
        n = pieces[-1][1]
        end = n if stop is None else min(n, stop)
        if end <= start or (start, end) == (0, n):  # empty, or every piece: nothing to gain
            return False
        covered = [(lo, hi, v) for lo, hi, v in pieces if lo < end and start < hi]
        if len(covered) > 1 and not all(isinstance(u.op, S.SliceOp) for u in op.x.uses):
            return False  # the concat stays: its slice is a view of it, a concat of slices another copy
        others = (op.starts, op.stops, op.steps)
        parts = [_take(rewriter, op, v, axis, max(start, lo) - lo, min(end, hi) - lo, others) for lo, hi, v in covered]
        rewriter.replace_op(op, [_joined(rewriter, op, parts, axis)])
        return True


class AddReshapes(RewritePattern):
    """reshape(a) + reshape(b) of a and b of one type is reshape(a + b) (the put-backs of interleaved slices, each
    a reshape of a concat: AddConcats then makes the sum one concat)."""

    ROOT = T.AddOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        a, b = (v.defining_op for v in (op.lhs, op.rhs))
        if not (isinstance(a, S.ReshapeOp) and isinstance(b, S.ReshapeOp)) or a.x.type != b.x.type or \
                not op.lhs.type == op.rhs.type == op.result.type:
            return False
        total = T.AddOp.build(a.x, b.x, loc=op.loc)
        rewriter.insert_before(op, total)
        new = S.ReshapeOp.build(total.result, shape=a.shape, loc=op.loc)
        rewriter.insert_before(op, new)
        rewriter.replace_op(op, [new.result])
        return True


class ComposeReshapes(RewritePattern):
    """reshape(reshape(x)) becomes one reshape; a reshape to the operand's own type disappears."""

    ROOT = S.ReshapeOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        if op.x.type == op.result.type and op.result.type.is_static():
            rewriter.replace_op(op, [op.x])
            return True
        inner = op.x.defining_op
        if not isinstance(inner, S.ReshapeOp):
            return False
        new = S.ReshapeOp.build(inner.x, shape=op.shape, loc=op.loc)
        rewriter.insert_before(op, new)
        rewriter.replace_op(op, [new.result])
        return True


class FoldConstantWhere(RewritePattern):
    """where(true, a, b) is a and where(false, a, b) is b, when that keeps the result type."""

    ROOT = T.WhereOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        c = splat_value(op.cond.defining_op)
        if c is None:
            return False
        chosen = op.a if c else op.b
        if chosen.type != op.result.type:
            return False
        rewriter.replace_op(op, [chosen])
        return True


class ReadBroadcastsInPlace(RewritePattern):
    """An elementwise op that reads broadcast_to(x) reads x instead where its other operands already give its
    result's shape: it broadcasts as it reads, and the larger copy is never written (a sum's cotangent spread
    over a selective scan's [B, L, D, N] states: 128 MB)."""

    ROOT = Elementwise

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        for i, v in enumerate(op.operands):
            spread = v.defining_op
            if not isinstance(spread, S.BroadcastToOp):
                continue
            others = [w.type.shape for j, w in enumerate(op.operands) if j != i]
            try:
                shape = broadcast_shapes(spread.x.type.shape, *others)
            except ValueError:
                continue
            if others and tuple(shape) == tuple(op.result.type.shape):
                rewriter.set_operand(op, i, spread.x)
                return True
        return False


class Canonicalize(Pass):
    """Fold constants, apply algebraic identities and erase dead code, to a fixpoint."""

    NAME = "canonicalize"
    max_iterations = Option(int, 10, "most iterations of the worklist before giving up on a fixpoint (with a warning)")

    PATTERNS = (FoldConstants(), ElideIdentity(), SquareByMultiply(), FoldInvolution(), NegateAfterSum(),
                ElideNoOpCast(), ComposeTransposes(), TransposedWeightGrad(), SplatView(), AddConcats(),
                FlattenConcats(), SliceOfConcat(), AddReshapes(), ComposeReshapes(), FoldConstantWhere(),
                ReadBroadcastsInPlace())

    def run(self, module: Module) -> None:
        apply_patterns_greedily(module, self.PATTERNS, self.stats, self.max_iterations, self.NAME)
