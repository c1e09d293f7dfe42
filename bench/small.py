"""Small shapes and decode on the cpu target against PyTorch, in one process (not a test): where the host's cost
per call is the whole call. Medians of many timed calls after a warm-up; float32; the 1-minute load average
beside every row (this machine is shared: compare figures within one run only).

- `.sp` models on the cpu target, two threads (SPARSA_NUM_THREADS and torch.set_num_threads): the two-matmul
  model at 16x32, a MoE layer at decode (4 tokens), mixtral_moe.sp at 8 tokens, attention of one query
  against a long KV, document_attention.sp at S=128 and 512 (its block map classified at each call). The MoE
  and decode rows also give the time to stream the bytes they must read once (the selected experts' weights, K
  and V) at this machine's measured copy bandwidth.
- Tiny transformers models (hidden size 32) under torch.compile(backend="sparsa"), one thread, against eager.

    python bench/small.py [--only decode|documents|...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cpu import MOE, ROWS, hf_loop, machine_header, moe_error, sorted_dispatch

import sparsa

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def median_us(fn: Callable[[], Any], seconds: float = 1.0, warmup: int = 20) -> float:
    """The median of as many calls as fit in about `seconds` (at least 20)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 20 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def row(case: str, impl: str, us: float, **extra: Any) -> None:
    entry = {"case": case, "impl": impl, "us": round(us, 1), "load": round(os.getloadavg()[0], 2), **extra}
    ROWS.append(entry)
    print(f"{case:40s} {impl:30s} {us:10.1f} us  load {entry['load']:.2f}"
          + "".join(f"  {k}={v}" for k, v in extra.items()), flush=True)


def stream_us(nbytes: int, gbs: float) -> float:
    """Microseconds to read `nbytes` once at `gbs` GB/s."""
    return nbytes / gbs / 1e3


# ---- .sp models -----------------------------------------------------------------------------------------
TWO_MATMULS = """model Small(x: f32[T, 32]) -> f32[T, 32] {
    param w: f32[32, 32]
    return relu(x @ w) @ w
}
"""

DECODE = """model Decode(q: f32[1, 8, 1, 64], k: f32[1, 8, S, 64], v: f32[1, 8, S, 64]) -> f32[1, 8, 1, 64] {
    return attention(q, k, v)
}
"""


def bench_two_matmuls() -> None:
    case = "relu(x @ w) @ w, x 16x32"
    m = sparsa.compile(TWO_MATMULS, target="cpu").init_weights(0)
    x = np.random.default_rng(0).standard_normal((16, 32), np.float32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(m.weights["w"]))
    row(case, "sparsa cpu", median_us(lambda: m(x)), native=m.native.main is not None)
    row(case, "torch eager", median_us(lambda: torch.relu(xt @ wt) @ wt))


def moe_decode(case: str, src: str, T: int, k: int, gbs: float) -> None:
    m = sparsa.compile(src, target="cpu").init_weights(0)
    w = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in m.weights.items()}
    x = torch.randn(T, w["gate"].shape[0])
    xn = x.numpy()
    args = (x, w["gate"], w["w1"], w["w3"], w["w2"], k)
    chosen = torch.topk(torch.softmax(x @ w["gate"], -1), k, -1).indices.unique().numel()
    per_expert = sum(w[n][0].numel() for n in ("w1", "w3", "w2")) * 4
    row(case, "sparsa cpu", median_us(lambda: m(xn)), native=m.native.main is not None)
    row(case, "eager HF loop", median_us(lambda: hf_loop(*args)))
    row(case, "eager sorted dispatch", median_us(lambda: sorted_dispatch(*args)))
    row(case, f"stream {chosen} experts' weights", stream_us(chosen * per_expert, gbs))
    print(f"{'':40s} {moe_error(m(xn), hf_loop(*args), x, w['gate'], k)}")


def sdpa(*args: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)


def bench_attention_decode(gbs: float) -> None:
    m = sparsa.compile(DECODE, target="cpu")
    for S in (4096, 16384, 32768):
        case = f"attention decode S={S} H=8 Dh=64"
        q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 8, S, 64), torch.randn(1, 8, S, 64)
        qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
        row(case, "sparsa cpu", median_us(lambda a=(qn, kn, vn): m(*a)), native=m.native.main is not None)
        row(case, "torch SDPA", median_us(lambda a=(q, k, v): sdpa(*a)))
        row(case, "stream K and V", stream_us(2 * k.numel() * 4, gbs))
        err = float((torch.from_numpy(m(qn, kn, vn)) - sdpa(q, k, v)).abs().max())
        print(f"{'':40s} max error vs SDPA {err:.1e}")


def bench_documents() -> None:
    """Packed documents, causal within each: the example's data mask against SDPA with the boolean mask (Flex
    compiles too slowly for a small call to matter)."""
    m = sparsa.compile((EXAMPLES / "document_attention.sp").read_text(), target="cpu")
    for S in (128, 512):
        case = f"documents S={S} H=8 Dh=64, 6 docs"
        q, k, v = torch.randn(1, 8, S, 64), torch.randn(1, 8, S, 64), torch.randn(1, 8, S, 64)
        doc = torch.repeat_interleave(torch.arange(6, dtype=torch.int32), -(-S // 6))[:S]
        mask = (doc[:, None] == doc[None, :]) & torch.ones(S, S, dtype=torch.bool).tril()
        a = (q.numpy(), k.numpy(), v.numpy(), doc.numpy())
        row(case, "sparsa cpu (with its block map)", median_us(lambda a=a: m(*a)), native=m.native.main is not None)
        row(case, "torch SDPA boolean mask", median_us(lambda a=(q, k, v, mask): sdpa(*a[:3], attn_mask=a[3])))
        err = float((torch.from_numpy(m(*a)) - sdpa(q, k, v, attn_mask=mask)).abs().max())
        print(f"{'':40s} max error vs SDPA {err:.1e}")


# ---- tiny transformers models under torch.compile -------------------------------------------------------
def tiny_models() -> dict[str, Callable[[], Any]]:
    import transformers

    small = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}
    return {
        "Mixtral (MoE)": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **small)),
        "Qwen3-MoE (MoE)": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=False, head_dim=8, **small)),
        "Mistral (sliding window)": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
            intermediate_size=64, sliding_window=8, **small)),
        "Mamba (state space)": lambda: transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=4, expand=2, conv_kernel=4,
            use_mambapy=False)),
    }


def bench_tiny_models() -> None:
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.set_num_threads(1)
    os.environ["SPARSA_NUM_THREADS"] = "1"
    ratios = []
    for name, make in tiny_models().items():
        torch.manual_seed(0)
        model = make().eval()
        ids = torch.randint(0, 64, (1, 16))
        backend = SparsaBackend({"target": "cpu"})
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            compiled(ids)
            eager = median_us(lambda f=model, a=ids: f(a))
            ours = median_us(lambda f=compiled, a=ids: f(a))
        case = f"{name} 1x16, one thread"
        row(case, "torch eager", eager)
        row(case, 'torch.compile(backend="sparsa")', ours, vs_eager=round(eager / ours, 2),
            fallbacks=sum(backend.fallbacks.values()))
        ratios.append(eager / ours)
        torch._dynamo.reset()
    print(f"{'geometric mean vs eager':71s} {math.exp(sum(map(math.log, ratios)) / len(ratios)):10.2f}x")
    torch.set_num_threads(2)
    os.environ["SPARSA_NUM_THREADS"] = "2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose group contains this (matmul, moe, "
                        "decode, documents, models)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ["SPARSA_NUM_THREADS"] = "2"
    header = machine_header()
    gbs = header["copy_gbs"]
    groups = {
        "matmul": bench_two_matmuls,
        "moe decode": lambda: (
            moe_decode("MoE decode T=4 D=64 F=128 E=8 k=2", MOE.format(D=64, F=128, E=8, K=2), 4, 2, gbs),
            moe_decode("mixtral_moe.sp T=8", (EXAMPLES / "mixtral_moe.sp").read_text(), 8, 2, gbs)),
        "attention decode": lambda: bench_attention_decode(gbs),
        "documents": bench_documents,
        "tiny models": bench_tiny_models,
    }
    for name, run in groups.items():
        if args.only in name:
            run()
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": header, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
