"""The sparse steps every target's default pipeline takes, in one place: read top to bottom, the story of the
compiler. Each backend declares its own pipeline from it (backends/*/backend.py)."""

from __future__ import annotations

from sparsa.ir.diagnostics import SparsaError


def sparse_pipeline(block: int, outside_values: bool = True) -> str:
    """Routers folded into moe.route, experts as dispatch + grouped matmuls + fused combine (expert segments
    aligned to `block` rows, the grouped GEMM's tile), hand-written attention recognized, what a mask reads of
    the data alone computed once outside it, block maps so attention visits only the tiles its mask allows,
    scans fused with their producers and consumer so the state is never stored (and what follows the
    consumer elementwise joined it), sparse weights packed; then
    the clean-up. `outside_values`: whether the target's grouped-matmul epilogues read values from outside the
    expert body."""
    dispatch = f"block={block}" + ("" if outside_values else ",outside_values=false")
    return (f"canonicalize,fuse-moe-gating,fuse-moe-dispatch{{{dispatch}}},recognize-attention,"
            "hoist-region-invariants,sparsify-attention,expand-pullbacks,fuse-scan,fuse-scan-epilogue,lower-sparse-weights,"
            "cse,dce")


def expert_parallel_pipeline(pipeline: str, ranks: int) -> str:
    """`pipeline` with the experts split over `ranks` right after they are dispatched (`shard-experts`), and at
    the end each exchange begun early and waited for late, with independent work between (`overlap-exchanges`)."""
    from sparsa.passes.overlap_exchanges import OverlapExchanges
    from sparsa.passes.pipeline import format_pipeline, parse_pipeline
    from sparsa.passes.shard_experts import ShardExperts

    passes = parse_pipeline(pipeline)
    names = [p.NAME for p in passes]
    if "shard-experts" in names:  # a pipeline that says how (its own options): the ranks are the group's
        shard = passes[names.index("shard-experts")]
        shard.options["ranks"] = ranks
        return format_pipeline(passes)
    if "fuse-moe-dispatch" not in names:
        raise SparsaError(f"expert parallel needs fuse-moe-dispatch in the pipeline, got: {pipeline}")
    passes.insert(names.index("fuse-moe-dispatch") + 1, ShardExperts(ranks=ranks))
    return format_pipeline([*passes, OverlapExchanges()])
