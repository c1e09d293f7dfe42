"""MoE gating and dispatch fusion: random routers, expert counts, capacities and block sizes give the
same result as the unfused moe; dispatch arithmetic matches brute force."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsa

ROUTERS = {
    "mixtral": "p = softmax(x @ gate)\n    w, idx = topk(p, k=K)\n    w = w / sum(w, axis=-1, keepdim=true)",
    "qwen": "l, idx = topk(x @ gate, k=K)\n    w = softmax(l)",
    "switch": "w, idx = topk(softmax(x @ gate), k=K)",
    "deepseek": ("s = sigmoid(x @ gate)\n    _, idx = topk(s + bias, k=K)\n    w = s[iota(T)[:, None], idx]\n"
                 "    w = w / sum(w, axis=-1, keepdim=true) * 1.5"),
    "grouped": ("s = sigmoid(x @ gate)\n    sel = s + bias\n    top, _ = topk(reshape(sel, [T, 2, E // 2]), k=1)\n"
                "    _, kept = topk(sum(top, axis=-1), k=1)\n"
                "    ok = sum(cast(kept[:, :, None] == (iota(E) // (E // 2))[None, None, :], f32), axis=1) > 0.0\n"
                "    _, idx = topk(where(ok, sel, -inf), k=K)\n    w = s[iota(T)[:, None], idx]"),
}
BODIES = {
    "swiglu": "(silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]",
    "relu": "relu(h @ w1[e]) @ w2[e]",
    "chain": "tanh((h @ w1[e]) @ w2[e] * 0.5)",
    "transposed": "silu(h @ w2[e].T) @ w1[e].T",  # weights stored [E, N, K], as PyTorch's are
    "sliced": "(relu(h @ w1[e][:, 1:4]) * (h @ w3[e][:, :3].T.T)) @ w2[e][1:4]",
    # expert vectors (GPT-OSS's biases): before the activation, after the last matmul, or both
    "biased": "(silu(h @ w1[e] + b1[e]) * (h @ w3[e] - b1[e])) @ w2[e] + b2[e]",
    "first bias": "tanh(h @ w1[e] + b1[e] * 0.5) @ w2[e]",  # b1[e] * 0.5: a vector op, on the rows' vectors
    "last bias": "relu(h @ w1[e]) @ w2[e] + b2[e]",
    "last bias inside": "relu(relu(h @ w1[e]) @ w2[e] + b2[e])",  # not p + b[e] after the combine: stays moe.moe
}


def program(router: str, body: str, E: int, K: int, capacity: float | None) -> str:
    cap = f", capacity={capacity}" if capacity else ""
    r = ROUTERS[router].replace("K)", f"{K})").replace("E // 2", str(E // 2)).replace("iota(E)", f"iota({E})")
    return f"""
const D = 6
const F = 5
model M(x: f32[T, D]) -> f32[T, D] {{
    param gate: f32[D, {E}]
    param bias: f32[{E}]
    param w1: f32[{E}, D, F]
    param w3: f32[{E}, D, F]
    param w2: f32[{E}, F, D]
    param b1: f32[{E}, F]
    param b2: f32[{E}, D]
    {r}
    y = moe(x, idx, w{cap}) |e, h| {{ {body} }}
    return y + 0.0 * bias[0]
}}
"""


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(ROUTERS)), st.sampled_from(sorted(BODIES)), st.integers(2, 6), st.integers(1, 3),
       st.integers(1, 9), st.sampled_from([None, 0.5, 1.0, 2.0]), st.sampled_from([1, 4, 64]), st.integers(0, 99))
def test_fused_moe_matches_unfused(router, body, E, K, T, capacity, block, seed):
    if router == "grouped":
        E, K = 2 * (E // 2 + 1), min(K, E // 2 + 1)  # two groups, top-k within the kept one
    K = min(K, E)
    src = program(router, BODIES[body], E, K, capacity)
    plain = sparsa.compile(src, passes="canonicalize", target="reference").init_weights(seed)
    fused = sparsa.compile(src, passes=f"canonicalize,fuse-moe-gating,fuse-moe-dispatch{{block={block}}},cse,dce", target="reference")
    fused.load_weights(plain.weights)
    ir = fused.ir()
    if body == "last bias inside":
        assert "moe.moe" in ir, ir
    else:
        assert "moe.route" in ir and "moe.dispatch" in ir and "moe.moe" not in ir, ir
    x = np.random.default_rng(seed).standard_normal((T, 6)).astype(np.float32)
    np.testing.assert_allclose(fused(x), plain(x), rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 3), st.integers(1, 5), st.sampled_from([None, 0.3, 1.0, 1.25]),
       st.integers(1, 5), st.integers(0, 99))
def test_dispatch_capacity_arithmetic_is_exact(T, K, E, capacity, block, seed):
    from sparsa.ir.dialects.moe import DispatchOp

    experts = np.random.default_rng(seed).integers(0, E, size=(T, K))
    op = DispatchOp.build(_value((T, K)), num_experts=E, block=block, capacity=capacity)
    perm, offsets = op.reference(None, experts)
    cap = T * K if capacity is None else math.ceil(capacity * T * K / E)
    for e in range(E):
        want = [t * K + j for t in range(T) for j in range(K) if experts[t, j] == e][:cap]
        seg = perm[offsets[e] : offsets[e + 1]]
        assert offsets[e] % block == 0 and list(seg[: len(want)]) == want and (seg[len(want):] == -1).all()
        assert len(seg) - len(want) < block


def _value(shape):
    from sparsa.ir import Block, TensorType

    return Block([TensorType("i64", shape)]).args[0]
