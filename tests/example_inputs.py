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
