"""GPU benchmark (not a test): Sparsa's block-sparse attention kernel vs FlexAttention (compiled) and SDPA,
medians from triton.testing.do_bench in one process; TFLOP/s on useful FLOPs (allowed (q, k) pairs only).

Usage (on a machine with an NVIDIA GPU): python bench/gpu.py [--json out.json] [--dtype bf16|f16|f32]
Covered: sliding window, document mask and plain causal attention (the kernel alone, and the whole
target="triton" model with its launcher and, for data masks, its per-call block map); Mixtral-style MoE
layers (grouped-GEMM kernels alone, and the whole layer through target="triton" vs eager and
torch.compile); Mamba's selective scan.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import triton

import sparsa
from sparsa.backends.triton.attention import AttentionKernel
from sparsa.ir.dialects.attn import AttentionOp
from sparsa.ir.dialects.attn_blocks import classify, outer_values

B, H, S, D = 1, 8, 4096, 64
MASKS = {
    "sliding256": ("mask m(q, k) = k <= q and q - k < 256", lambda q, k: (k <= q) & (q - k < 256)),
    "causal": ("mask m(q, k) = k <= q", lambda q, k: k <= q),
    "document6": ("mask m(q, k; doc: i32[S]) = doc[q] == doc[k] and k <= q", None),
}


# Dense peak TFLOP/s of the tensor cores (bf16/f16) and of the FP32 units, by device name (vendor data sheets).
PEAKS = {"H100": {"bf16": 989.0, "f16": 989.0, "f32": 67.0}, "H200": {"bf16": 989.0, "f16": 989.0, "f32": 67.0},
         "A100": {"bf16": 312.0, "f16": 312.0, "f32": 19.5}}


def peak_tflops(dtype: str) -> float | None:
    """The GPU's dense peak for `dtype`, or None for a device not in PEAKS."""
    name = torch.cuda.get_device_name()
    return next((p[dtype] for key, p in PEAKS.items() if key in name), None)


def add_peak_fractions(row: dict, dtype: str) -> dict:
    """`*_frac_of_peak` beside every `*_tflops` figure of a row."""
    peak = peak_tflops(dtype)
    for key in [k for k in row if k.endswith("_tflops")]:
        row[key.replace("_tflops", "_frac_of_peak")] = row[key] / peak if peak else None
    return row


CONFIG = {"block_q": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}


def sparsa_kernel(mask_src: str, dtype: str) -> tuple[AttentionKernel, AttentionOp]:
    data = "(doc=doc)" if "doc" in mask_src else ""
    args = ", doc: i32[S]" if data else ""
    mask_src, args = mask_src.replace("[S]", f"[{S}]"), args.replace("[S]", f"[{S}]")
    src = (f"{mask_src}\nmodel M(q: {dtype}[{B}, {H}, {S}, {D}]{args}) -> {dtype}[{B}, {H}, {S}, {D}] {{\n"
           f"    return attention(q, q, q, mask=m{data})\n}}\n")
    blocks = f"block_q={CONFIG['block_q']} block_k={CONFIG['block_k']}"
    model = sparsa.compile(src, passes=f"canonicalize,sparsify-attention{{{blocks}}}", target="reference")
    att = next(o for o in model.module.walk() if isinstance(o, AttentionOp))
    return AttentionKernel.generate(att), att


def target_source(mask_src: str, dtype: str) -> str:
    """The attention as a whole `.sp` model for target="triton" (launcher, block map per call for data masks)."""
    data = "(doc=doc)" if "doc" in mask_src else ""
    args = f", doc: i32[{S}]" if data else ""
    t = f"{dtype}[{B}, {H}, {S}, {D}]"
    return (f"{mask_src.replace('[S]', f'[{S}]')}\nmodel M(q: {t}, k: {t}, v: {t}{args}) -> {t} {{\n"
            f"    return attention(q, k, v, mask=m{data})\n}}\n")


def run(dtype_name: str) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    flex = torch.compile(flex_attention)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, S), 5, replace=False))
    doc_np = np.searchsorted(cuts, np.arange(S), side="right").astype(np.int32)
    doc = torch.from_numpy(doc_np).cuda()
    q = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    qi, ki = torch.arange(S, device="cuda")[:, None], torch.arange(S, device="cuda")[None, :]
    results = []
    for name, (mask_src, dense_fn) in MASKS.items():
        dense = (doc[:, None] == doc[None, :]) & (ki <= qi) if dense_fn is None else dense_fn(qi, ki)
        row = measure(name, mask_src, dense, dtype_name, q, k, v, doc, doc_np, flex, create_block_mask)
        results.append(row)
        print(json.dumps(row))
    return results


def measure(name, mask_src, dense, dtype_name, q, k, v, doc, doc_np, flex, create_block_mask) -> dict:
    """One mask: Sparsa's kernel (and its block-map build), FlexAttention (and its block mask), SDPA."""
    pairs = int(dense.sum())
    useful = 4.0 * B * H * D * pairs
    kernel, att = sparsa_kernel(mask_src, "f32" if dtype_name == "f32" else dtype_name)
    static_map = att.block_map.defining_op.map
    data = {id(v_): doc_np for v_ in outer_values(att.mask)}
    bq, bk = CONFIG["block_q"], CONFIG["block_k"]

    def build():
        bm = static_map.data if static_map is not None else classify(att.mask, S, S, bq, bk, 1, 1, data)
        lists = kernel.prepare(bm, "cuda")
        torch.cuda.synchronize()
        return lists

    build()  # warm-up (CUDA kernels for the list building load lazily)
    t = time.perf_counter()
    lists = build()
    build_ms = 1e3 * (time.perf_counter() - t)
    args = [doc] if kernel.data else []
    tune = {"num_warps": CONFIG["num_warps"], "num_stages": CONFIG["num_stages"]}
    out = kernel(q, k, v, lists, args, **tune)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    err = (out.float() - ref.float()).abs().max().item()
    ms_sparsa = triton.testing.do_bench(lambda: kernel(q, k, v, lists, args, **tune))
    ms_sdpa_mask = triton.testing.do_bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense))

    def mask_mod(b, h, q_idx, kv_idx):
        if name == "document6":
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
        if name == "causal":
            return kv_idx <= q_idx
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 256)

    t = time.perf_counter()
    block_mask = create_block_mask(mask_mod, B, H, S, S, device="cuda")
    torch.cuda.synchronize()
    flex_first_ms = 1e3 * (time.perf_counter() - t)
    flex(q, k, v, block_mask=block_mask)  # compile
    ms_flex = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=block_mask))
    ms_flex_build = triton.testing.do_bench(lambda: create_block_mask(mask_mod, B, H, S, S, device="cuda"))
    target = sparsa.compile(target_source(mask_src, dtype_name), target="triton")
    target_args = (q, k, v, doc.to(torch.int32)) if "doc" in mask_src else (q, k, v)
    target_err = (target(*target_args).float() - ref.float()).abs().max().item()
    ms_target = triton.testing.do_bench(lambda: target(*target_args))
    row = {"mask": name, "dtype": dtype_name, **CONFIG, "max_abs_err_vs_sdpa": err, "sparsa_ms": ms_sparsa,
           "sparsa_target_ms": ms_target, "sparsa_target_max_abs_err": target_err,
           "sparsa_block_map_ms": build_ms, "flex_ms": ms_flex, "flex_block_mask_ms": ms_flex_build,
           "flex_block_mask_first_ms": flex_first_ms, "sdpa_masked_ms": ms_sdpa_mask,
           "sparsa_tflops": useful / ms_sparsa / 1e9, "flex_tflops": useful / ms_flex / 1e9}
    add_peak_fractions(row, dtype_name)
    if name == "causal":
        row["sdpa_is_causal_ms"] = triton.testing.do_bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    parser.add_argument("--moe-only", action="store_true", help="skip the attention cases")
    for key, value in CONFIG.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    args = parser.parse_args()
    CONFIG.update({key: getattr(args, key) for key in CONFIG})
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    results = run(args.dtype) if not args.moe_only else []
    results += [moe_bench(args.dtype), moe_bench(args.dtype, T=4096, D=1024, F=2816)]
    results += [moe_layer_bench(args.dtype), moe_layer_bench(args.dtype, T=4096, D=1024, F=2816), scan_bench()]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)



def sorted_experts(x, idx, gates, w1, w3, w2):
    """SwiGLU experts the eager sorted-dispatch way: argsort by expert, one matmul chain per expert segment."""
    T, K = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    tok = order // K
    y = torch.zeros(T, w2.shape[2], device=x.device, dtype=torch.float32)
    start = 0
    for e, c in enumerate(counts):
        if c:
            t = tok[start : start + c]
            h = torch.nn.functional.silu(x[t] @ w1[e]) * (x[t] @ w3[e])
            y.index_add_(0, t, (h @ w2[e]).float() * gates.reshape(-1)[order[start : start + c]][:, None].float())
        start += c
    return y.to(x.dtype)


def hf_loop_experts(x, idx, gates, w1, w3, w2):
    """SwiGLU experts the Hugging Face way: a loop over experts with torch.where and index_add_."""
    y = torch.zeros(idx.shape[0], w2.shape[2], device=x.device, dtype=x.dtype)
    mask = torch.nn.functional.one_hot(idx, w1.shape[0]).permute(2, 1, 0)
    for e in range(w1.shape[0]):
        slot, tok = torch.where(mask[e])
        h = torch.nn.functional.silu(x[tok] @ w1[e]) * (x[tok] @ w3[e])
        y.index_add_(0, tok, (h @ w2[e]) * gates[tok, slot, None])
    return y


def moe_bench(dtype_name: str, T: int = 1024, D: int = 512, F: int = 1024, E: int = 8, K: int = 2) -> dict:
    """Mixtral-style SwiGLU MoE layer: Sparsa's grouped-GEMM kernels vs an eager sorted dispatch and an HF loop.

    The routing indices (what moe.dispatch computes) are built here with torch ops on the GPU and timed
    separately: there is no Triton kernel for the dispatch yet.
    """
    from sparsa.backends.triton.moe import GroupedMatmulKernel
    from sparsa.ir.dialects.moe import GroupedMatmulCombineOp, GroupedMatmulOp

    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    block = 64
    src = (f"model M(x: f32[T, {D}], i: i64[T, {K}], g: f32[T, {K}]) -> f32[T, {D}] {{\n"
           f"    param w1: f32[{E}, {D}, {F}]\n    param w3: f32[{E}, {D}, {F}]\n    param w2: f32[{E}, {F}, {D}]\n"
           f"    return moe(x, i, g) |e, h| {{ (silu(h @ w1[e]) * (h @ w3[e])) @ w2[e] }}\n}}\n")
    model = sparsa.compile(src, passes=f"canonicalize,fuse-moe-dispatch{{block={block}}}", target="reference")
    up_op, down_op = [o for o in model.module.walk() if isinstance(o, GroupedMatmulOp | GroupedMatmulCombineOp)]
    up, down = GroupedMatmulKernel.generate(up_op), GroupedMatmulKernel.generate(down_op)
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    w1, w3 = (torch.randn(E, D, F, device="cuda", dtype=dtype) / D**0.5 for _ in range(2))
    w2 = torch.randn(E, F, D, device="cuda", dtype=dtype) / F**0.5
    logits = torch.randn(T, E, device="cuda")
    gates, idx = torch.topk(torch.softmax(logits, -1), K)
    gates = (gates / gates.sum(-1, keepdim=True)).to(dtype)

    def dispatch():
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        padded = (counts + block - 1) // block * block
        offsets = torch.cat([padded.new_zeros(1), torch.cumsum(padded, 0)])
        starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])[:-1]
        pos = offsets[:-1][flat[order]] + torch.arange(flat.numel(), device="cuda") - starts[flat[order]]
        perm = torch.full((int(offsets[-1]),), -1, dtype=torch.int64, device="cuda")
        perm[pos] = order
        return perm, offsets

    perm, offsets = dispatch()
    tiles = dict(block_m=block, block_n=64, block_k=64, num_warps=4, num_stages=3)

    def sparsa_layer():
        h = up(x, perm, offsets, [w1, w3], **tiles)
        return down(h, perm, offsets, [w2], gates, num_tokens=T, **tiles)

    def eager_sorted():
        return sorted_experts(x, idx, gates, w1, w3, w2)

    def hf_loop():
        return hf_loop_experts(x, idx, gates, w1, w3, w2)

    err = (sparsa_layer().float() - eager_sorted().float()).abs().max().item()
    useful = 2.0 * T * K * D * F * 3
    row = {"case": f"moe T={T} D={D} F={F} E={E} k={K}", "dtype": dtype_name, "max_abs_err_vs_eager": err,
           "sparsa_ms": triton.testing.do_bench(sparsa_layer), "dispatch_torch_ms": triton.testing.do_bench(dispatch),
           "eager_sorted_ms": triton.testing.do_bench(eager_sorted), "hf_loop_ms": triton.testing.do_bench(hf_loop)}
    row["sparsa_tflops"] = useful / row["sparsa_ms"] / 1e9
    add_peak_fractions(row, dtype_name)
    print(json.dumps(row))
    return row



def moe_layer_bench(dtype_name: str, T: int = 1024, D: int = 512, F: int = 1024, E: int = 8, K: int = 2) -> dict:
    """The whole Mixtral MoE layer (router matmul, softmax top-k, dispatch, grouped GEMMs, combine) compiled
    with target="triton", vs the same layer as a torch module: eager sorted dispatch, the HF expert loop,
    and torch.compile of each (Inductor; graph breaks where the code needs them)."""
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype_name]
    src = (f"model MoE(x: {dtype_name}[T, {D}]) -> {dtype_name}[T, {D}] {{\n"
           f"    param gate: {dtype_name}[{D}, {E}]\n    param w1: {dtype_name}[{E}, {D}, {F}]\n"
           f"    param w3: {dtype_name}[{E}, {D}, {F}]\n    param w2: {dtype_name}[{E}, {F}, {D}]\n"
           f"    p = softmax(x @ gate)\n    w, idx = topk(p, k={K})\n    w = w / sum(w, axis=-1, keepdim=true)\n"
           f"    return moe(x, idx, w) |e, h| {{ (silu(h @ w1[e]) * (h @ w3[e])) @ w2[e] }}\n}}\n")
    t0 = time.perf_counter()
    model = sparsa.compile(src, target="triton")
    rng = np.random.default_rng(0)
    weights = {"gate": rng.standard_normal((D, E)).astype(np.float32) / D**0.5,
               "w1": rng.standard_normal((E, D, F)).astype(np.float32) / D**0.5,
               "w3": rng.standard_normal((E, D, F)).astype(np.float32) / D**0.5,
               "w2": rng.standard_normal((E, F, D)).astype(np.float32) / F**0.5}
    model.load_weights(weights)
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    model(x)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    gate, w1, w3, w2 = (torch.from_numpy(weights[n]).to("cuda", dtype) for n in ("gate", "w1", "w3", "w2"))

    def route(x):
        p = torch.softmax((x @ gate).float(), -1)
        g, idx = torch.topk(p, K)
        return (g / g.sum(-1, keepdim=True)).to(x.dtype), idx

    def sorted_layer(x):
        g, idx = route(x)
        return sorted_experts(x, idx, g, w1, w3, w2)

    def hf_layer(x):
        g, idx = route(x)
        return hf_loop_experts(x, idx, g, w1, w3, w2)

    compiled = {}
    for name, fn in (("sorted", sorted_layer), ("hf_loop", hf_layer)):
        c = torch.compile(fn)
        t = time.perf_counter()
        c(x)
        torch.cuda.synchronize()
        compiled[name] = (c, time.perf_counter() - t)
    err = (model(x).float() - sorted_layer(x).float()).abs().max().item()
    useful = 2.0 * T * K * D * F * 3
    row = {"case": f"moe layer (target=triton) T={T} D={D} F={F} E={E} k={K}", "dtype": dtype_name,
           "max_abs_err_vs_eager": err, "sparsa_compile_s": compile_s,
           "sparsa_ms": triton.testing.do_bench(lambda: model(x)),
           "eager_sorted_ms": triton.testing.do_bench(lambda: sorted_layer(x)),
           "hf_loop_ms": triton.testing.do_bench(lambda: hf_layer(x))}
    for name, (c, secs) in compiled.items():
        row[f"compiled_{name}_ms"] = triton.testing.do_bench(lambda c=c: c(x))
        row[f"compiled_{name}_compile_s"] = secs
    row["sparsa_tflops"] = useful / row["sparsa_ms"] / 1e9
    add_peak_fractions(row, dtype_name)
    best = min(row["compiled_sorted_ms"], row["compiled_hf_loop_ms"])
    row["speedup_vs_best_torch_compile"] = best / row["sparsa_ms"]
    print(json.dumps(row))
    return row


def scan_bench(B: int = 1, L: int = 2048, DI: int = 1024, N: int = 16) -> dict:
    """Mamba's selective scan: Sparsa's fused-scan kernel vs an eager loop over time (float32)."""
    from pathlib import Path

    from sparsa.backends.triton.scan import FusedScanKernel
    from sparsa.ir.dialects.scan import FusedScanOp

    model = sparsa.compile(str(Path(__file__).parent.parent / "examples" / "selective_scan.sp"), target="reference")
    op = next(o for o in model.module.walk() if isinstance(o, FusedScanOp))
    kernel = FusedScanKernel.generate(op)
    u, delta = torch.randn(B, L, DI, device="cuda"), torch.rand(B, L, DI, device="cuda") * 0.1
    A = -torch.rand(DI, N, device="cuda")
    Bs, C = torch.randn(B, L, N, device="cuda"), torch.randn(B, L, N, device="cuda")
    inputs = [delta[..., None], A, (delta * u)[..., None], Bs[:, :, None, :], C[:, :, None, :]]

    def eager():
        h = torch.zeros(B, DI, N, device="cuda")
        ys = []
        for t in range(L):
            h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * Bs[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1))
        return torch.stack(ys, 1)

    out = kernel(inputs, (B, L, DI, N))
    err = (out - eager()).abs().max().item()
    row = {"case": f"selective scan B={B} L={L} D={DI} N={N}", "max_abs_err_vs_eager": err,
           "sparsa_ms": triton.testing.do_bench(lambda: kernel(inputs, (B, L, DI, N))),
           "eager_loop_ms": triton.testing.do_bench(eager, warmup=1, rep=50)}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
