"""The sparse steps every target's default pipeline takes, in one place: read top to bottom, the story of the
compiler. Each backend declares its own pipeline from it (backends/*/backend.py)."""

from __future__ import annotations


def sparse_pipeline(block: int) -> str:
    """Routers folded into moe.route, experts as dispatch + grouped matmuls + fused combine (expert segments
    aligned to `block` rows, the grouped GEMM's tile), hand-written attention recognized, what a mask reads of
    the data alone computed once outside it, block maps so attention visits only the tiles its mask allows,
    scans fused with their producers and consumer so the state is never stored, sparse weights packed; then
    the clean-up."""
    return (f"canonicalize,fuse-moe-gating,fuse-moe-dispatch{{block={block}}},recognize-attention,"
            "hoist-region-invariants,sparsify-attention,fuse-scan,lower-sparse-weights,cse,dce")
