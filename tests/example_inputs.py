"""Random inputs for a compiled model, shared by the target tests: float tensors from a normal distribution,
boolean masks, and small sorted integer ids (document ids), symbolic dims from SIZES."""

from __future__ import annotations

import numpy as np

SIZES = {"B": 2, "H": 2, "S": 80, "T": 37, "L": 12, "DI": 16, "N": 8, "R": 7}


def make_inputs(model, seed=0, sizes=SIZES):
    rng = np.random.default_rng(seed)
    out = []
    for t in model.input_types:
        shape = [sizes.get(d, d) if isinstance(d, str) else d for d in t.shape]
        if t.dtype.startswith("f"):
            out.append(rng.standard_normal(shape).astype(np.float32))
        elif t.dtype == "i1":
            out.append(rng.random(shape) > 0.5)
        else:  # document ids / token ids: small, sorted
            out.append(np.sort(rng.integers(0, 3, shape)).astype(np.int32))
    return out


# Small BSR blocks (8x16) and N:M 2:4 weights: the sparse-weight kernels of every target.
SPARSE_WEIGHTS = """
model M(x: f32[T, 64]) -> f32[T, 48] {
    param a: f32[64, 64] sparse bsr(8, 16)
    param b: f32[64, 48] sparse nm(2, 4)
    return relu(x @ a) @ b
}
"""

# Most dense ops in one program: elementwise, reductions, norms, casts, argmax, cumsum, logsumexp.
OPS = """
model M(x: f32[R, 24], y: f32[24], z: f32[R, 1], m: bool[R, 24], i: i32[R, 24]) -> f32[R, 24] {
    a = silu(x) * y + exp(-abs(z)) - x / 3.0
    b = where(m, a, relu(x) ** 2.0)
    c = b + softmax(a, axis=0) + cumsum(x, axis=1)
    d = c - mean(c, axis=1, keepdim=true) + logsumexp(c, axis=1, keepdim=true) * 0.5
    e = d + max(x, axis=0, keepdim=true) - min(x, axis=1, keepdim=true) + cast(argmax(x, axis=1), f32)[:, None]
    f = e + cast(i % 5, f32) - cast(i // 3, f32) + sum(cast(m and not (i > 1), f32), axis=1, keepdim=true)
    return rmsnorm(f, y) + layernorm(f, y, y) + sigmoid(tanh(f)) + sqrt(abs(f)) + min(f, 0.5) + gelu_tanh(f)
}
"""

# Layout ops, matmuls of every rank, gather, concat, split, topk.
SHAPES = """
model M(x: f32[R, 6, 16], w: f32[16, 32], v: f32[32], idx: i32[5]) -> f32[R, 32] {
    t = transpose(x, [1, 0, 2])
    u = reshape(t, [6 * R, 16]) @ w
    p, q = split(u, [16, 16], axis=1)
    c = concat([q, p], axis=1) + v
    g = c[idx]
    s = c[0:R]
    k, j = topk(s, k=3)
    bmm = x[:, 0:1, :] @ transpose(x, [0, 2, 1])
    return s + g[0:1, :] * sum(k, axis=[0, 1]) + sum(sum(bmm, axis=2), axis=1, keepdim=true) + gelu(v @ w.T @ w) + cast(j[:, 0:1], f32)
}
"""

# A matrix-state scan (gated linear attention); DECAY is replaced by the decay expression.
LINEAR_ATTENTION = """
model LA(q: f32[B, L, 12], k: f32[B, L, 12], v: f32[B, L, 20], g: f32[B, L]) -> f32[B, L, 20] {
    h = scan(DECAY[:, :, None, None], k[:, :, :, None] * v[:, :, None, :], axis=1)
    return sum(h * q[:, :, :, None], axis=-2)
}
"""
