"""Property tests: recognize-attention, fuse-scan and lower-sparse-weights on generated programs give
the same results as the programs run as written."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsa

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MASKS = ["ki <= qi", "qi - ki < W", "(ki <= qi) and (qi - ki < W)", "abs(qi - ki) <= W", "(qi // W) == (ki // W)",
         "ki > qi - W"]


@SETTINGS
@given(st.sampled_from(MASKS), st.integers(1, 5), st.integers(2, 12), st.sampled_from(["where", "fill", "bias"]),
       st.sampled_from(["after", "before", "none"]), st.booleans(), st.integers(0, 99))
def test_recognized_attention_matches_hand_written(mask, W, S, form, scale_at, softcap, seed):
    m = mask.replace("W", str(W))
    s = "q @ transpose(k, [0, 1, 3, 2])"
    if scale_at == "after":
        s = f"({s}) * 0.25"
    elif scale_at == "before":
        s = "(q * 0.25) @ transpose(k, [0, 1, 3, 2])"
    if softcap:
        s = f"5.0 * tanh(({s}) / 5.0)"
    masked = {"where": f"where({m}, s, -inf)", "fill": f"where(not ({m}), -1e9, s)",
              "bias": f"s + where({m}, 0.0, -inf)"}[form]
    src = f"""
model A(q: f32[1, 2, {S}, 4], k: f32[1, 2, {S}, 4], v: f32[1, 2, {S}, 4]) -> f32[1, 2, {S}, 4] {{
    qi = iota({S})[:, None]
    ki = iota({S})[None, :]
    s = {s}
    return softmax({masked}, axis=-1) @ v
}}
"""
    plain = sparsa.compile(src, passes="canonicalize", target="reference")
    fused = sparsa.compile(src, passes="canonicalize,recognize-attention,sparsify-attention{block_q=2 block_k=3},dce", target="reference")
    assert "tensor.softmax" not in fused.ir()
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 2, S, 4)).astype(np.float32) for _ in range(3))
    want = plain(q, k, v)
    got = fused(q, k, v)
    rows = ~np.isnan(want).any(axis=-1) & (np.abs(want).sum(-1) > 0)
    np.testing.assert_allclose(got[rows], want[rows], rtol=1e-4, atol=1e-5)  # all-masked rows: NaN vs 0


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 4), st.integers(1, 3), st.booleans(), st.integers(0, 99))
def test_fused_scan_matches_scan(B, L, D, N, keepdim, seed):
    src = f"""
model M(a: f32[B, L, D], u: f32[B, L, D], bm: f32[B, L, N], c: f32[B, L, N]) -> f32[B, L, D{', 1' if keepdim else ''}] {{
    h = scan(exp(-abs(a))[:, :, :, None] * ones([N]), (u * a)[:, :, :, None] * bm[:, :, None, :], axis=1)
    return sum(h * c[:, :, None, :], axis=-1{', keepdim=true' if keepdim else ''})
}}
"""
    plain = sparsa.compile(src, passes="canonicalize", target="reference")
    fused = sparsa.compile(src, passes="canonicalize,fuse-scan,dce", target="reference")
    assert "scan.fused" in fused.ir()
    rng = np.random.default_rng(seed)
    ins = [rng.standard_normal(s).astype(np.float32) for s in [(B, L, D), (B, L, D), (B, L, N), (B, L, N)]]
    np.testing.assert_allclose(fused(*ins), plain(*ins), rtol=1e-5, atol=1e-5)


TRANSPOSED_READOUT = """
model M(a: f32[B, D, L], u: f32[B, D, L], bm: f32[B, L, N], c: f32[B, L, N]) -> f32[B, L, D{keep}] {{
    h = scan(exp(-abs(a))[:, :, :, None] * ones([N]), (u * a)[:, :, :, None] * bm[:, None, :, :], axis=2)
    return sum(transpose(h, [0, 2, 1, 3]) * c[:, :, None, :], axis=-1{keepdim})
}}
"""


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.booleans(), st.integers(0, 99))
def test_scans_read_through_a_transpose_fuse_in_its_frame(B, L, D, N, keepdim, seed):
    """A scan whose reader transposes it (Mamba's in transformers: its state [B, D, L, N], read as [B, L, D, N])
    is made in the transposed frame (its producers built again there) and fused with the read-out (summed with or
    without keepdim): the same values as the program as written."""
    src = TRANSPOSED_READOUT.format(keep=", 1" if keepdim else "", keepdim=", keepdim=true" if keepdim else "")
    plain = sparsa.compile(src, passes="canonicalize", target="reference")
    fused = sparsa.compile(src, passes="canonicalize,fuse-scan,cse,dce", target="reference")
    assert "scan.fused" in fused.ir() and "scan.scan" not in fused.ir()
    rng = np.random.default_rng(seed)
    ins = [rng.standard_normal(s).astype(np.float32) for s in [(B, D, L), (B, D, L), (B, L, N), (B, L, N)]]
    np.testing.assert_allclose(fused(*ins), plain(*ins), rtol=1e-5, atol=1e-5)


EPILOGUES = ["y + d * u", "y * silu(z)", "relu(y + 0.5) * z", "where(z > 0.0, y, d * u)", "(y + d * u) * sigmoid(z)"]


@SETTINGS
@given(st.sampled_from(EPILOGUES), st.sampled_from(["last", "middle", "keepdim"]), st.integers(1, 2),
       st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(0, 99))
def test_scan_epilogues_join_the_consumer(epilogue, layout, B, L, D, N, seed):
    """fuse-scan-epilogue on a fused scan's result (summed over its last state dim, over one before the channels,
    or kept as a size-1 dim) read by elementwise ops of inputs of any rank: one scan.fused, nothing after it,
    the same values as the program run as written."""
    if layout == "middle":  # the state [B, L, N, D], summed over N
        scan = ("scan(exp(-abs(a))[:, :, None, :] * ones([N, 1]), (u * a)[:, :, None, :] * bm[:, :, :, None], "
                "axis=1)")
        y, d_type, out = "sum(h * c[:, :, :, None], axis=2)", "f32[D]", "f32[B, L, D]"
    else:
        scan = "scan(exp(-abs(a))[:, :, :, None] * ones([N]), (u * a)[:, :, :, None] * bm[:, :, None, :], axis=1)"
        keep = layout == "keepdim"
        y = f"sum(h * c[:, :, None, :], axis=-1{', keepdim=true' if keep else ''})"
        d_type, out = ("f32[D, 1]", "f32[B, L, D, 1]") if keep else ("f32[D]", "f32[B, L, D]")
        if keep:
            epilogue = epilogue.replace("* u", "* u[:, :, :, None]").replace("(z", "(z[:, :, :, None]").replace(
                "* z", "* z[:, :, :, None]")
    src = f"""
model M(a: f32[B, L, D], u: f32[B, L, D], bm: f32[B, L, N], c: f32[B, L, N], d: {d_type}, z: f32[B, L, D]) -> {out} {{
    h = {scan}
    y = {y}
    return {epilogue}
}}
"""
    plain = sparsa.compile(src, passes="canonicalize", target="reference")
    fused = sparsa.compile(src, passes="canonicalize,fuse-scan,fuse-scan-epilogue,cse,dce", target="reference")
    body = fused.module.funcs[-1].regions[0].block.ops
    assert [o.NAME for o in body if o.NAME not in ("tensor.expand_dims", "tensor.constant")][-2:] == [
        "scan.fused", "func.return"], fused.ir()
    rng = np.random.default_rng(seed)
    ins = [rng.standard_normal(s).astype(np.float32) for s in
           [(B, L, D), (B, L, D), (B, L, N), (B, L, N), (D, 1) if layout == "keepdim" else (D,), (B, L, D)]]
    np.testing.assert_allclose(fused(*ins), plain(*ins), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.sampled_from([(4, 4), (2, 8), (8, 2)]), st.sampled_from([(1, 2), (2, 4), (1, 4)]),
       st.floats(0.0, 1.0), st.integers(1, 5), st.integers(0, 99))
def test_packed_weights_match_dense(bsr, nm, density, T, seed):
    src = f"""
model M(x: f32[T, 16]) -> f32[T, 8] {{
    param up: f32[16, 32] sparse bsr({bsr[0]}, {bsr[1]})
    param down: f32[32, 8] sparse nm({nm[0]}, {nm[1]})
    return gelu(x @ up) @ down
}}
"""
    rng = np.random.default_rng(seed)
    blocks = rng.random((16 // bsr[0], 32 // bsr[1])) < density
    up = (np.kron(blocks, np.ones(bsr)) * rng.standard_normal((16, 32))).astype(np.float32)
    weights = {"up": up, "down": rng.standard_normal((32, 8)).astype(np.float32)}
    packed = sparsa.compile(src, target="reference").load_weights(weights, prune=True)
    plain = sparsa.compile(src, passes="canonicalize", target="reference").load_weights(weights, prune=True)
    assert "sparse.bsr_matmul" in packed.ir() and "sparse.nm_matmul" in packed.ir()
    x = rng.standard_normal((T, 16)).astype(np.float32)
    np.testing.assert_allclose(packed(x), plain(x), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3), st.integers(1, 5),
       st.sampled_from(["sigmoid", "signed"]), st.integers(0, 99))
def test_chunked_linear_attention_matches_the_scan(B, L, Dk, Dv, chunk, decay, seed):
    gate = "sigmoid(g)" if decay == "sigmoid" else "g"
    src = f"""
model LA(q: f32[B, L, {Dk}], k: f32[B, L, {Dk}], v: f32[B, L, {Dv}], g: f32[B, L]) -> f32[B, L, {Dv}] {{
    h = scan({gate}[:, :, None, None], k[:, :, :, None] * v[:, :, None, :], axis=1)
    return sum(h * q[:, :, :, None], axis=-2)
}}
"""
    plain = sparsa.compile(src, passes="canonicalize", target="reference")
    chunked = sparsa.compile(src, passes=f"canonicalize,fuse-scan{{chunk={chunk}}},dce", target="reference")
    assert "scan.linear_attention" in chunked.ir() and "scan.scan" not in chunked.ir()
    rng = np.random.default_rng(seed)
    ins = [rng.standard_normal(s).astype(np.float32) for s in [(B, L, Dk), (B, L, Dk), (B, L, Dv), (B, L)]]
    np.testing.assert_allclose(chunked(*ins), plain(*ins), rtol=1e-4, atol=1e-5)


def _parts(*parts: tuple[str, int]) -> str:
    """concat of the non-empty parts, each (expression, rows)."""
    kept = [e for e, n in parts if n > 0]
    return kept[0] if len(kept) == 1 else f"concat([{', '.join(kept)}], axis=0)"


@SETTINGS
@given(st.integers(1, 6), st.lists(st.tuples(st.sampled_from(["write", "add", "slice"]), st.integers(0, 5),
                                             st.integers(0, 5)), min_size=1, max_size=6), st.integers(0, 99))
def test_canonicalized_slices_and_concats_match(n, steps, seed):
    """A random loop of chunk writes (slice_scatter's concat of slices around a chunk), padded chunks added to a
    running sum and slices padded back (AddConcats, SliceOfConcat, FlattenConcats, SplatView) gives what the
    program as written gives."""
    lines = [f"cur = zeros([{n}, 3])"]
    for kind, i, j in steps:
        lo, hi = sorted((i % n, j % n + 1))
        if kind == "write":
            chunk = _parts((f"cur[:{lo}]", lo), (f"x[{lo}:{lo + 1}] * 2.0", 1), (f"cur[{lo + 1}:]", n - lo - 1))
            lines.append(f"cur = {chunk}")
        elif kind == "add":
            padded = _parts((f"zeros([{lo}, 3])", lo), (f"x[{lo}:{hi}] + cur[{lo}:{hi}]", hi - lo),
                            (f"zeros([{n - hi}, 3])", n - hi))
            lines.append(f"cur = cur + {padded}")
        else:
            kept = _parts((f"zeros([{lo}, 3])", lo), (f"cur[{lo}:{hi}]", hi - lo), (f"zeros([{n - hi}, 3])", n - hi))
            lines.append(f"cur = {kept}")
    body = "\n    ".join(lines)
    src = f"model M(x: f32[{n}, 3]) -> f32[{n}, 3] {{\n    {body}\n    return cur\n}}\n"
    x = np.random.default_rng(seed).standard_normal((n, 3)).astype(np.float32)
    plain = sparsa.compile(src, passes="dce", target="reference")
    canonical = sparsa.compile(src, passes="canonicalize", target="reference")
    np.testing.assert_allclose(canonical(x), plain(x), rtol=1e-6, atol=1e-6, err_msg=src)
    ops = list(canonical.module.funcs[-1].walk())
    assert not [op for op in ops if op.NAME == "tensor.add" and all(v.defining_op is not None and v.defining_op.NAME
                                                                     == "tensor.concat" for v in op.operands)], src
