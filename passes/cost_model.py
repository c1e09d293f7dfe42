"""A small cost model that decides when sparsity pays, per target; its decisions are written into the IR.

Costs are in units of one multiply-add on a dense tile that the kernel streams at full speed.

- Attention over a block map visits the non-EMPTY tiles; each visited tile costs its FLOPs plus a fixed
  `tile_overhead` (loop and index bookkeeping), and a PARTIAL tile also pays `mask_cost` per element to
  evaluate the mask. The dense kernel does every tile and evaluates the mask everywhere. Block-sparse is
  chosen when it is cheaper: a map that is almost all FULL/PARTIAL runs dense.
- A BSR matmul reads its stored blocks through an index; past `bsr_dense_above` stored-block density the
  dense kernel is faster. Density is known only when weights load, so the threshold is an attribute of
  `sparse.bsr_matmul` and the runtime picks the kernel (`sparsa explain` shows which).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetCosts:
    """Per-target constants of the cost model."""

    tile_overhead: float  # extra cost of visiting one tile, relative to one tile of FLOPs
    mask_cost: float  # cost of evaluating the mask at one (q, k), relative to one multiply-add per head dim
    bsr_dense_above: float  # stored-block density above which a BSR weight runs as a dense matmul


COSTS: dict[str, TargetCosts] = {
    "reference": TargetCosts(tile_overhead=0.05, mask_cost=0.25, bsr_dense_above=0.6),
}


def attention_prefers_sparse(counts: dict[str, int], head_dim: int, target: str = "reference") -> bool:
    """Whether a block-sparse attention with these tile counts beats the dense masked kernel."""
    c = COSTS[target]
    total = counts["empty"] + counts["partial"] + counts["full"]
    visited = counts["partial"] + counts["full"]
    mask = c.mask_cost / max(head_dim, 1)
    sparse = visited * (1.0 + c.tile_overhead) + counts["partial"] * mask
    dense = total * (1.0 + mask)
    return sparse < dense
