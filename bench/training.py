"""Forward + backward on the cpu target against what people train with today, side by side in one process
(not a test). Same conventions as bench/cpu.py: medians, a case's implementations interleaved with an untimed call
before each timed one (`side_by_side`), 2 threads, float32, the load beside every row, the machine's header first.
The attention case calls its two Sparsa forms 3 times before its rounds: the first calls of a process fault their
large buffers' pages in (malloc's mmap threshold grows as they are freed), which a training loop pays once.

    python bench/training.py                  # every case
    python bench/training.py --only attention # sliding-window attention: .sp, torch.compile, eager SDPA, Flex
    python bench/training.py --only moe       # a Mixtral, a NemotronH and a GPT-OSS block
    python bench/training.py --only nemotron  # the NemotronH block (relu^2 experts, a shared expert)
    python bench/training.py --only gpt-oss   # the GPT-OSS block (interleaved gate/up, expert biases)
    python bench/training.py --only scan      # the selective scan (its eager loop takes minutes: one run)
    python bench/training.py --only delta     # a gated delta net layer (Qwen3-Next's chunked rule)
    python bench/training.py --as-avx2        # AVX2 code (cpu:x86-64-v3) against baselines held to AVX2, as
                                              # bench/cpu.py --as-avx2 does
"""

from __future__ import annotations

import argparse
import os

import cpu as bench_cpu  # first: with --as-avx2 it holds NumPy's and torch's kernels to AVX2 before they load
import numpy as np
import torch
from cpu import hf_loop, machine_header, median_ms, record, sgemm_gflops, side_by_side

import sparsa
from sparsa.runtime.torch_backend import SparsaBackend

TARGET = "cpu"  # --as-avx2: cpu:x86-64-v3

F = torch.nn.functional
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def bench_attention(sgemm: float) -> None:
    """The issue's case: sliding window 256 at S=2048, B=1, H=8, Dh=64, forward + backward."""
    S, H, Dh, W = 2048, 8, 64, 256
    case = f"sliding window {W} S={S} fwd+bwd"
    useful = 4 * H * Dh * sum(min(W, n + 1) for n in range(S)) * 3.5  # forward 2 products, backward 5
    m = sparsa.compile(f"mask w(q, k) = k <= q and q - k < {W}\n"
                       f"model A(q: f32[1, {H}, {S}, {Dh}], k: f32[1, {H}, {S}, {Dh}], v: f32[1, {H}, {S}, {Dh}]) "
                       f"-> f32[1, {H}, {S}, {Dh}] {{\n    return attention(q, k, v, mask=w)\n}}\n", target=TARGET)
    qkv = [torch.randn(1, H, S, Dh, requires_grad=True) for _ in range(3)]
    xs = [t.detach().numpy() for t in qkv]
    dy = torch.randn(1, H, S, Dh)
    dyn = dy.numpy()

    class Sliding(torch.nn.Module):
        def forward(self, q, k, v):
            i = torch.arange(q.shape[2])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=(i[None, :] <= i[:, None])
                                                  & (i[:, None] - i[None, :] < W))

    def step(f):
        for t in qkv:
            t.grad = None
        f(*qkv).backward(dy)

    backend = SparsaBackend({"target": TARGET})
    compiled = torch.compile(Sliding(), backend=backend)
    impls = {"sparsa cpu (.sp, m.vjp)": lambda: m.vjp(*xs)[1](dyn), "torch.compile(backend=sparsa)": lambda: step(
        compiled), "eager SDPA boolean mask": lambda: step(Sliding())}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        bm = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < W), None, None, S, S, device="cpu")
        flex = torch.compile(flex_attention)
        step(lambda q, k, v: flex(q, k, v, block_mask=bm))
        impls["FlexAttention compiled"] = lambda: step(lambda q, k, v: flex(q, k, v, block_mask=bm))
    except Exception as e:  # Inductor's CPU flex backward is not available everywhere
        print(f"{case}: FlexAttention fwd+bwd unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    for f in list(impls.values())[:2]:  # (the compiles, and the first calls' packing, before the rounds)
        for _ in range(3):
            f()
    side_by_side(case, impls, useful, sgemm, runs=11,
                 extra={"torch.compile(backend=sparsa)": {"fallbacks": sum(backend.fallbacks.values())}})


def bench_moe(sgemm: float) -> None:
    T, D, Fd, E, K = 1024, 512, 1024, 8, 2
    case = f"Mixtral block T={T} D={D} F={Fd} E={E} k={K} fwd+bwd"
    flops = 2 * T * K * D * Fd * 3 * 3
    m = sparsa.compile(os.path.join(EXAMPLES, "mixtral_moe.sp"), target=TARGET).init_weights(0)
    x = np.random.default_rng(0).standard_normal((T, D)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal((T, D)).astype(np.float32)
    ws = {n: torch.tensor(np.asarray(a), requires_grad=True) for n, a in m.weights.items()}
    tx, tdy = torch.tensor(x, requires_grad=True), torch.from_numpy(dy)

    def eager():
        for t in (tx, *ws.values()):
            t.grad = None
        hf_loop(tx, ws["gate"], ws["w1"], ws["w3"], ws["w2"], K).backward(tdy)

    # transformers' own block (grouped_mm experts: a sort, then one GEMM per expert), the same weights: eager, and
    # under torch.compile(backend="sparsa"), which folds it before AOTAutograd (the backward is Sparsa's)
    block = transformers_block(ws, K)
    bx, bdy = tx.detach()[None].clone().requires_grad_(True), tdy[None]  # [1, T, D]: the block's batch dim

    def block_step(f):
        for t in (bx, *block.parameters()):
            t.grad = None
        out = f(bx)
        (out[0] if isinstance(out, tuple) else out).backward(bdy)

    compiled = torch.compile(block, backend=SparsaBackend({"target": TARGET}))
    for _ in range(2):  # (the compile)
        block_step(compiled)
    side_by_side(case, {"sparsa cpu (m.vjp)": lambda: m.vjp(x)[1](dy), "eager HF loop + autograd": eager,
                        "eager transformers grouped_mm": lambda: block_step(block),
                        "torch.compile(backend=sparsa)": lambda: block_step(compiled)}, flops, sgemm, runs=7)


def bench_nemotron(sgemm: float) -> None:
    """transformers' NemotronH MoE block (ungated relu^2 experts, sigmoid routing, a shared expert)."""
    from torch_backend import nemotron_h_moe

    T, D, Fd, E, K = 1024, 512, 1024, 8, 2
    flops = 2 * T * D * Fd * 2 * 3 * (K + 1)  # the routed and the shared experts' two GEMMs, forward and backward
    bench_block(f"NemotronH MoE block (relu^2) T={T} D={D} F={Fd} E={E} k={K} fwd+bwd", nemotron_h_moe(D, Fd, E, K),
                T, D, flops, sgemm)


def bench_gpt_oss(sgemm: float) -> None:
    """transformers' GPT-OSS MoE block (interleaved gate/up with clamps, expert biases)."""
    from torch_backend import gpt_oss_moe

    T, D, Fd, E, K = 1024, 512, 1024, 8, 2
    flops = 2 * T * D * Fd * 3 * 3 * K  # gate, up and down GEMMs, forward and backward
    bench_block(f"GPT-OSS MoE block (biases) T={T} D={D} F={Fd} E={E} k={K} fwd+bwd", gpt_oss_moe(D, Fd, E, K),
                T, D, flops, sgemm)


def bench_gated_delta(sgemm: float) -> None:
    """A gated delta net layer (projections and transformers' chunked rule, Qwen3-Next's linear attention)."""
    from torch_backend import GatedDeltaNet

    T, D, H, Dh, C = 1024, 1024, 8, 128, 64
    # a chunk of a head: QKᵀ and (βK)Kᵀ, two triangular solves, P·V', and the state read twice and updated
    chunk = 2 * 2 * C * C * Dh + 2 * C * C * Dh + 2 * C * C * Dh + 3 * 2 * C * Dh * Dh
    flops = 3 * (2 * T * D * 4 * H * Dh + chunk * H * (T // C))  # with the projections; forward and backward
    bench_block(f"gated delta net (Qwen3-Next chunked rule) T={T} D={D} H={H} Dh={Dh} fwd+bwd",
                GatedDeltaNet(D, H, Dh), T, D, flops, sgemm, "eager transformers (chunked torch rule)")


def bench_block(case: str, block: torch.nn.Module, T: int, D: int, flops: float, sgemm: float,
                eager: str = "eager transformers grouped_mm") -> None:
    """A transformers block trained a step at a time: eager, Inductor, and backend=sparsa (which folds a MoE
    block's experts before AOTAutograd: their backward is Sparsa's)."""
    torch.manual_seed(0)
    block = block.train()
    x, dy = torch.randn(1, T, D, requires_grad=True), torch.randn(1, T, D)

    def step(f):
        for t in (x, *block.parameters()):
            t.grad = None
        f(x).backward(dy)

    record(case, eager, median_ms(lambda: step(block), runs=7, warmup=2), flops, sgemm)
    for label, backend in (("torch.compile (Inductor)", "inductor"),
                           ("torch.compile(backend=sparsa)", SparsaBackend({"target": TARGET}))):
        torch._dynamo.reset()
        compiled = torch.compile(block, backend=backend)
        record(case, label, median_ms(lambda f=compiled: step(f), runs=7, warmup=2), flops, sgemm)


def transformers_block(ws: dict, k: int) -> torch.nn.Module:
    """transformers' MixtralSparseMoeBlock with the .sp model's weights (gate [D, E], w1/w3 [E, D, F], w2 [E, F, D])."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    E, D, Fd = ws["w1"].shape
    config = transformers.MixtralConfig(hidden_size=D, intermediate_size=Fd, num_local_experts=E,
                                        num_experts_per_tok=k)
    config._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ws["gate"].T)
        block.experts.gate_up_proj.copy_(torch.cat([ws["w1"], ws["w3"]], 2).transpose(1, 2))
        block.experts.down_proj.copy_(ws["w2"].transpose(1, 2))
    return block


def bench_scan(sgemm: float) -> None:
    B, L, DI, N = 1, 2048, 1024, 16
    case = f"selective scan L={L} D={DI} N={N} fwd+bwd"
    flops = 9 * B * L * DI * N * 3
    m = sparsa.compile(os.path.join(EXAMPLES, "selective_scan.sp"), target=TARGET)
    rng = np.random.default_rng(0)
    u, delta, Bs, C = (rng.standard_normal(s).astype(np.float32) * 0.5 for s in ((B, L, DI), (B, L, DI), (B, L, N),
                                                                                  (B, L, N)))
    delta = np.abs(delta) * 0.3 + 0.05
    A = -np.abs(rng.standard_normal((DI, N))).astype(np.float32)
    Dskip = rng.standard_normal(DI).astype(np.float32)
    dy = rng.standard_normal((B, L, DI)).astype(np.float32)
    record(case, "sparsa cpu (m.vjp)", median_ms(lambda: m.vjp(u, delta, A, Bs, C, Dskip)[1](dy)), flops, sgemm)
    ts = [torch.tensor(a, requires_grad=True) for a in (u, delta, A, Bs, C, Dskip)]

    def loop():
        tu, td, tA, tB, tC, tD = ts
        h, ys = torch.zeros(B, DI, N), []
        for t in range(L):
            h = torch.exp(td[:, t, :, None] * tA) * h + (td[:, t] * tu[:, t])[:, :, None] * tB[:, t, None, :]
            ys.append((h * tC[:, t, None, :]).sum(-1))
        (torch.stack(ys, 1) + tD * tu).backward(torch.from_numpy(dy))

    record(case, "eager loop over time + autograd", median_ms(loop, runs=1, warmup=0), flops, sgemm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose group name contains this")
    parser.add_argument("--as-avx2", action="store_true", help="AVX2 code (cpu:x86-64-v3) against baselines held "
                        "to AVX2 (torch's kernels and Inductor's code, OpenBLAS, MKL)")
    args = parser.parse_args()
    global TARGET
    if args.as_avx2:
        TARGET = bench_cpu.TARGET = "cpu:x86-64-v3"
    torch.set_num_threads(2)
    os.environ.setdefault("SPARSA_NUM_THREADS", "2")
    machine_header()
    sgemm = sgemm_gflops()
    for name, run in {"attention": bench_attention, "moe": bench_moe, "nemotron moe": bench_nemotron,
                      "gpt-oss moe": bench_gpt_oss, "scan": bench_scan, "delta": bench_gated_delta}.items():
        if args.only in name:
            run(sgemm)


if __name__ == "__main__":
    main()
