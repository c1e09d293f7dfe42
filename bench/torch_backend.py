"""torch.compile benchmark (not a test): eager vs Inductor vs backend="sparsa" on the same modules, in one
process, medians of timed runs after warm-up; compile times apart. Writes JSON with --json.

Usage: python bench/torch_backend.py [--device cpu|cuda] [--runs 5] [--only MoE] [--json out.json]
On CPU the backend's partitions run on the `cpu` target (native code through MLIR; SPARSA_NUM_THREADS=2
here) unless --target says otherwise; on CUDA they run on `triton`. The machine load (1-minute load
average, CPU) is recorded beside each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sparsa.runtime.torch_backend import SparsaBackend
from sparsa.runtime.torch_moe import swap_moe_blocks


class SlidingWindowSDPA(torch.nn.Module):
    """Attention with a causal sliding-window mask built from arange comparisons, as model code writes it."""

    def __init__(self, window: int = 256):
        super().__init__()
        self.window = window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        S = q.shape[2]
        i = torch.arange(S, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < self.window))


class MLP(torch.nn.Module):
    def __init__(self, d: int = 512, f: int = 2048):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, f), torch.nn.Linear(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Mamba(torch.nn.Module):
    """transformers' Mamba (2 layers, hidden 256, inner 512, state 16): compiled, its recurrence is torch's generic
    associative scan, which the backend folds into one scan (frontend/torch_scan.py)."""

    def __init__(self):
        super().__init__()
        import transformers

        self.model = transformers.MambaModel(transformers.MambaConfig(
            vocab_size=256, hidden_size=256, num_hidden_layers=2, state_size=16, expand=2, conv_kernel=4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).last_hidden_state


def hf_moe_block(d: int, f: int, e: int, k: int, experts: str = "grouped_mm") -> torch.nn.Module:
    """transformers' Mixtral MoE block (router + experts) at the given sizes, randomly initialised, with the
    experts implementation transformers uses in its models by default ("grouped_mm")."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    config._experts_implementation = experts
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=d**-0.5)
    return block


def nemotron_h_moe(d: int, f: int, e: int, k: int) -> torch.nn.Module:
    """transformers' NemotronH MoE block: ungated relu^2 experts (grouped_mm), sigmoid group routing, a shared
    expert; randomly initialised."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    config = NemotronHConfig(hidden_size=d, moe_intermediate_size=f, moe_shared_expert_intermediate_size=f,
                             n_routed_experts=e, num_experts_per_tok=k, n_group=1, topk_group=1)
    config._experts_implementation = "grouped_mm"
    block = NemotronHMoE(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=d**-0.5)
    return block


def gpt_oss_moe(d: int, f: int, e: int, k: int) -> torch.nn.Module:
    """transformers' GPT-OSS MoE block: interleaved gate/up experts with clamps and expert biases (grouped_mm), a
    softmax over the router's top-k logits; randomly initialised; its hidden states only."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = GptOssConfig(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    config._experts_implementation = "grouped_mm"
    block = GptOssMLP(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=d**-0.5)
    return _Holder(block, first=True)


class GatedDeltaNet(torch.nn.Module):
    """Projections into transformers' chunked gated delta rule (Qwen3-Next's and Qwen3.5's linear attention, as they
    run without flash-linear-attention): l2-normed q and k, sigmoid beta, a softplus log-decay, chunks of 64, each
    chunk's UT transform two unit lower triangular solves, then a Python loop over the chunks."""

    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.Linear(d, 3 * heads * head_dim)
        self.ab = torch.nn.Linear(d, 2 * heads)
        self.o = torch.nn.Linear(heads * head_dim, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).unbind(2)
        a, b = self.ab(x).view(B, S, 2, self.heads).unbind(2)
        out, _ = torch_chunk_gated_delta_rule(q, k, v, g=-F.softplus(a), beta=b.sigmoid(), chunk_size=64,
                                              use_qk_l2norm_in_kernel=True)
        return self.o(out.reshape(B, S, -1))


# transformers' experts implementations: "grouped_mm" (its default; sort, histc, grouped matmul) and
# "eager" (the classic loop over experts with nonzero, which graph-breaks)
FORMS = {"grouped_mm": "grouped_mm experts", "eager": "expert loop"}
# MoE blocks timed: Mixtral-like small and medium (8 experts, top-2) and fine-grained (64 experts, top-8,
# narrow experts, as OLMoE and Qwen-MoE use)
MOE_SIZES = [(1024, 512, 1024, 8, 2, ("grouped_mm", "eager")), (2048, 512, 256, 64, 8, ("grouped_mm", "eager")),
             (4096, 1024, 2816, 8, 2, ("grouped_mm",))]


def median_ms(fn: Callable[[], Any], runs: int, device: str) -> float:
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def case(name: str, make: Callable[[], torch.nn.Module], inputs: list[torch.Tensor], args: argparse.Namespace,
         swap: bool = False) -> dict:
    """One module: eager, torch.compile (Inductor), torch.compile(backend="sparsa") [after swap_moe_blocks]."""
    row: dict[str, Any] = {"case": name, "device": args.device, "load_1min": os.getloadavg()[0]}
    with torch.no_grad():
        eager = make().to(args.device).eval()
        want = eager(*inputs)
        row["eager_ms"] = median_ms(lambda: eager(*inputs), args.runs, args.device)
        variants = {"inductor": (eager, "inductor", None), "sparsa": (eager, None, {}),
                    "sparsa_freezing": (eager, None, {"freezing": True})}  # parameter-derived results kept
        if args.device == "cuda":  # kernels replayed from CUDA graphs (Inductor's counterpart: reduce-overhead)
            variants["inductor_graphs"] = (eager, "inductor", "reduce-overhead")
            variants["sparsa_graphs"] = (eager, None, {"cuda_graphs": True})
        if swap:  # the same weights, the MoE block replaced by a Sparsa-compiled one before torch.compile
            for label, freezing in (("sparsa_swapped", False), ("sparsa_swapped_freezing", True)):
                swapped = make().to(args.device).eval()
                swapped.load_state_dict(eager.state_dict())
                variants[label] = (_swapped_root(swapped, freezing), None, {})
        for label, (module, backend_name, kind) in variants.items():
            torch._dynamo.reset()
            backend = backend_name
            if isinstance(kind, dict):
                backend = SparsaBackend({**kind, **({"target": args.target} if args.target else {})})
                compiled = torch.compile(module, backend=backend)
            else:
                compiled = torch.compile(module, backend=backend, mode=kind)
            t = time.perf_counter()
            try:
                got = compiled(*inputs)
                row[f"{label}_compile_s"] = time.perf_counter() - t
                row[f"{label}_max_abs_err"] = float((got.float() - want.float()).abs().max())
                row[f"{label}_ms"] = median_ms(lambda c=compiled: c(*inputs), args.runs, args.device)
            except Exception as e:  # noqa: BLE001 - a compiler that fails on this module: say so, go on
                row[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                continue
            if isinstance(kind, dict):
                row[f"{label}_fallbacks"] = dict(backend.fallbacks)
            row[f"{label}_speedup_vs_eager"] = row["eager_ms"] / row[f"{label}_ms"]
        row["load_1min_after"] = os.getloadavg()[0]
    print(json.dumps(row), flush=True)
    return row


class _Holder(torch.nn.Module):
    """A parent for a bare MoE block, so that swap_moe_blocks can replace it; with `first`, of a block returning
    (hidden states, router scores), its hidden states alone."""

    def __init__(self, block: torch.nn.Module, first: bool = False):
        super().__init__()
        self.block, self.first = block, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y[0] if self.first else y


def _swapped_root(module: torch.nn.Module, freezing: bool) -> torch.nn.Module:
    holder = _Holder(module)
    swap_moe_blocks(holder, freezing=freezing)
    return holder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target", help="the backend's target (default: auto)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    parser.add_argument("--seq", type=int, default=1024, help="attention sequence length")
    parser.add_argument("--only", default="", help="run the cases whose name contains this (e.g. MoE, E=64)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
        os.environ.setdefault("SPARSA_NUM_THREADS", "2")
    torch.manual_seed(0)
    dev = args.device
    print(f"torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}")
    cases: list[tuple[str, Callable[[], torch.nn.Module], Callable[[], list[torch.Tensor]], bool]] = [
        (f"sliding-window SDPA S={args.seq} w=256", SlidingWindowSDPA,
         lambda: [torch.randn(1, 8, args.seq, 64, device=dev) for _ in range(3)], False),
        ("MLP 512-2048-512, 1024 tokens", MLP, lambda: [torch.randn(1024, 512, device=dev)], False),
        ("Mamba 2 layers D=512 N=16, 512 tokens", Mamba, lambda: [torch.randint(0, 256, (1, 512), device=dev)],
         False)]
    for T, D, hidden, E, k, forms in MOE_SIZES:
        for form in forms:
            cases.append((f"Mixtral MoE block ({FORMS[form]}) T={T} D={D} F={hidden} E={E} k={k}",
                          lambda D=D, f=hidden, E=E, k=k, form=form: hf_moe_block(D, f, E, k, experts=form),
                          lambda T=T, D=D: [torch.randn(1, T, D, device=dev)], True))
    cases.append(("NemotronH MoE block (relu^2 experts) T=1024 D=512 F=1024 E=8 k=2",
                  lambda: nemotron_h_moe(512, 1024, 8, 2), lambda: [torch.randn(1, 1024, 512, device=dev)], False))
    cases.append(("GPT-OSS MoE block (interleaved gate/up, biases) T=1024 D=512 F=1024 E=8 k=2",
                  lambda: gpt_oss_moe(512, 1024, 8, 2), lambda: [torch.randn(1, 1024, 512, device=dev)], False))
    cases.append(("gated delta net (Qwen3-Next chunked rule) S=1024 D=1024 H=8 Dh=128",
                  lambda: GatedDeltaNet(1024, 8, 128), lambda: [torch.randn(1, 1024, 1024, device=dev)], False))
    rows = [case(name, make, inputs(), args, swap=swap) for name, make, inputs, swap in cases
            if args.only.lower() in name.lower()]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
