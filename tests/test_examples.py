"""Every shared example compiles and runs on the reference target and matches NumPy written here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import sparsa

ROOT = Path(__file__).parent.parent
EXAMPLES = ROOT / "examples"
SHARED = ROOT.parent / "shared" / "examples"
rng = np.random.default_rng(7)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def silu(x):
    return x / (1 + np.exp(-x))


def rmsnorm(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def attention(q, k, v, allowed, scale, score=None):
    """Dense masked attention, written straight from the language spec; all-masked rows give zeros."""
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = scale * (q.astype(np.float64) @ np.swapaxes(k, -1, -2))
    if score is not None:
        s = score(s)
    s = np.where(allowed, s, -np.inf)
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for idx in np.ndindex(*q.shape[:3]):
        row = s[idx]
        if np.isfinite(row).any():
            p = np.exp(row - row[np.isfinite(row)].max())
            out[idx] = (p / p.sum()) @ v[idx[0], idx[1]]
    return out


def moe_reference(x, experts, gates, body, num_experts, capacity=None):
    T, K = experts.shape
    cap = math.ceil(capacity * T * K / num_experts) if capacity else T * K
    seen = [0] * num_experts
    y = np.zeros((T, body(0, x[:1]).shape[1]))
    for t in range(T):
        for j in range(K):
            e = int(experts[t, j])
            seen[e] += 1
            if seen[e] <= cap:
                y[t] += gates[t, j] * body(e, x[t : t + 1])[0]
    return y


def compiled(name):
    m = sparsa.compile(str(EXAMPLES / f"{name}.sp"), target="reference")
    m.init_weights(seed=3)
    return m, m.weights


def test_examples_are_in_sync_with_shared():
    if not SHARED.is_dir():
        pytest.skip("no ../shared/examples beside this checkout")
    shared = {p.name: p.read_text() for p in SHARED.glob("*.sp")}
    ours = {p.name: p.read_text() for p in EXAMPLES.glob("*.sp")}
    assert ours == shared


def test_mixtral_moe():
    m, w = compiled("mixtral_moe")
    x = randn(37, 512)
    y = m(x)
    probs = softmax(x @ w["gate"])
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
    weights = np.take_along_axis(probs, experts, -1)
    weights = weights / weights.sum(-1, keepdims=True)
    def body(e, h):
        return (silu(h @ w["w1"][e]) * (h @ w["w3"][e])) @ w["w2"][e]

    expected = moe_reference(x, experts, weights, body, 8)
    np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-4)
    assert m(randn(5, 512)).shape == (5, 512)  # a new token count needs no new compile


def test_switch_capacity_drops_tokens():
    m, w = compiled("switch_capacity")
    x = randn(40, 256)
    y = m(x)
    probs = softmax(x @ w["router"])
    expert = probs.argmax(-1)[:, None]
    p = np.take_along_axis(probs, expert, -1)
    expected = moe_reference(x, expert, p, lambda e, h: np.maximum(h @ w["wi"][e], 0) @ w["wo"][e], 16, 1.25)
    np.testing.assert_allclose(y, expected, rtol=2e-4, atol=2e-4)
    cap = math.ceil(1.25 * 40 / 16)
    dropped = sum(max(0, int((expert == e).sum()) - cap) for e in range(16))
    assert dropped == int((np.abs(y).sum(-1) == 0).sum())


def test_sliding_window_attention():
    m, w = compiled("sliding_window_attention")
    B, S = 2, 300
    x = randn(B, S, 512)
    y = m(x)
    q = (x @ w["wq"]).reshape(B, S, 8, 64).transpose(0, 2, 1, 3)
    k = (x @ w["wk"]).reshape(B, S, 2, 64).transpose(0, 2, 1, 3)
    v = (x @ w["wv"]).reshape(B, S, 2, 64).transpose(0, 2, 1, 3)
    qi, ki = np.arange(S)[:, None], np.arange(S)[None, :]
    o = attention(q, k, v, (ki <= qi) & (qi - ki < 256), 1 / 8)
    expected = o.transpose(0, 2, 1, 3).reshape(B, S, 512) @ w["wo"]
    np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-3)


def test_document_attention():
    m, _ = compiled("document_attention")
    H, S = 2, 50
    q, k, v = randn(1, H, S, 64), randn(1, H, S, 64), randn(1, H, S, 64)
    doc = np.sort(rng.integers(0, 4, size=S)).astype(np.int32)
    y = m(q, k, v, doc)
    allowed = (doc[:, None] == doc[None, :]) & (np.arange(S)[None, :] <= np.arange(S)[:, None])
    np.testing.assert_allclose(y, attention(q, k, v, allowed, 1 / 8), rtol=1e-4, atol=1e-5)


def test_longformer_attention():
    m, _ = compiled("longformer_attention")
    B, H, S = 1, 2, 300
    q, k, v = randn(B, H, S, 64), randn(B, H, S, 64), randn(B, H, S, 64)
    y = m(q, k, v)
    qi, ki = np.arange(S)[:, None], np.arange(S)[None, :]
    allowed = (np.abs(qi - ki) <= 128) | (qi < 16) | (ki < 16)
    expected = attention(q, k, v, allowed, 1 / 8, score=lambda s: 20.0 * np.tanh(s / 20.0))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_unfused_attention():
    m, _ = compiled("unfused_attention")
    q, k, v = randn(2, 3, 20, 64), randn(2, 3, 20, 64), randn(2, 3, 20, 64)
    allowed = np.arange(20)[None, :] <= np.arange(20)[:, None]
    np.testing.assert_allclose(m(q, k, v), attention(q, k, v, allowed, 0.125), rtol=1e-4, atol=1e-5)


def test_selective_scan():
    m, _ = compiled("selective_scan")
    B, L, DI, N = 2, 13, 6, 4
    u, delta = randn(B, L, DI), np.abs(randn(B, L, DI)) * 0.1
    A = -np.abs(randn(DI, N))
    Bs, C, Dskip = randn(B, L, N), randn(B, L, N), randn(DI)
    y = m(u, delta, A, Bs, C, Dskip)
    h = np.zeros((B, DI, N))
    expected = np.zeros((B, L, DI))
    for t in range(L):
        h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[:, :, None] * Bs[:, t, None, :]
        expected[:, t] = (h * C[:, t, None, :]).sum(-1) + Dskip * u[:, t]
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_sparse_ffn():
    m, w = compiled("sparse_ffn")
    up, down = w["w_up"], w["w_down"]
    blocks = (up.reshape(32, 32, 128, 32) != 0).any(axis=(1, 3))
    assert 0 < blocks.mean() < 0.5  # init keeps a fraction of the 32x32 blocks
    assert ((down.reshape(1024, 4, 1024) != 0).sum(1) <= 2).all()  # 2:4 down each column
    x = randn(9, 1024)
    np.testing.assert_allclose(m(x), np.maximum(x @ up, 0) @ down, rtol=1e-4, atol=1e-4)


def test_tiny_moe_decoder():
    m, w = compiled("tiny_moe_decoder")
    B, S = 2, 24
    tokens = rng.integers(0, 1024, size=(B, S)).astype(np.int32)
    y = m(tokens)
    x = w["embed"][tokens].astype(np.float64)
    qi, ki = np.arange(S)[:, None], np.arange(S)[None, :]
    for i in range(4):
        p = f"Layer.{i}."
        h = rmsnorm(x, w[p + "attn_norm"])
        qkv = (h @ w[p + "Attention.0.wqkv"]).reshape(B, S, 12, 64)
        q, k, v = (qkv[:, :, j * 4 : (j + 1) * 4].transpose(0, 2, 1, 3) for j in range(3))
        o = attention(q, k, v, (ki <= qi) & (qi - ki < 128), 1 / 8)
        x = x + o.transpose(0, 2, 1, 3).reshape(B, S, 256) @ w[p + "Attention.0.wo"]
        h = rmsnorm(x, w[p + "ffn_norm"]).reshape(B * S, 256)
        g = p + "MoE.0."
        probs = softmax(h @ w[g + "gate"])
        experts = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
        gw = np.take_along_axis(probs, experts, -1)
        gw = gw / gw.sum(-1, keepdims=True)
        body = lambda e, r, g=g: (silu(r @ w[g + "w1"][e]) * (r @ w[g + "w3"][e])) @ w[g + "w2"][e]  # noqa: E731
        x = x + moe_reference(h, experts, gw, body, 8).reshape(B, S, 256)
    expected = rmsnorm(x, w["final_norm"]) @ w["embed"].T
    np.testing.assert_allclose(y, expected, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.sp")), ids=lambda p: p.stem)
def test_every_example_compiles_and_round_trips(path):
    m = sparsa.compile(str(path), target="reference")
    from sparsa.ir import parse_module, print_module

    text = m.ir()
    assert print_module(parse_module(text)) == text
    assert "loc(" in text
