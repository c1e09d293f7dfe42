"""The cpu target against PyTorch on this machine, side by side in one process (not a test).

Medians of at least 5 timed runs after a warm-up; torch.set_num_threads(2) (SPARSA_NUM_THREADS likewise);
float32. The implementations of a case run interleaved, one call of each a round (`side_by_side`), so a change in
the host's load over the case falls on all of them alike. Every row records the 1-minute load average beside it,
since this machine is shared: compare figures within one run only. Useful GFLOP/s count only the FLOPs the
sparse structure needs, and each is also given as a fraction of this machine's best sgemm (2048^3): the faster
of NumPy's BLAS and torch's (each named by what it is: OpenBLAS, MKL), measured at the start of the run and
again at its end.
The header names the target (CPU, ISA, vector registers, register tile, caches, cores), a measured FMA peak
of one core (multiply-adds through the same MLIR -> LLVM JIT) and the measured copy bandwidth.

    python bench/cpu.py                 # every case
    python bench/cpu.py --only moe      # cases whose name contains "moe" (or attention, scan, bsr, dense)
    python bench/cpu.py --target cpu:x86-64-v3   # AVX2 code (and its tiles) on an AVX-512 machine
    python bench/cpu.py --as-avx2       # that, against baselines held to AVX2 too (torch's kernels and Inductor's
                                        # code, OpenBLAS, MKL): the nearest an AVX-512 machine comes to an AVX2 one
    python bench/cpu.py --inductor      # also torch.compile (Inductor) variants: minutes of compiling
    python bench/cpu.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# --as-avx2: the libraries read these as they load (torch: its kernels' and Inductor's ISA; OpenBLAS: its kernels)
AVX2_BASELINES = {"ATEN_CPU_CAPABILITY": "avx2", "OPENBLAS_CORETYPE": "Haswell", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
if "--as-avx2" in sys.argv:
    os.environ.update(AVX2_BASELINES)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import sparsa  # noqa: E402

ROWS: list[dict[str, Any]] = []


def median_ms(fn: Callable[[], Any], runs: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def side_by_side(case: str, impls: dict[str, Callable[[], Any]], flops: float, sgemm: float, runs: int = 5,
                 extra: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """Times a case's implementations interleaved: `runs` rounds (the order turned by one a round), in each one call
    of each implementation untimed and then one timed, so a busy second of this shared host slows all of them, not
    the one that happened to be timed then. The untimed call takes what switching costs: caches the last one
    filled, and the threads of the last one's library still spinning (OpenBLAS's spin for tens of milliseconds after
    a call: timed right after NumPy's matmul, MKL's took 133 ms against its 82). Records each one's median (with
    its `extra` fields) and returns them by name."""
    names = list(impls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            impls[name]()
            t = time.perf_counter()
            impls[name]()
            times[name].append(time.perf_counter() - t)
    ms = {name: statistics.median(times[name]) * 1e3 for name in names}
    for name in names:
        record(case, name, ms[name], flops, sgemm, **(extra or {}).get(name, {}))
    return ms


def record(case: str, impl: str, ms: float, flops: float, sgemm: float, **extra: Any) -> None:
    gflops = flops / ms / 1e6 if ms else 0.0
    row = {"case": case, "impl": impl, "ms": round(ms, 3), "useful_gflops": round(gflops, 1),
           "of_sgemm": round(gflops / sgemm, 3) if sgemm else None, "load": round(os.getloadavg()[0], 2), **extra}
    ROWS.append(row)
    print(f"{case:34s} {impl:28s} {ms:10.2f} ms {gflops:8.1f} GFLOP/s {row['of_sgemm'] or 0:6.0%} of sgemm "
          f"load {row['load']:.2f}" + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)


def failed(case: str, impl: str, e: Exception) -> None:
    """A baseline that did not compile: its first error line in the table and the JSON instead of a time."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"{case:34s} {impl}: failed to compile ({type(e).__name__}: {first[:160]})", flush=True)
    ROWS.append({"case": case, "impl": impl, "error": f"{type(e).__name__}: {first[:300]}"})


TARGET = "cpu"  # --target


def blas_names() -> tuple[str, str]:
    """What NumPy's and torch's matmuls call (NumPy's build record; torch's BLAS_INFO)."""
    import re

    try:
        numpy_blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except (KeyError, TypeError):
        numpy_blas = "BLAS"
    numpy_blas = "OpenBLAS" if "openblas" in numpy_blas.lower() else numpy_blas
    found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    torch_blas = {"mkl": "MKL", "open": "OpenBLAS", "openblas": "OpenBLAS"}.get(found.group(1), found.group(1)) \
        if found else "BLAS"
    return numpy_blas, torch_blas


def sgemm_gflops(when: str = "start") -> float:
    """The best sgemm of this machine now: NumPy's and torch's, each timed, the faster one returned."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    numpy_blas, torch_blas = blas_names()
    best = 0.0
    for impl, fn in ((f"numpy.matmul ({numpy_blas})", lambda: an @ bn),
                     (f"torch.matmul ({torch_blas})", lambda: a @ b)):
        ms = median_ms(fn, runs=5)
        gf = 2 * n**3 / ms / 1e6
        record(f"sgemm {n}^3 ({when})", impl, ms, 2 * n**3, max(best, gf))
        best = max(best, gf)
    return best


def machine_header() -> dict[str, Any]:
    """The target, a measured FMA peak and copy bandwidth: printed and kept in the JSON."""
    from sparsa.backends import base as backends
    from sparsa.backends.cpu.probe import copy_bandwidth_gbs, fma_peak_gflops

    target = backends.get(TARGET).target
    info = {"target": TARGET, "machine": target.describe(), "isa": target.isa, "cores": target.cores,
            "fma_peak_gflops_per_core": round(fma_peak_gflops(target), 1), "copy_gbs": round(copy_bandwidth_gbs(), 1),
            "load": round(os.getloadavg()[0], 2)}
    print(f"target {TARGET}: {info['machine']}")
    print(f"FMA peak {info['fma_peak_gflops_per_core']} GFLOP/s per core (float32, {target.isa}); copy "
          f"{info['copy_gbs']} GB/s (one thread); load {info['load']}")
    return info


# ---- MoE ------------------------------------------------------------------------------------------------
MOE = """
model MoE(x: f32[T, {D}]) -> f32[T, {D}] {{
    param gate: f32[{D}, {E}]
    param w1: f32[{E}, {D}, {F}]
    param w3: f32[{E}, {D}, {F}]
    param w2: f32[{E}, {F}, {D}]
    w, idx = topk(softmax(x @ gate, axis=-1), k={K})
    w = w / sum(w, axis=-1, keepdim=true)
    return moe(x, idx, w) |e, h| {{ (silu(h @ w1[e]) * (h @ w3[e])) @ w2[e] }}
}}
"""


def hf_loop(x, gate, w1, w3, w2, k):
    """The Hugging Face Mixtral block: a Python loop over experts with index_add_."""
    probs = torch.softmax(x @ gate, dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    mask = torch.nn.functional.one_hot(idx, gate.shape[1]).permute(2, 1, 0)
    for e in range(gate.shape[1]):
        slot, tok = torch.where(mask[e])
        if tok.numel() == 0:
            continue
        h = x[tok]
        y = (torch.nn.functional.silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]
        out.index_add_(0, tok, y * w[tok, slot, None])
    return out


def sorted_dispatch(x, gate, w1, w3, w2, k):
    """Sort assignments by expert, one matmul per contiguous segment, weighted scatter-add."""
    probs = torch.softmax(x @ gate, dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate.shape[1]).tolist()
    tok = order // k
    h = x[tok]
    ys, start = [], 0
    for e, n in enumerate(counts):
        seg = h[start:start + n]
        ys.append((torch.nn.functional.silu(seg @ w1[e]) * (seg @ w3[e])) @ w2[e])
        start += n
    y = torch.cat(ys) * w.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, tok, y)


def bench_moe(sgemm: float, inductor: bool) -> None:
    for label, T, D, F, E, K in (("Mixtral small", 1024, 512, 1024, 8, 2), ("fine-grained E=64", 2048, 512, 256, 64, 8),
                                 ("Mixtral medium", 4096, 1024, 2816, 8, 2)):
        moe_case(sgemm, inductor, label, T, D, F, E, K)


def moe_case(sgemm: float, inductor: bool, label: str, T: int, D: int, F: int, E: int, K: int) -> None:
    case = f"MoE {label} T={T} D={D} F={F} E={E} k={K}"
    flops = 2 * T * K * D * F * 3
    t = time.perf_counter()
    model = sparsa.compile(MOE.format(D=D, F=F, E=E, K=K), target=TARGET)
    cold = time.perf_counter() - t
    model.init_weights(0)
    wt = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in model.weights.items()}
    x = torch.randn(T, D)
    xn = x.numpy()
    args = (x, wt["gate"], wt["w1"], wt["w3"], wt["w2"], K)
    side_by_side(case, {"sparsa cpu": lambda: model(xn), "eager HF loop": lambda: hf_loop(*args),
                        "eager sorted dispatch": lambda: sorted_dispatch(*args)}, flops, sgemm,
                 extra={"sparsa cpu": {"cold_compile_s": round(cold, 2), "cached": model.native.cached}})
    if inductor:
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        torch._dynamo.config.capture_scalar_outputs = True
        for name, fn in (("inductor HF loop", hf_loop), ("inductor sorted dispatch", sorted_dispatch)):
            compiled = torch.compile(fn)
            t = time.perf_counter()
            try:
                compiled(*args)
            except Exception as e:  # e.g. the sorted dispatch's .tolist() split sizes under capture_scalar_outputs
                failed(case, name, e)
                continue
            first = time.perf_counter() - t
            record(case, name, median_ms(lambda c=compiled: c(*args)), flops, sgemm,
                   compile_s=round(first, 1))
    print(f"{'':34s} {moe_error(model(xn), hf_loop(*args), x, wt['gate'], K)}")


def moe_error(got: np.ndarray, ref: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, k: int) -> str:
    """The largest error against eager (relative to the output's largest magnitude), over the tokens whose choice of
    experts does not hinge on rounding: where the k-th and (k+1)-th router probabilities are within 1e-5 of each
    other, float32's rounding of x @ gate picks either (E=64, k=8: a token or two in 2048), and the outputs differ
    by a whole expert's share."""
    probs = torch.softmax(x @ gate, -1)
    near = torch.zeros(len(x), dtype=torch.bool)
    if k < probs.shape[1]:
        top = probs.topk(k + 1, -1).values
        near = ((top[:, k - 1] - top[:, k]) <= 1e-5 * top[:, k - 1])
    clear = ~near.numpy()
    ref = ref.numpy()
    err = float(np.abs(got[clear] - ref[clear]).max() / max(1.0, np.abs(ref).max())) if clear.any() else 0.0
    return f"max error vs eager {err:.1e}" + (f" ({int(near.sum())} near-tied tokens left out)" if near.any() else "")


# ---- attention --------------------------------------------------------------------------------------
def attention_model(mask: str, extra: str = "") -> Any:
    src = f"""{mask}
model A(q: f32[1, 8, S, 64], k: f32[1, 8, S, 64], v: f32[1, 8, S, 64]{extra}) -> f32[1, 8, S, 64] {{
    return attention(q, k, v, mask=m{"(doc=doc)" if extra else ""})
}}
"""
    return sparsa.compile(src, target=TARGET)


def bench_attention(sgemm: float) -> None:
    S, H, Dh, W = 4096, 8, 64, 256
    q, k, v = (torch.randn(1, H, S, Dh) for _ in range(3))
    qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
    i = torch.arange(S)
    # sliding window
    case = f"sliding window {W} causal S={S}"
    useful = 4 * H * Dh * sum(min(W, n + 1) for n in range(S))
    m = attention_model(f"mask m(b, h, q, k) = k <= q and q - k < {W}")
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < W)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    impls = {"sparsa cpu": lambda: m(qn, kn, vn), "SDPA boolean mask": lambda: sdpa(q, k, v, attn_mask=allowed)}
    extra: dict[str, dict[str, Any]] = {}
    flex_case(case, q, k, v, lambda b, h, qi, ki: (ki <= qi) & (qi - ki < W), impls, extra)
    side_by_side(case, impls, useful, sgemm, extra=extra)
    # plain causal
    case = f"causal S={S}"
    useful = 4 * H * Dh * S * (S + 1) // 2
    m = attention_model("mask m(b, h, q, k) = k <= q")
    side_by_side(case, {"sparsa cpu": lambda: m(qn, kn, vn), "SDPA is_causal": lambda: sdpa(q, k, v, is_causal=True)},
                 useful, sgemm)
    # documents
    case = f"document mask, 6 docs S={S}"
    doc = np.sort(np.random.default_rng(0).integers(0, 6, S)).astype(np.int32)
    counts = np.bincount(doc)
    useful = 4 * H * Dh * int(sum(c * (c + 1) // 2 for c in counts))
    m = attention_model("mask m(b, h, q, k; doc: i32[S]) = doc[q] == doc[k] and k <= q", ", doc: i32[S]")
    dt = torch.from_numpy(doc.astype(np.int64))
    impls, extra = {"sparsa cpu (incl. block map)": lambda: m(qn, kn, vn, doc)}, {}
    flex_case(case, q, k, v, lambda b, h, qi, ki: (dt[qi] == dt[ki]) & (ki <= qi), impls, extra, include_map=True)
    side_by_side(case, impls, useful, sgemm, extra=extra)


def flex_case(case: str, q, k, v, mask_mod, impls: dict[str, Callable[[], Any]], extra: dict[str, dict[str, Any]],
              include_map: bool = False) -> None:
    """Compiles FlexAttention for mask_mod and adds it to a case's `impls` (with its block mask's time to build and
    its compile time in `extra`), or records why it did not compile."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        print(f"{case}: FlexAttention unavailable ({e})")
        return
    S = q.shape[2]
    try:
        t = time.perf_counter()
        flex = torch.compile(flex_attention)
        bm = create_block_mask(mask_mod, None, None, S, S, device="cpu")
        flex(q, k, v, block_mask=bm)
        compile_s = time.perf_counter() - t
    except Exception as e:  # Inductor cannot build every mask_mod on CPU (the document mask's gather did not)
        failed(case, "FlexAttention compiled", e)
        return
    build = median_ms(lambda: create_block_mask(mask_mod, None, None, S, S, device="cpu"), runs=3)
    name = "FlexAttention compiled" + (" (incl. map)" if include_map else "")
    impls[name] = (lambda: flex(q, k, v, block_mask=create_block_mask(mask_mod, None, None, S, S, device="cpu"))) \
        if include_map else (lambda: flex(q, k, v, block_mask=bm))
    extra[name] = {"block_mask_ms": round(build, 1), "compile_s": round(compile_s, 1)}


# ---- scan and sparse weights ------------------------------------------------------------------------------
def bench_scan(sgemm: float) -> None:
    B, L, DI, N = 1, 2048, 1024, 16
    case = f"selective scan L={L} D={DI} N={N}"
    m = sparsa.compile(open(os.path.join(os.path.dirname(__file__), "..", "examples", "selective_scan.sp")).read(),
                       target=TARGET)
    rng = np.random.default_rng(0)
    u, delta, Bs, C = (rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((B, L, DI), (B, L, DI), (B, L, N),
                                                                                  (B, L, N)))
    A = -np.abs(rng.standard_normal((DI, N))).astype(np.float32)
    Dskip = rng.standard_normal(DI).astype(np.float32)
    flops = 9 * B * L * DI * N
    tu, td, tA, tB, tC, tD = map(torch.from_numpy, (u, delta, A, Bs, C, Dskip))

    def loop():
        h = torch.zeros(B, DI, N)
        ys = []
        for t in range(L):
            h = torch.exp(td[:, t, :, None] * tA) * h + (td[:, t] * tu[:, t])[:, :, None] * tB[:, t, None, :]
            ys.append((h * tC[:, t, None, :]).sum(-1))
        return torch.stack(ys, 1) + tD * tu

    side_by_side(case, {"sparsa cpu": lambda: m(u, delta, A, Bs, C, Dskip), "eager loop over time": loop}, flops,
                 sgemm)


def bench_bsr(sgemm: float) -> None:
    T, K, N, blk, density = 2048, 1024, 4096, 32, 0.10
    case = f"BSR FFN {density:.0%} blocks T={T} {K}x{N}"
    m = sparsa.compile(f"model F(x: f32[T, {K}]) -> f32[T, {N}] {{\n    param w: f32[{K}, {N}] sparse "
                       f"bsr({blk}, {blk})\n    return x @ w\n}}\n", target=TARGET)
    rng = np.random.default_rng(0)
    keep = rng.random((K // blk, N // blk)) < density
    w = rng.standard_normal((K, N)).astype(np.float32) * np.kron(keep, np.ones((blk, blk), np.float32))
    m.load_weights({"w": w})
    x = rng.standard_normal((T, K)).astype(np.float32)
    useful = 2 * T * blk * blk * int(keep.sum())
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    side_by_side(case, {"sparsa cpu": lambda: m(x), "dense torch.matmul": lambda: tx @ tw}, useful, sgemm)


def bench_dense(sgemm: float) -> None:
    """Dense GEMMs: the sgemm rows' 2048^3 product, and a Linear layer (w stored [N, K] as PyTorch keeps it, read
    through its transpose)."""
    dense_case(sgemm, "dense x @ w 2048^3", 2048, 2048, 2048, False)
    dense_case(sgemm, "dense Linear T=2048 1024->4096", 2048, 1024, 4096, True)


def dense_case(sgemm: float, case: str, T: int, K: int, N: int, linear: bool) -> None:
    numpy_blas, torch_blas = blas_names()
    w_type, read = (f"f32[{N}, {K}]", "transpose(w, [1, 0])") if linear else (f"f32[{K}, {N}]", "w")
    m = sparsa.compile(f"model L(x: f32[T, {K}], w: {w_type}) -> f32[T, {N}] {{\n    return x @ {read}\n}}\n",
                       target=TARGET)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = rng.standard_normal((N, K) if linear else (K, N)).astype(np.float32)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    wn = w.T if linear else w
    flops = 2 * T * K * N
    side_by_side(case, {"sparsa cpu": lambda: m(x, w), f"numpy.matmul ({numpy_blas})": lambda: x @ wn,
                        f"torch ({torch_blas})": (lambda: torch.nn.functional.linear(tx, tw)) if linear else
                        (lambda: tx @ tw)}, flops, sgemm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose group name contains this")
    parser.add_argument("--inductor", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--json", default="", help="write the rows here")
    parser.add_argument("--target", default="cpu", help="cpu, or cpu:<machine> that runs here (cpu:x86-64-v3)")
    parser.add_argument("--as-avx2", action="store_true", help="AVX2 code (cpu:x86-64-v3) against baselines held to "
                        "AVX2: " + " ".join(f"{k}={v}" for k, v in AVX2_BASELINES.items()))
    args = parser.parse_args()
    global TARGET
    TARGET = "cpu:x86-64-v3" if args.as_avx2 else args.target
    torch.set_num_threads(2)
    os.environ.setdefault("SPARSA_NUM_THREADS", "2")
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels), {torch.get_num_threads()} "
          f"threads, sparsa threads {os.environ['SPARSA_NUM_THREADS']}, load {os.getloadavg()[0]:.2f}"
          + (f"; baselines held to AVX2 ({', '.join(f'{k}={v}' for k, v in AVX2_BASELINES.items())})"
             if args.as_avx2 else ""))
    header = machine_header()
    sgemm = sgemm_gflops()
    groups = {"moe": lambda: bench_moe(sgemm, args.inductor), "attention": lambda: bench_attention(sgemm),
              "scan": lambda: bench_scan(sgemm), "bsr": lambda: bench_bsr(sgemm), "dense": lambda: bench_dense(sgemm)}
    for name, run in groups.items():
        if args.only in name:
            run()
    end = sgemm_gflops("end")
    print(f"best sgemm {sgemm:.1f} GFLOP/s at the start, {end:.1f} at the end (the ratios above use the start's)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    main()
