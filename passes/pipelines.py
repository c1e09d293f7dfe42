"""The default pipeline of each target, in one place: read top to bottom, the story of the compiler."""

from __future__ import annotations

DEFAULT_PIPELINES: dict[str, str] = {
    # The reference target runs the same sparse steps every backend follows: routers folded into
    # moe.route, experts as dispatch + grouped matmuls + fused combine, hand-written attention
    # recognized, block maps so attention visits only the tiles its mask allows, and scans fused
    # with their producers and consumer so the state is never stored; sparse weights packed.
    # The interpreter skips padding rows, so its expert segments need no alignment (block=1).
    "reference": ("canonicalize,fuse-moe-gating,fuse-moe-dispatch{block=1},recognize-attention,sparsify-attention,"
                  "fuse-scan,lower-sparse-weights,cse,dce"),
    # The cpu target lowers the result through MLIR to LLVM (backends/cpu): one kernel per op, the
    # sparse ops as loops over their structure around tiled, vectorized GEMMs; 64-row expert segments.
    "cpu": ("canonicalize,fuse-moe-gating,fuse-moe-dispatch{block=64},recognize-attention,sparsify-attention,"
            "fuse-scan,lower-sparse-weights,cse,dce"),
    # The triton target (backends/triton) generates one GPU kernel per fused op; expert segments are
    # aligned to the grouped GEMM's 64-row tiles.
    "triton": ("canonicalize,fuse-moe-gating,fuse-moe-dispatch{block=64},recognize-attention,sparsify-attention,"
               "fuse-scan,lower-sparse-weights,cse,dce"),
}


def default_pipeline(target: str) -> str:
    """The pipeline string for `target`; KeyError for a target without one."""
    return DEFAULT_PIPELINES[target]
