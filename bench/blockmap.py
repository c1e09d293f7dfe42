"""Block-map timings against the issue's targets (not a test): medians of repeated runs, one process.

- sliding window S=4096, w=256, 64x64 blocks: classified at compile time (the sparsify-attention pass);
- document mask S=32768 (6 documents): block map built per call (the attn.block_map op's builder);
- and, for scale, the dense S x S mask evaluation a classification avoids.

Usage: python bench/blockmap.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from sparsa.frontend import compile_source
from sparsa.ir.dialects.attn import AttentionOp
from sparsa.ir.dialects.attn_blocks import BlockMap, classify, outer_values
from sparsa.passes import PassManager


def median_ms(fn, repeats: int = 9) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def load() -> str:
    """Other processes' share of the CPU over the last minute (the machine is shared)."""
    return f"loadavg {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def sliding(S: int = 4096, w: int = 256) -> dict:
    src = (f"mask sliding(q, k) = k <= q and q - k < {w}\n"
           f"model M(q: f32[1, 8, {S}, 64]) -> f32[1, 8, {S}, 64] {{\n"
           f"    return attention(q, q, q, mask=sliding)\n}}\n")

    def run() -> dict:
        module, _ = compile_source(src)
        pm = PassManager("sparsify-attention{block_q=64 block_k=64}")
        pm.run(module)
        return pm.statistics()["sparsify-attention"]

    stats = run()
    return {"case": f"sliding window S={S} w={w}, 64x64, compile-time classification (frontend + pass)",
            "median_ms": median_ms(run), "blocks": stats}


def document(S: int = 32768, docs: int = 6) -> dict:
    src = ("mask doc_causal(q, k; doc: i32[S]) = doc[q] == doc[k] and k <= q\n"
           "model M(q: f32[1, 1, S, 64], doc: i32[S]) -> f32[1, 1, S, 64] {\n"
           "    return attention(q, q, q, mask=doc_causal(doc=doc))\n}\n")
    module, _ = compile_source(src)
    (att,) = [o for o in module.walk() if isinstance(o, AttentionOp)]
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, S), docs - 1, replace=False))
    doc = np.searchsorted(cuts, np.arange(S), side="right").astype(np.int32)
    data = {id(v): doc for v in outer_values(att.mask)}
    kinds = classify(att.mask, S, S, 64, 64, 1, 1, data)
    return {"case": f"document mask S={S}, {docs} documents, 64x64, per-call builder",
            "median_ms": median_ms(lambda: classify(att.mask, S, S, 64, 64, 1, 1, data)),
            "blocks": BlockMap(kinds).counts()}


def dense_mask(S: int = 4096, w: int = 256) -> dict:
    q, k = np.arange(S)[:, None], np.arange(S)[None, :]
    return {"case": f"for scale: evaluating the dense {S}x{S} sliding mask in NumPy",
            "median_ms": median_ms(lambda: (k <= q) & (q - k < w), repeats=5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = [sliding(), document(), dense_mask()]
    for r in results:
        print(f"{r['median_ms']:9.2f} ms  {r['case']}  {r.get('blocks', '')}  [{load()}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
