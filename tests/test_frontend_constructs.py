"""Language constructs beyond the examples, each compiled and compared with NumPy."""

from __future__ import annotations

import numpy as np
import pytest

import sparsa

rng = np.random.default_rng(11)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def attention(q, k, v, allowed, scale, score=None):
    s = scale * (q.astype(np.float64) @ np.swapaxes(k, -1, -2))
    s = score(s) if score else s
    s = np.where(allowed, s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    p = np.where(allowed, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    d = p.sum(-1, keepdims=True)
    return np.where(d > 0, (p @ v) / np.where(d > 0, d, 1), 0)


def test_four_index_mask_table_mask_and_score_with_data():
    src = """
mask per_head(b, h, q, k) = k <= q + h
mask blocky(q, k; table: bool[NB, NB]) = table[q // 4, k // 4] and not (q == 0 and k > 0)
score biased(s, q, k; bias: f32[W]) = s + bias[min(max(q - k, 0), 7)]
model M(q: f32[1, 2, S, 8], table: bool[NB, NB], bias: f32[W]) -> (f32[1, 2, S, 8], f32[1, 2, S, 8]) {
    a = attention(q, q, q, mask=per_head)
    b = attention(q, q, q, mask=blocky(table=table), score=biased(bias=bias), scale=0.5)
    return a, b
}
"""
    m = sparsa.compile(src, target="reference")
    S = 12
    q, table, bias = randn(1, 2, S, 8), rng.random((3, 3)) > 0.4, randn(8)
    a, b = m(q, table, bias)
    qi, ki, hi = np.arange(S)[:, None], np.arange(S)[None, :], np.arange(2)[:, None, None]
    np.testing.assert_allclose(a, attention(q, q, q, ki <= qi + hi, 1 / np.sqrt(8)), rtol=1e-5, atol=1e-6)
    allowed = table[qi // 4, ki // 4] & ~((qi == 0) & (ki > 0))
    expected = attention(q, q, q, allowed, 0.5, score=lambda s: s + bias[np.clip(qi - ki, 0, 7)])
    np.testing.assert_allclose(b, expected, rtol=1e-5, atol=1e-6)


def test_lambda_mask_captures_model_tensors_and_score_lambda():
    src = """
model M(q: f32[1, 1, S, 4], ids: i32[S]) -> f32[1, 1, S, 4] {
    return attention(q, q, q, mask=|q, k| ids[q] == ids[k], score=|s, q, k| s * 2.0)
}
"""
    S = 9
    q, ids = randn(1, 1, S, 4), rng.integers(0, 3, S).astype(np.int32)
    got = sparsa.compile(src, target="reference")(q, ids)
    np.testing.assert_allclose(got, attention(q, q, q, ids[:, None] == ids[None, :], 0.5, lambda s: 2 * s),
                               rtol=1e-5, atol=1e-6)


def test_shape_builtins_indexing_and_multiple_results():
    src = """
const N = 3
model Parts(x: f32[T, 6]) -> (f32[T, 2], f32[T, 4]) {
    a, b = split(x, [2, 4], axis=-1)
    return a, b
}
model M(x: f32[T, 6]) -> (f32[T, 6], f32[6], i64[T], f32[T, 6], f32[6, T], f32[N, 2]) {
    a, b = Parts(x)
    joined = concat([b, a], axis=1)
    last = x[-1]
    firsts = argmax(cumsum(x, axis=-1), axis=-1)
    normed = layernorm(x, ones([6]), zeros([6]), eps=1e-5) + full([6], 0.5) * cast(iota(6), f32)
    flipped = x.T[::-1, :]
    corner = x[0:N, None, 1:3][:, 0] ** 2 // 1.0
    return joined, last, firsts, normed, flipped, corner
}
"""
    x = randn(5, 6)
    joined, last, firsts, normed, flipped, corner = sparsa.compile(src, target="reference")(x)
    np.testing.assert_array_equal(joined, np.concatenate([x[:, 2:], x[:, :2]], 1))
    np.testing.assert_array_equal(last, x[-1])
    np.testing.assert_array_equal(firsts, np.argmax(np.cumsum(x, -1), -1))
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(normed, (x - mu) / np.sqrt(var + 1e-5) + 0.5 * np.arange(6), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(flipped, x.T[::-1, :])
    np.testing.assert_array_equal(corner, np.floor_divide(x[0:3, 1:3] ** 2, 1.0))


def test_integer_semantics_follow_python():
    src = """
model M(a: i32[4], b: i64[4]) -> (i64[4], i64[4], f32[4], bool[4]) {
    return a // b, a % b, a / b, (a > 0) and not (b == 2)
}
"""
    a, b = np.array([7, -7, 7, -7], np.int32), np.array([2, 2, -2, -2], np.int64)
    fd, md, td, lg = sparsa.compile(src, target="reference")(a, b)
    assert fd.dtype == np.int64 and list(fd) == [7 // 2, -7 // 2, 7 // -2, -7 // -2]
    assert list(md) == [7 % 2, -7 % 2, 7 % -2, -7 % -2]
    np.testing.assert_allclose(td, a / b)
    assert list(lg) == [False, False, True, False]


def test_for_loop_instances_have_their_own_weights_and_calls_share_instance_zero():
    src = """
model Block(x: f32[T, 4]) -> f32[T, 4] {
    param w: f32[4, 4]
    return x @ w
}
model M(x: f32[T, 4]) -> f32[T, 4] {
    for i in 0..3 { x = x + Block[i](x) }
    return Block(x) + Block(x)
}
"""
    m = sparsa.compile(src, target="reference").init_weights(1)
    assert sorted(m.weights) == ["Block.0.w", "Block.1.w", "Block.2.w"]
    w = m.weights
    x = randn(2, 4)
    y = x.astype(np.float64)
    for i in range(3):
        y = y + y @ w[f"Block.{i}.w"]
    np.testing.assert_allclose(m(x), 2 * (y @ w["Block.0.w"]), rtol=1e-5)


def test_moe_body_with_assignments_and_explicit_experts():
    src = """
model M(x: f32[T, 4], idx: i64[T, 2], g: f32[T, 2]) -> f32[T, 4] {
    param w: f32[3, 4, 4]
    a = moe(x, idx, g) |e, h| {
        u = relu(h @ w[e])
        u * 2.0
    }
    b = moe(x, idx, g, num_experts=3) |e, h| { h * 3.0 }
    return a + b
}
"""
    m = sparsa.compile(src, target="reference").init_weights(2)
    w = m.weights["w"]
    x, idx, g = randn(5, 4), rng.integers(0, 3, (5, 2)), randn(5, 2)
    want = np.zeros((5, 4))
    for t in range(5):
        for j in range(2):
            want[t] += g[t, j] * (2 * np.maximum(x[t] @ w[idx[t, j]], 0) + 3 * x[t])
    np.testing.assert_allclose(m(x, idx, g), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("src,fragment", [
    ("model M(x: f32[T, 4], i: i64[T, 1], g: f32[T, 1]) -> f32[T, 4] {\n return moe(x, i, g) |e, h| { h }\n}\n",
     "cannot tell the number of experts"),
    ("model M(x: f32[T, 4]) -> f32[T, 4] {\n for i in 0..2 { return x }\n}\n", "'return' inside a 'for' loop"),
    ("model M(x: f32[T, 4]) -> f32[T, 4] {\n a, b = x\n return x\n}\n", "cannot unpack one value into 2 names"),
    ("model M(x: f32[T, 4]) -> f32[T, 4] {\n return M(x)\n}\n", "model 'M' calls itself"),
    ("model M(x: f32[T, 4]) -> f32[T, 4] {\n return softmax(x, axis=2)\n}\n", "axis 2 is out of range"),
    ("model M(x: f32[T, 4]) -> f32[T, 4] {\n return reshape(x, [-1, -1])\n}\n", "at most one -1"),
])
def test_more_errors(src, fragment):
    with pytest.raises(sparsa.ir.SparsaError) as info:
        sparsa.compile(src, target="reference")
    assert fragment in str(info.value)
