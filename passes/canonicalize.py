"""`canonicalize`: fold constants, apply algebraic identities, and erase dead code, to a fixpoint."""

from __future__ import annotations

import numpy as np

from sparsa.ir.core import Module, Operation
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


class AddDisjointConcats(RewritePattern):
    """concat(a, 0) + concat(0, b) is concat(a, b): pieces along one axis, of the same sizes, each zero on one side
    (the gradients of a weight's slices put back, gate_proj's and up_proj's of a fused gate_up: one concat, no
    sum of two padded copies)."""

    ROOT = T.AddOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        a, b = (v.defining_op for v in (op.lhs, op.rhs))
        if not (isinstance(a, S.ConcatOp) and isinstance(b, S.ConcatOp)) or a.axis != b.axis or \
                not op.lhs.type == op.rhs.type == op.result.type or len(a.inputs) != len(b.inputs):
            return False
        pieces = []
        for x, y in zip(a.inputs, b.inputs, strict=True):
            if x.type != y.type:
                return False
            if splat_value(x.defining_op) == 0:
                pieces.append(y)
            elif splat_value(y.defining_op) == 0:
                pieces.append(x)
            else:
                return False
        new = S.ConcatOp.build(pieces, axis=a.axis, loc=op.loc)
        rewriter.insert_before(op, new)
        rewriter.replace_op(op, [new.result])
        return True


class AddReshapes(RewritePattern):
    """reshape(a) + reshape(b) of a and b of one type is reshape(a + b) (the put-backs of interleaved slices, each
    a reshape of a concat: AddDisjointConcats then makes the sum one concat)."""

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
                ElideNoOpCast(), ComposeTransposes(), TransposedWeightGrad(), AddDisjointConcats(), AddReshapes(),
                ComposeReshapes(),
                FoldConstantWhere(), ReadBroadcastsInPlace())

    def run(self, module: Module) -> None:
        apply_patterns_greedily(module, self.PATTERNS, self.stats, self.max_iterations, self.NAME)
