"""Passes over the IR, the pipeline syntax and the pass manager."""

from sparsa.passes import (
    canonicalize,
    cse,
    dce,
    differentiate,
    fuse_moe_dispatch,
    fuse_moe_gating,
    fuse_scan,
    hoist_region_invariants,
    lower_sparse_weights,
    overlap_exchanges,
    recognize_attention,
    shard_experts,
    sparsify_attention,
)
from sparsa.passes.base import PASS_REGISTRY, Option, Pass
from sparsa.passes.manager import PassError, PassManager
from sparsa.passes.pipeline import format_pipeline, parse_pipeline

__all__ = [
    "PASS_REGISTRY", "Option", "Pass", "PassError", "PassManager", "canonicalize", "cse", "dce", "differentiate",
    "format_pipeline", "fuse_moe_dispatch", "fuse_moe_gating", "fuse_scan", "hoist_region_invariants",
    "lower_sparse_weights", "overlap_exchanges", "parse_pipeline", "recognize_attention", "shard_experts",
    "sparsify_attention",
]
