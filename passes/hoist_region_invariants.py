"""`hoist-region-invariants`: ops of a mask or score region that read only values from outside it (a slice or a
transpose of a data tensor, say) move out, before the attention op; the region then reads their result as data.

What is left in the region depends on the indices (b, h, q, k) and is scalar code every backend inlines; the
hoisted ops run once per call instead of once per (q, k). Splat constants, iota and rank-0 values stay (they
are free where they are, and a region reads outer data only as tensors).
"""

from __future__ import annotations

from sparsa.ir.core import Operation
from sparsa.ir.dialects.attn import AttentionBase
from sparsa.ir.dialects.attn_blocks import BlockMapOp
from sparsa.ir.traits import Generator
from sparsa.passes.rewrite import PatternPass, RewritePattern, Rewriter


def _invariant(op: Operation, inside: set[int]) -> bool:
    return (op.PURE and not op.TERMINATOR and not op.regions and not isinstance(op, Generator)
            and all(r.type.rank > 0 for r in op.results) and not any(id(v) in inside for v in op.operands))


class HoistFromMaskRegions(RewritePattern):
    """Move the first region-invariant op of an attention op's (or block map's) regions before it."""

    ROOT = (AttentionBase, BlockMapOp)

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        for region in op.regions:
            if region.empty:
                continue
            inside = {id(a) for a in region.block.args}
            for inner in region.block.ops:
                if _invariant(inner, inside):
                    rewriter.move_before(inner, op)
                    return True
                inside.update(id(r) for r in inner.results)
        return False


class HoistRegionInvariants(PatternPass):
    """Move the ops of mask and score regions that read nothing of the region out, before their op."""

    NAME = "hoist-region-invariants"
    COUNTERS = {"HoistFromMaskRegions": "ops hoisted"}

    def patterns(self) -> list[RewritePattern]:
        return [HoistFromMaskRegions()]
