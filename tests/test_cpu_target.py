"""target="cpu": every shared example, each MoE router family, block-sparse attention, the fused scan and the
sparse weight kernels against the reference interpreter; odd sizes (tails past every tile, one token, experts
with no tokens, fully masked rows); the same results on one thread and on several."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch_mlir")

from example_inputs import LINEAR_ATTENTION, OPS, SHAPES, SIZES, SPARSE_WEIGHTS, make_inputs  # noqa: E402, F401

import sparsa  # noqa: E402
from sparsa.ir.diagnostics import SparsaError  # noqa: E402

ROOT = Path(__file__).parent.parent
TOL = 1e-4


def close(got, want, tol=TOL):
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    for g, w in zip(got, want, strict=True):
        finite = np.abs(w[np.isfinite(w)])
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        np.testing.assert_allclose(np.asarray(g, dtype=np.float64), w.astype(np.float64), rtol=tol, atol=tol * scale)


def pair(src, model=None, seed=0):
    ref = sparsa.compile(src, model=model, target="reference").init_weights(seed)
    cpu = sparsa.compile(src, model=model, target="cpu").init_weights(seed)
    return ref, cpu


EXAMPLES = [(p.name, None) for p in sorted((ROOT / "examples").glob("*.sp")) if p.name != "tiny_moe_decoder.sp"]
EXAMPLES += [("tiny_moe_decoder.sp", m) for m in ("Attention", "MoE")]


@pytest.mark.parametrize(("example", "model"), EXAMPLES)
def test_example_matches_reference(example, model):
    ref, cpu = pair(str(ROOT / "examples" / example), model)
    inputs = make_inputs(ref)
    close(cpu(*inputs), ref(*inputs))
    assert "llvm.func" in cpu.stage("llvm")


def check(src, inputs=None, passes=None, sizes=SIZES):
    kw = {"passes": passes} if passes else {}
    ref = sparsa.compile(src, target="reference", **kw).init_weights(0)
    cpu = sparsa.compile(src, target="cpu", **kw).init_weights(0)
    inputs = make_inputs(ref, sizes=sizes) if inputs is None else inputs
    close(cpu(*inputs), ref(*inputs))
    return cpu


def test_dense_ops_reductions_norms_casts_cumsum():
    check(OPS)


def test_layout_ops_matmuls_of_every_rank_gather_concat_topk():
    inputs = make_inputs(sparsa.compile(SHAPES, target="reference"))
    inputs[3] = np.array([0, 3, 7, -1, 2], dtype=np.int32)  # a negative index counts from the end
    check(SHAPES, inputs)
    inputs[3] = np.array([0, 3, 42, -1, 2], dtype=np.int32)
    with pytest.raises(SparsaError, match=r"<source>:7:\d+: .*index 42 is out of range for axis 0 of size 42"):
        sparsa.compile(SHAPES, target="cpu")(*inputs)


INTERLEAVE = """
model M(a: f32[R, 3, 1], b: f32[R, 3, 2], i: i64[R, 2], j: i64[R, 2], m: bool[R, 1]) -> (f32[R, 3, 3], i64[R, 2, 2], bool[R, 2], f32[R, 1, 4], f32[R, 3, 5], f32[R, 3, 1]) {
    u = concat([a[:, 0:1, :], a[:, 2:3, :], b[:, 1:2, :]], axis=2)
    return concat([a, b], axis=2), concat([i[:, :, None], j[:, :, None]], axis=2), concat([m, m], axis=1), u, concat([b, b, a], axis=2), concat([a, b[:, :, 0:0]], axis=2)
}
"""


@pytest.mark.parametrize("target", ["cpu", "cpu:x86-64-v3", "cpu:x86-64"])
@pytest.mark.parametrize("rows", [1, 6, 37])
def test_concat_of_short_runs_interleaves_vectors(rows, target, monkeypatch):
    """Concats whose inputs give a few static elements per index of the dims before the axis (runs of 1-4:
    stacking on a new last axis, an interleaved gate_up's gradient) join vectors in registers, the outer dims
    shared between 3 threads in contiguous parts, the rest an element at a time; floats and integers (bools
    stay scalar), a run of 5 and an empty input copied as before; in AVX-512, AVX2 and SSE code, exactly the
    reference."""
    from sparsa.backends.cpu import host
    from sparsa.backends.cpu.target import named_target

    if ":" in target and named_target(target.split(":")[1]).why_not_here() is not None:
        pytest.skip(f"{target} does not run here")
    monkeypatch.setenv("SPARSA_NUM_THREADS", "3")
    monkeypatch.setattr(host, "NATIVE_SPLIT_WORK", 0)  # split however small
    ref = sparsa.compile(INTERLEAVE, target="reference")
    cpu = sparsa.compile(INTERLEAVE, target=target)
    assert cpu.native.stages["loops"].count("vector.shuffle") >= 4
    inputs = make_inputs(ref, sizes={**SIZES, "R": rows})
    for got, want in zip(cpu(*inputs), ref(*inputs), strict=True):
        np.testing.assert_array_equal(got, want)


BOOLS_AND_NARROW = """
model M(x: f32[R, 64], y: f32[R, 3], g: f32[64, {n}], m: bool[R, 64]) -> (bool[R, 64], f32[R, 64], f32[R, {n}], f32[R, 3], bool[R, 3]) {{
    p = softmax(x @ g, axis=-1)
    return x > 0.0, where(m, x, 0.0), p, exp(y) + 1.0, y < 0.0
}}
"""


@pytest.mark.parametrize("n", [1, 5, 8, 31, 33])
def test_bool_tiles_and_narrow_last_dims(n):
    """bool results and operands a full vector wide (a vector of i1 is stored bit-packed: these stay scalar
    loops); a last dim narrower than a tile (a router's few experts) as one tile, and one just past it."""
    src = BOOLS_AND_NARROW.format(n=n)
    inputs = make_inputs(sparsa.compile(src, target="reference"), sizes={**SIZES, "R": 21})  # two full row tiles and a tail
    inputs[3] = np.random.default_rng(n).random((21, 64)) > 0.5
    check(src, inputs)


TOPK = """
model M(x: f32[R, 40]) -> (f32[R, {k}], i64[R, {k}], f32[R, 3, {k}], i64[R, 3, {k}]) {{
    v, i = topk(x, k={k})
    w, j = topk(reshape(x[:, :30], [R, 3, 10]) * 2.0, k={k})
    return v, i, w, j
}}
"""


@pytest.mark.parametrize("k", [1, 4, 10])
def test_topk_one_pass_insertion_keeps_numpy_order(k, monkeypatch):
    """Rows with many ties, NaNs and -inf, k up to a whole rank-3 row; rows split over 3 threads."""
    from sparsa.backends.cpu import jit

    monkeypatch.setenv("SPARSA_NUM_THREADS", "3")
    monkeypatch.setattr(jit, "SPLIT_WORK", 0)  # split however small
    rng = np.random.default_rng(k)
    x = rng.integers(-3, 3, (13, 40)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.05] = -np.inf
    x[0] = np.arange(40)  # ascending: every element enters
    x[1] = np.nan
    check(TOPK.format(k=k), [x])


SEARCHES = """
model M(x: f32[R, 9], i: i32[R, 9]) -> (f32[R, 4], i64[R, 4], i64[9], i64[R, 1], i32[R, 3], i64[R, 3], i32[R, 9], i64[R], f32[R, 2]) {
    v, j = topk(x, k=4)
    w, n = topk(i, k=3)
    return v, j, argmax(x, axis=0), argmax(x, axis=1, keepdim=true), w, n, cumsum(i, axis=0), iota(R) + argmax(i, axis=1), full([R, 2], 1.5)
}
"""


def test_searches_keep_numpy_order_with_ties_and_nans():
    """topk and argmax as NumPy orders: ties to the lower index, NaN the largest for argmax and last for topk;
    integer inputs; cumsum of ints; iota and a splat of symbolic length."""
    x = np.round(np.random.default_rng(3).standard_normal((7, 9)), 1).astype(np.float32)
    x[0] = 1.0  # all tied
    x[1, [2, 5]] = np.nan
    x[2, 4] = np.nan
    x[3, :] = -np.inf
    i = np.random.default_rng(4).integers(-3, 3, (7, 9)).astype(np.int32)
    check(SEARCHES, [x, i])


@pytest.mark.parametrize(("decay", "chunk"), [("sigmoid(g)", 16), ("g", 5), ("(g * 0.0 + 1.0)", 64)])
def test_linear_attention_scan(decay, chunk):
    """The matrix-state scan: any decay sign, a zero decay cutting the history, L not a multiple of the chunk."""
    src = LINEAR_ATTENTION.replace("DECAY", decay)
    passes = f"canonicalize,fuse-scan{{chunk={chunk}}},cse,dce"
    sizes = {"B": 2, "L": 45}
    inputs = make_inputs(sparsa.compile(src, passes=passes, target="reference"), sizes=sizes)
    inputs[3][0, 7] = 0.0
    cpu = check(src, inputs, passes=passes)
    assert "scan_linear_attention" in cpu.stage("mlir")


@pytest.mark.parametrize("static", [False, True])
def test_fused_scan_in_channel_blocks_on_any_thread_count(monkeypatch, static):
    """The selective scan in items of channel vectors (300 = four items of 64 and a masked tail) split over
    threads, with the channel count symbolic or fixed (a fixed one used to make each step's slice the whole width
    in the blocked kernel: a crash)."""
    src = (ROOT / "examples" / "selective_scan.sp").read_text()
    if static:
        src = src.replace("DI]", "300]").replace("DI,", "300,")
    ref, cpu = pair(src)
    inputs = make_inputs(ref, sizes={"B": 2, "L": 6, "DI": 300, "N": 7})
    inputs[2] = -np.abs(inputs[2])  # A < 0: a decaying state, as in Mamba
    want = ref(*inputs)
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
        close(cpu(*inputs), want)
    assert "arith.minsi" in cpu.stage("mlir")  # the last block is cut short
    assert "vector.maskedload" in cpu.stage("mlir")  # channels in vector lanes (lane_scan_kernel)


FUSED_SCAN = """model M(a: f32[B, L, D], u: f32[B, L, D], bm: f32[B, L, N], c: f32[B, L, N], w: f32[D, N]) -> f32[B, L, D] {
    h = scan(DECAY, (u * a)[:, :, :, None] * bm[:, :, None, :], axis=1)
    return sum(h * c[:, :, None, :], axis=-1)EPILOGUE
}"""


@pytest.mark.parametrize(("decay", "lanes"), [("exp(-(a * a)[:, :, :, None] * w)", True),
                                              ("sigmoid(a[:, :, :, None] - w) * 0.5", True),
                                              ("exp(-abs(a[:, :, :, None] - w))", False)])
@pytest.mark.parametrize(("D", "N", "epilogue"), [(1, 1, ""), (70, 3, " * sigmoid(u) + a"), (130, 16, ""),
                                                  (130, 16, " + a * u")])
def test_fused_scans_with_channels_in_lanes_or_in_blocks(decay, lanes, D, N, epilogue):
    """Fused scans of region ops the lane-vector kernel evaluates on vectors (with a time-invariant [D, N] input
    read once per item, a constant, a batch dim kept as work items, tails masked) and of one it does not (abs:
    the blocked kernel), against the reference at channel counts below, across and past one item; with an
    elementwise epilogue after the sum (fuse-scan-epilogue), in the same kernel."""
    src = FUSED_SCAN.replace("DECAY", decay).replace("EPILOGUE", epilogue)
    ref, cpu = pair(src)
    inputs = make_inputs(ref, sizes={"B": 2, "L": 5, "D": D, "N": N})
    close(cpu(*inputs), ref(*inputs))
    assert ("vector.maskedload" in cpu.stage("mlir")) == lanes
    kernels = re.findall(r"func\.func @k\d+_(\w+)\(", cpu.stage("mlir"))
    assert [k for k in kernels if k != "tensor_constant"] == ["scan_fused"]


@pytest.mark.parametrize("target", ["cpu", "cpu:x86-64-v3", "cpu:x86-64"])
@pytest.mark.parametrize("dtype", ["f32", "i32", "i64", "bool"])
def test_transposes_of_the_last_two_axes(target, dtype):
    """Blocks of lanes x lanes transposed in registers (16, 8 or 4 lanes of 32 bits, 8, 4 or 2 of 64), rows and
    columns past the last whole block one at a time, bools one at a time; ranks 2 to 4 (leading dims one), shapes below, at and past
    a block, a 3-D permutation that is not a swap of the last two (the generic): every element where NumPy puts it."""
    from sparsa.backends.cpu.target import named_target

    if ":" in target and named_target(target.split(":")[1]).why_not_here() is not None:
        pytest.skip(f"{target} does not run here")
    np_type = {"f32": np.float32, "i32": np.int32, "i64": np.int64, "bool": np.bool_}[dtype]
    src = f"""model M(a: {dtype}[R, C], b: {dtype}[2, R, C], c: {dtype}[2, 3, R, C]) -> ({dtype}[C, R], {dtype}[2, C, R],
        {dtype}[2, 3, C, R], {dtype}[C, 2, R]) {{
    return transpose(a, [1, 0]), transpose(b, [0, 2, 1]), transpose(c, [0, 1, 3, 2]), transpose(b, [2, 0, 1])
}}"""
    m = sparsa.compile(src.replace("\n        ", " "), target=target)
    rng = np.random.default_rng(0)
    for R, C in [(1, 1), (3, 5), (16, 16), (37, 70), (64, 33), (5, 128)]:
        ins = [(rng.standard_normal(s) * 100).astype(np_type) for s in ((R, C), (2, R, C), (2, 3, R, C))]
        want = [ins[0].T, ins[1].transpose(0, 2, 1), ins[2].transpose(0, 1, 3, 2), ins[1].transpose(2, 0, 1)]
        for got, w in zip(m(*ins), want, strict=True):
            assert got.dtype == w.dtype and np.array_equal(got, w), (R, C)
    assert "transpose" in m.native.stages["llvm"]


@pytest.mark.parametrize("keepdim", [False, True])
def test_scan_in_its_readers_frame_in_lanes(keepdim):
    """A scan read through a transpose (made in that frame by fuse-scan), its sum with or without keepdim, the
    time and channel dims of one size (L = D = 70: the lanes' channel dim known by the read-out's form, not by its
    size): the lane kernel, as the reference."""
    from test_pass_properties import TRANSPOSED_READOUT

    src = TRANSPOSED_READOUT.format(keep=", 1" if keepdim else "", keepdim=", keepdim=true" if keepdim else "")
    ref, cpu = pair(src)
    inputs = make_inputs(ref, sizes={"B": 2, "L": 70, "D": 70, "N": 5})
    close(cpu(*inputs), ref(*inputs))
    assert "vector.maskedload" in cpu.stage("mlir") and cpu.stats()["ops"].get("scan.fused") == 1


def test_vector_exp_short_and_full_forms():
    """A lane scan's decay exp on vectors of channels: vectors all within EXP_FAST_LOW of 0 take the short form,
    vectors with a lane farther out, a NaN or an infinity the full one; both against float64 (normal results within
    2 ulp, subnormals, 0, inf and NaN exactly) around the thresholds and the overflow point."""
    from sparsa.backends.cpu.build import EXP_FAST_LOW, EXP_HIGH

    src = """model M(x: f32[B, L, D], b: f32[B, L, D], w: f32[D, N], c: f32[B, L, N]) -> f32[B, L, D] {
    h = scan(exp(x[:, :, :, None] * w), b[:, :, :, None] * c[:, :, None, :], axis=1)
    return sum(h * c[:, :, None, :], axis=-1)
}"""
    cpu = sparsa.compile(src, target="cpu")
    rng = np.random.default_rng(0)
    fast = rng.uniform(EXP_FAST_LOW, 88.0, 512)
    fast[-32:] = np.linspace(88.6, np.nextafter(np.float32(EXP_HIGH), np.float32(0)), 32)  # the short form's last
    fast[-64 + 5] = EXP_HIGH  # one lane at the overflow point sends its vector to the full form (the short: NaN)
    edges = [EXP_FAST_LOW, EXP_FAST_LOW + 1e-5, -87.3, -87.4, -90.0, -103.0, -103.9, -104.5, -150.0, 88.72283935546875,
             88.7229, 89.0, 100.0, 0.0, -0.0, 1e-30, np.inf, -np.inf, np.nan]
    mixed = rng.uniform(-110.0, 90.0, 512 - len(edges))
    x = np.concatenate([fast, edges, mixed]).astype(np.float32)  # the first 512 in whole vectors of the short form
    D = x.size
    xs = np.stack([np.zeros(D, np.float32), x])[None]  # h_1 = exp(x) h_0 + b_1 with h_0 = 1, b_1 = 0
    b = np.stack([np.ones(D, np.float32), np.zeros(D, np.float32)])[None]
    y = cpu(xs, b, np.ones((D, 1), np.float32), np.ones((1, 2, 1), np.float32))[0, 1]
    want = np.exp(x.astype(np.float64))
    normal = np.isfinite(want) & (want >= np.finfo(np.float32).tiny) & (want <= np.finfo(np.float32).max)
    np.testing.assert_allclose(y[normal], want[normal], rtol=2.4e-7)
    with np.errstate(over="ignore"):
        want32 = want.astype(np.float32)  # subnormal results, 0, inf and NaN exactly
    np.testing.assert_allclose(y[~normal], want32[~normal], rtol=1e-6, atol=2e-45)
    assert "vector.maskedload" in cpu.stage("mlir") and "scf.if" in cpu.stage("mlir")


@pytest.mark.parametrize("passes", [None, "cse,dce"])
def test_sum_of_a_negation(passes):
    """A sum over either axis of a negated chain (the rules of sub and max end so): with canonicalize the negation
    goes after the sum; without it the cpu backend leaves the negation out of the sum's kernel (MLIR folds
    `out + -x` to `out - x`, a combiner its vectorizer refused for a reduction: a crash)."""
    src = """model M(a: f32[L, D], d: f32[L, D]) -> (f32[D], f32[L]) {
    return sum(-(a * d), axis=0), sum(-exp(a), axis=1)
}"""
    check(src, passes=passes, sizes={"L": 37, "D": 40})


def test_unfused_scan_with_initial_state_and_broadcasting():
    src = """model M(a: f32[B, L, 1], b: f32[B, L, 6], h: f32[6]) -> f32[B, L, 6] {
    return scan(sigmoid(a), b, axis=1, h0=h) + scan(a, b, axis=-2)
}"""
    cpu = check(src, passes="canonicalize,cse,dce")
    assert "k1_scan_scan" in cpu.stage("mlir")


@pytest.mark.parametrize("threads", ["1", "3"])
def test_unfused_scans_split_over_threads(monkeypatch, threads):
    """An unfused scan's parts each scan a slice of the dim next to the time axis (the one before it when time is
    last; a 1-D scan in one part): along the last axis, along the first with an initial state, and 1-D (the
    reversed scans of a backward split alike: the selective scan's vjp in test_cpu_training)."""
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    src = """model M(a: f32[L, 5], b: f32[L, 5], h: f32[5], c: f32[L], d: f32[L]) -> (f32[L, 5], f32[L, 5], f32[L]) {
    return scan(sigmoid(a), b, axis=0, h0=h), scan(a, b, axis=1), scan(sigmoid(c), d, axis=0)
}"""
    cpu = check(src, passes="canonicalize,cse,dce")
    assert "scan_scan" in cpu.stage("mlir")


def test_repeated_layers_share_their_kernels():
    """Two layers with the same ops at the same shapes compile their kernels once: the second layer's
    kernels call the first's functions (the module holds one of each), and the results are unchanged."""
    src = """model M(x: f32[T, 32]) -> f32[T, 32] {
    param w1: f32[32, 32]
    param w2: f32[32, 32]
    h = x + silu(x @ w1)
    g = h + silu(h @ w2)
    return g @ w1
}
"""
    cpu = check(src)
    names = [k.name for k in cpu.native.kernels.values()]
    assert names[0].endswith("_matmul_silu_add")  # the matmul, silu and + fused: one kernel a layer, the same one
    assert len(names) == 3 and len(set(names)) == 2, names
    assert cpu.stage("mlir").count("func.func @k") == len(set(names))


@pytest.mark.slow
def test_whole_decoder_matches_reference():
    ref, cpu = pair(str(ROOT / "examples" / "tiny_moe_decoder.sp"))
    inputs = make_inputs(ref)
    close(cpu(*inputs), ref(*inputs))


@pytest.mark.parametrize("router", ["mixtral", "qwen", "switch", "deepseek", "grouped"])
def test_moe_routers_and_capacity(router):
    from test_moe_passes import BODIES, program

    E, K = (8, 1) if router == "switch" else (8, 2)
    src = program(router, BODIES["swiglu" if router != "switch" else "relu"], E, K,
                  1.25 if router in ("switch", "qwen") else None)
    ref, cpu = pair(src)
    for T in (1, 3, 37, 130):  # one token (most experts get none), tails past the 64-row work items
        x = np.random.default_rng(T).standard_normal((T, 6)).astype(np.float32)
        close(cpu(x), ref(x))
    loops = cpu.stage("mlir")
    assert "k1_moe_route" in loops and "k2_moe_dispatch" in loops and "moe_grouped_matmul_combine" in loops


MOE = """
model M(x: f32[T, 24]) -> f32[T, 24] {
    param gate: f32[24, 6]
    param w1: f32[6, 24, 40]
    param w3: f32[6, 24, 40]
    param w2: f32[6, 40, 24]
    w, idx = topk(softmax(x @ gate, axis=-1), k=2)
    return moe(x, idx, w) |e, h| { (silu(h @ w1[e]) * (h @ w3[e])) @ w2[e] }
}
"""


def test_expert_weights_packed_in_panels_or_read_in_place():
    """Parameter weights go to the grouped GEMM packed in 32-column panels (40 = a full panel and a tail);
    the same weights passed as inputs are read in place."""
    ref, cpu = pair(MOE)
    x = np.random.default_rng(5).standard_normal((70, 24)).astype(np.float32)
    close(cpu(x), ref(x))
    assert "memref<6x?x24x32xf32>" in cpu.stage("mlir")  # w1, w3 packed: [E, panels, K, 32]
    src = MOE.replace("model M(x: f32[T, 24])", "model M(x: f32[T, 24], w1: f32[6, 24, 40], w3: f32[6, 24, 40], "
                      "w2: f32[6, 40, 24])")
    src = "\n".join(line for line in src.splitlines() if "param w" not in line)
    ref, cpu = pair(src)
    ws = [np.random.default_rng(i).standard_normal(s).astype(np.float32) for i, s in
          enumerate([(6, 24, 40), (6, 24, 40), (6, 40, 24)])]
    close(cpu(x, *ws), ref(x, *ws))
    assert "memref<6x24x40xf32>" in cpu.stage("mlir")


@pytest.fixture(scope="module")
def moe_pair():
    return pair(MOE, seed=2)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 200), seed=st.integers(0, 1000))
def test_moe_any_token_count(moe_pair, T, seed):
    ref, cpu = moe_pair
    x = np.random.default_rng(seed).standard_normal((T, 24)).astype(np.float32)
    close(cpu(x), ref(x))


ATTN = """
mask m(b, h, q, k) = k <= q and q - k < 40 and q >= 5
model A(q: f32[1, 4, S, 16], k: f32[1, 2, S, 16], v: f32[1, 2, S, 16]) -> f32[1, 4, S, 16] {
    return attention(q, k, v, mask=m)
}
"""


@pytest.fixture(scope="module")
def attn_pair():
    return pair(ATTN)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(S=st.integers(1, 200), seed=st.integers(0, 1000))
def test_block_sparse_attention_any_length(attn_pair, S, seed):
    """Grouped heads, tails past the 64x64 tiles, and rows 0..4 with nothing allowed (zeros)."""
    ref, cpu = attn_pair
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, h, S, 16)).astype(np.float32) for h in (4, 2, 2))
    got = cpu(q, k, v)
    close(got, ref(q, k, v))
    assert not got[:, :, :5].any()


SYMBOLIC_HEAD_DIM = """mask causal(b, h, q, k) = k <= q
model M(q: f32[1, 2, S, D], k: f32[1, 1, S, D], v: f32[1, 1, S, D]) -> f32[1, 2, S, D] {
    return attention(q, k, v, mask=causal)
}
"""


def test_symbolic_head_dim_takes_the_default_scale():
    """scale defaults to 1/sqrt(Dh) with Dh symbolic too (computed at run time), on every head dim."""
    ref, cpu = pair(SYMBOLIC_HEAD_DIM)
    rng = np.random.default_rng(4)
    for S, D in ((9, 8), (70, 20)):
        q, k, v = (rng.standard_normal((1, h, S, D)).astype(np.float32) for h in (2, 1, 1))
        s = np.where(np.tril(np.ones((S, S), bool)), q.astype(np.float64) @ np.swapaxes(k, -1, -2) / np.sqrt(D),
                     -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ v
        close(ref(q, k, v), want)
        close(cpu(q, k, v), want)


def test_threads_split_the_work_and_agree(monkeypatch, moe_pair, attn_pair):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 24)).astype(np.float32)
    q, k, v = (rng.standard_normal((1, h, 150, 16)).astype(np.float32) for h in (4, 2, 2))
    outs = {}
    for n in ("1", "3"):
        monkeypatch.setenv("SPARSA_NUM_THREADS", n)
        outs[n] = (moe_pair[1](x), attn_pair[1](q, k, v))
    np.testing.assert_allclose(outs["1"][0], outs["3"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs["1"][1], outs["3"][1])


def test_static_rows_are_cut_over_threads(monkeypatch):
    """Dense ops with a static dim 0 (torch graphs are static) are split over threads like symbolic ones."""
    src = "model M(x: f32[300, 64], w: f32[64, 160]) -> f32[300, 160] {\n    return silu(x @ w) * 2.0\n}\n"
    ref, cpu = pair(src)
    x, w = make_inputs(ref)
    assert {k.split for k in cpu.native.kernels.values() if k.op.NAME in ("tensor.matmul", "tensor.mul")} == {"rows"}
    want = ref(x, w)
    for threads in ("1", "3"):
        monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
        close(cpu(x, w), want)


def test_bad_thread_count_is_a_clear_error(monkeypatch, moe_pair):
    monkeypatch.setenv("SPARSA_NUM_THREADS", "two")
    from sparsa.ir.diagnostics import SparsaError

    with pytest.raises(SparsaError, match="SPARSA_NUM_THREADS must be a whole number"):
        moe_pair[1](np.zeros((3, 24), np.float32))


def test_sparse_weights_small_blocks_and_nm():
    src = SPARSE_WEIGHTS
    ref, cpu = pair(src)
    for T in (1, 37, 300):
        x = np.random.default_rng(T).standard_normal((T, 64)).astype(np.float32)
        close(cpu(x), ref(x))
    assert "sparse_bsr_matmul" in cpu.stage("mlir") and "sparse_nm_matmul" in cpu.stage("mlir")


@pytest.mark.parametrize("threads", ["1", "3"])
def test_bsr_by_block_columns_over_random_patterns(monkeypatch, threads):
    """The BSR kernel puts the stored blocks in column order and accumulates each block column's tile over them:
    random patterns with empty block rows and columns (a column with no block is zeros), a block in every place,
    none at all, and row counts on both sides of the 64-row tile, against the dense product."""
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    src = "model F(x: f32[T, 48]) -> f32[T, 80] {\n    param w: f32[48, 80] sparse bsr(8, 16)\n    return x @ w\n}\n"
    rng = np.random.default_rng(7)
    for density in (0.0, 0.3, 1.0):
        keep = rng.random((6, 5)) < density
        keep[2, :] = keep[2, :] & (density == 1.0)  # an empty block row (unless every block is kept)
        w = (rng.standard_normal((48, 80)) * np.kron(keep, np.ones((8, 16)))).astype(np.float32)
        cpu = sparsa.compile(src, target="cpu").load_weights({"w": w})
        assert "sparse_bsr_matmul" in cpu.stage("mlir")
        for T in (1, 63, 64, 65, 200):
            x = rng.standard_normal((T, 48)).astype(np.float32)
            np.testing.assert_allclose(cpu(x), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_disk_cache_hit_and_corrupt_entry_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSA_CACHE_DIR", str(tmp_path))
    x = np.random.default_rng(1).standard_normal((9, 24)).astype(np.float32)
    first = sparsa.compile(MOE, target="cpu").init_weights(4)
    assert not first.native.cached
    want = first(x)
    objects = list((tmp_path / "cpu").glob("*.o"))
    assert len(objects) == 1 and len(list((tmp_path / "cpu").glob("*.json"))) == 1
    again = sparsa.compile(MOE, target="cpu").init_weights(4)
    assert again.native.cached and "vector.fma" in again.stage("loops")
    np.testing.assert_array_equal(again(x), want)
    data = bytearray(objects[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte: the entry no longer matches its hash
    objects[0].write_bytes(bytes(data))
    rebuilt = sparsa.compile(MOE, target="cpu").init_weights(4)
    assert not rebuilt.native.cached
    np.testing.assert_array_equal(rebuilt(x), want)
    (tmp_path / "cpu" / objects[0].name).write_bytes(b"")  # truncated by a crash mid-write elsewhere
    assert not sparsa.compile(MOE, target="cpu").native.cached
    assert sparsa.compile(MOE, target="cpu").native.cached  # and written back whole


def test_model_without_kernels_compiles_twice(monkeypatch, tmp_path):
    """A model that only returns its input has no kernels and no object code: nothing to cache (dumping an
    empty engine's object crashed the process)."""
    monkeypatch.setenv("SPARSA_CACHE_DIR", str(tmp_path))
    src = "model M(x: f32[T, 8]) -> f32[T, 8] {\n    return x\n}\n"
    x = np.ones((3, 8), np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(sparsa.compile(src, target="cpu")(x), x)


DETERMINISTIC = """model M(x: f32[T, 64], w: f32[64, 96]) -> f32[T, 64] {
    param gate: f32[64, 16]
    param w1: f32[16, 64, 48]
    param w2: f32[16, 48, 64]
    g, idx = topk(softmax(x @ gate, axis=-1), 4)
    y = moe(x, idx, g) |e, h| { silu(h @ w1[e]) @ w2[e] }
    return y + (x @ w)[:, :64]
}
"""


def test_deterministic_results_are_bitwise_equal_over_calls_and_thread_counts(monkeypatch):
    """SPARSA_DETERMINISTIC=1: the grouped GEMMs' combine sums fixed slices in a fixed order and row splits fall
    at fixed rows, so 1, 2 and 3 threads and repeated calls give the same bits (E=16, k=4: many rows of a token
    meet in the combine)."""
    from sparsa.backends.cpu import jit

    monkeypatch.setenv("SPARSA_DETERMINISTIC", "1")
    monkeypatch.setattr(jit, "SPLIT_WORK", 0)  # split however small
    m = sparsa.compile(DETERMINISTIC, target="cpu").init_weights(0)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((301, 64)).astype(np.float32), rng.standard_normal((64, 96)).astype(np.float32)
    results = []
    for threads in ("1", "2", "3", "2", "3"):
        monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
        results.append(m(x, w))
    assert all(np.array_equal(r, results[0]) for r in results[1:])
    ref = sparsa.compile(DETERMINISTIC, target="reference").init_weights(0)
    np.testing.assert_allclose(results[0], ref(x, w), rtol=1e-4, atol=1e-4)
