"""`lower-sparse-weights`: weights with `#bsr` / `#nm` layouts become packed storage and packed matmuls.

    w = sparse.convert(param) {layout = "bsr"}; y = sparse.matmul(x, w)
        ->  row_ptr, col_idx, blocks = sparse.pack_bsr(param); y = sparse.bsr_matmul(x, row_ptr, col_idx, blocks)
    w = sparse.convert(param) {layout = "nm"};  y = sparse.matmul(x, w)
        ->  values, indices = sparse.pack_nm(param);          y = sparse.nm_matmul(x, values, indices)

The packing ops read only weights, so the runtime runs them once when weights are loaded (checking
each weight against its layout, naming the first offending block or group) and reuses the result.
"""

from __future__ import annotations

from sparsa.ir.core import Operation
from sparsa.ir.dialects.sparse import BsrMatmulOp, ConvertOp, NmMatmulOp, PackBsrOp, PackNmOp, SparseMatmulOp
from sparsa.passes.base import Option
from sparsa.passes.cost_model import COSTS
from sparsa.passes.rewrite import PatternPass, RewritePattern, Rewriter


class LowerSparseMatmul(RewritePattern):
    """x @ convert(w) with a sparse layout becomes a packed matmul reading packed storage of w."""

    ROOT = SparseMatmulOp

    def __init__(self, target: str):
        self.costs = COSTS[target]

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        conv = op.w.defining_op
        if not isinstance(conv, ConvertOp) or op.x.type.dtype != conv.x.type.dtype:
            return False
        cols = conv.x.type.shape[1]
        if conv.layout == "bsr":
            if not isinstance(cols, int):
                return False
            pack = PackBsrOp.build(conv.x, block=conv.block, loc=conv.loc)
            new = BsrMatmulOp.build(op.x, *pack.results, cols=cols, dense_above=self.costs.bsr_dense_above,
                                    loc=op.loc)
        else:
            pack = PackNmOp.build(conv.x, n=conv.block[0], m=conv.block[1], loc=conv.loc)
            new = NmMatmulOp.build(op.x, *pack.results, n=conv.block[0], m=conv.block[1], loc=op.loc)
        rewriter.insert_before(conv, pack)
        rewriter.insert_before(op, new)
        rewriter.replace_op(op, [new.result])
        return True


class LowerSparseWeights(PatternPass):
    """Pack #bsr and #nm weights (row pointers, column indices, blocks / values and offsets) for packed matmuls."""

    NAME = "lower-sparse-weights"
    target = Option(str, "reference", "whose cost-model constants decide dense vs sparse kernels")
    COUNTERS = {"LowerSparseMatmul": "sparse matmuls packed"}

    def patterns(self) -> list[RewritePattern]:
        return [LowerSparseMatmul(self.target)]
