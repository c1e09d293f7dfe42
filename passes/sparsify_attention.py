"""`sparsify-attention`: give every masked attention a block map of EMPTY / PARTIAL / FULL tiles.

With static sequence lengths and a mask of indices only, the map is computed here, once, by
interval reasoning over the mask (no S x S evaluation) and printed in the IR. Otherwise (symbolic
lengths, or masks reading data such as document ids) an `attn.block_map` op classifies the tiles
per call in O(blocks), summarizing the data per block (range min/max).
"""

from __future__ import annotations

from sparsa.ir.clone import clone_region
from sparsa.ir.core import Module, Region
from sparsa.ir.dialects.attn import AttentionBase
from sparsa.ir.dialects.attn_blocks import BlockMap, BlockMapOp, classify, mask_axes_used, outer_values
from sparsa.passes.base import Option, Pass
from sparsa.passes.cost_model import attention_prefers_sparse
from sparsa.passes.rewrite import Rewriter


class SparsifyAttention(Pass):
    """Compute the block map of every masked attention (at compile time when sizes and mask allow)."""

    NAME = "sparsify-attention"
    block_q = Option(int, 64, "query block size")
    block_k = Option(int, 64, "key block size")

    def run(self, module: Module) -> None:
        rewriter = Rewriter()
        for op in [o for o in module.walk() if isinstance(o, AttentionBase)]:
            if op.mask.empty or op.block_map is not None or op.kernel:
                continue
            self.sparsify(op, rewriter)

    def sparsify(self, op: AttentionBase, rewriter: Rewriter) -> None:
        bq, bk = self.block_q, self.block_k
        q, k = op.q.type, op.k.type
        uses_b, uses_h = mask_axes_used(op.mask)
        sizes = {"sq": q.shape[2], "sk": k.shape[2], "batch": q.shape[0] if uses_b else 1,
                 "heads": q.shape[1] if uses_h else 1}
        static = all(isinstance(d, int) for d in sizes.values()) and not outer_values(op.mask)
        attrs = {"block_q": bq, "block_k": bk, **sizes}
        if static:
            kinds = classify(op.mask, sizes["sq"], sizes["sk"], bq, bk, sizes["batch"], sizes["heads"], {})
            block_map = BlockMap(kinds)
            counts = block_map.counts()
            self.stats["blocks proven empty"] += counts["empty"]
            self.stats["blocks proven full"] += counts["full"]
            self.stats["blocks partial"] += counts["partial"]
            self.stats["block maps computed at compile time"] += 1
            if not attention_prefers_sparse(counts, q.shape[3] if isinstance(q.shape[3], int) else 64):
                rewriter.set_attr(op, "kernel", "dense")
                self.stats["kept dense by the cost model"] += 1
                return
            bm = BlockMapOp.build(regions=[Region()], map=block_map, loc=op.loc, **attrs)
        else:
            bm = BlockMapOp.build(regions=[clone_region(op.mask)], loc=op.loc, **attrs)
            self.stats["block maps built per call"] += 1
        rewriter.insert_before(op, bm)
        rewriter.append_operand(op, bm.result, "block_map")
        rewriter.set_attr(op, "block_q", bq)
        rewriter.set_attr(op, "block_k", bk)
        rewriter.set_attr(op, "kernel", "block-sparse")
