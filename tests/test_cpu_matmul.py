"""The cpu target's dense matmul (backends/cpu/matmul.py): x packed by register tile and w by groups of panels
where there are rows enough, read in place where there are few. Checked against NumPy in float64 at sizes around
the register tile, the panel and the weight group, on AVX-512 (or the host's), AVX2 and SSE code, on one thread
and split over three, on both hosts."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch_mlir")

import sparsa  # noqa: E402
from sparsa.backends.cpu import host, jit  # noqa: E402
from sparsa.backends.cpu.matmul import packs  # noqa: E402
from sparsa.backends.cpu.target import named_target  # noqa: E402

# rows x K x N: a partial register tile and a panel of one column past 32; whole tiles and panels; several weight
# groups (32 panels of K = 1001), so x is packed too (its last 8 rows and last 9 columns past whole squares of
# vectors), and a last partial panel; x of rank 3 with rows known at run time only; w stored [N, K] (PyTorch's Linear
# weight) and read through its transpose, K = 37 a few whole vectors and a rest; K longer than a span (`k_span`: 1024
# with a 1 MiB L2, 2048 with 2 MiB), known at compile time (x read in place) and only at run time (x packed)
SRC = """model M(a: f32[130, 7], b: f32[7, 33], c: f32[256, 129], d: f32[129, 64], e: f32[200, 1001],
        f: f32[1001, 1000], g: f32[T, 3, 33], h: f32[33, 40], i: f32[150, 37], j: f32[70, 37], k: f32[130, 2100],
        l: f32[2100, 40], n: f32[150, D], o: f32[D, 70]) -> (f32[130, 33], f32[256, 64], f32[200, 1000],
        f32[T, 3, 40], f32[150, 70], f32[130, 40], f32[150, 70]) {
    return a @ b, c @ d, e @ f, g @ h, i @ transpose(j, [1, 0]), k @ l, n @ o
}
"""
SHAPES = [(130, 7), (7, 33), (256, 129), (129, 64), (200, 1001), (1001, 1000), None, (33, 40), (150, 37), (70, 37),
          (130, 2100), (2100, 40), (150, 2500), (2500, 70)]


@pytest.mark.parametrize("target", ["cpu", "cpu:x86-64-v3", "cpu:x86-64"])
@pytest.mark.parametrize("native", [True, False])
def test_packed_matmul_against_numpy(monkeypatch, target: str, native: bool) -> None:
    if ":" in target and named_target(target.split(":")[1]).why_not_here() is not None:
        pytest.skip(f"{target} does not run here")
    if not native:
        monkeypatch.setenv("SPARSA_NATIVE_HOST", "0")
    monkeypatch.setattr(host, "NATIVE_SPLIT_WORK", 0)  # split however small
    monkeypatch.setattr(jit, "SPLIT_WORK", 0)
    m = sparsa.compile(SRC, target=target)
    ops = [op for op in m.module.funcs[-1].regions[0].block.ops if op.NAME == "tensor.matmul"]
    assert len(ops) == 7 and all(packs(op) for op in ops)
    assert "memref.alloc" in m.native.stages["mlir"]
    assert "tensor_transpose" not in m.native.stages["mlir"]  # the kernel packs j's panels from j itself
    rng = np.random.default_rng(0)
    for rows in (2, 100):  # a decode step (read in place), then 300 rows (packed, 99 or more a part)
        xs = [rng.standard_normal(s or (rows, 3, 33)).astype(np.float32) for s in SHAPES]
        want = [xs[i].astype(np.float64) @ xs[i + 1] for i in range(0, 8, 2)] + [xs[8].astype(np.float64) @ xs[9].T]
        want += [xs[i].astype(np.float64) @ xs[i + 1] for i in (10, 12)]
        for threads in ("1", "3"):
            monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
            got = m(*xs)
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape
                np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.sqrt(xs[12].shape[1]))


def test_few_rows_or_columns_read_in_place() -> None:
    """Packing pays for itself with rows enough and a panel's width of columns: a decode-sized x or a router's few
    experts are read in place; rows known only at run time are packed where a part has a chunk of them."""
    src = """model M(x: f32[64, 16], y: f32[128, 16], z: f32[T, 16], w: f32[16, 32], r: f32[16, 8],
            b: f32[4, 128, 16]) -> (f32[64, 32], f32[128, 32], f32[T, 32], f32[128, 8], f32[4, 128, 32]) {
        return x @ w, y @ w, z @ w, y @ r, b @ w
    }
    """
    m = sparsa.compile(src, target="reference", passes="canonicalize")
    ops = [op for op in m.module.funcs[-1].regions[0].block.ops if op.NAME == "tensor.matmul"]
    assert [packs(op) for op in ops] == [False, True, True, False, True]


@pytest.mark.parametrize("native", [True, False])
def test_a_transpose_read_elsewhere_is_made(monkeypatch, native: bool) -> None:
    """A transpose that something other than a packed matmul reads (here, the function returns it) stays a kernel
    of its own, and the matmul packs from it as from any w."""
    if not native:
        monkeypatch.setenv("SPARSA_NATIVE_HOST", "0")
    src = """model M(x: f32[200, 40], w: f32[100, 40]) -> (f32[200, 100], f32[40, 100]) {
        t = transpose(w, [1, 0])
        return x @ t, t
    }
    """
    m = sparsa.compile(src, target="cpu")
    assert "tensor_transpose" in m.native.stages["mlir"]
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((200, 40), np.float32), rng.standard_normal((100, 40), np.float32)
    y, t = m(x, w)
    np.testing.assert_array_equal(t, w.T)
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-4)


def test_products_over_no_k_are_zeros() -> None:
    """K = 0, known at compile time (read in place) or only at run time (packed: no panels' rows to multiply)."""
    src = """model M(x: f32[200, 0], w: f32[0, 64], y: f32[T, D], v: f32[D, 64]) -> (f32[200, 64], f32[T, 64]) {
        return x @ w, y @ v
    }
    """
    m = sparsa.compile(src, target="cpu")
    a, b = m(np.zeros((200, 0), np.float32), np.zeros((0, 64), np.float32), np.zeros((300, 0), np.float32),
             np.zeros((0, 64), np.float32))
    assert a.shape == (200, 64) and b.shape == (300, 64) and not a.any() and not b.any()


# epilogues: a bias and relu (a row input); a per-row scale, a whole tensor and a constant; x of rank 3 with rows at
# run time (few: read in place, then the epilogue on the product; many: packed) and a bias of shape [1, 40]; K past a
# span (the epilogue at the last one only); SwiGLU's two products read by one chain (one of them made in it, through
# a transposed w); a product also returned (stored: no epilogue); x of batch 1 (the host splits no rows)
EPI = """model M(a: f32[130, 37], w: f32[37, 70], b: f32[70], r: f32[130, 70], s: f32[130, 1], g: f32[T, 3, 33],
        h: f32[33, 40], hb: f32[1, 40], k: f32[130, 2100], l: f32[2100, 40], j: f32[70, 37], v: f32[37, 70],
        u: f32[37, 70], q: f32[37, 70], o: f32[1, 150, 33]) -> (f32[130, 70], f32[130, 70], f32[T, 3, 40],
        f32[130, 40], f32[130, 70], f32[130, 70], f32[130, 70], f32[1, 150, 40]) {
    z = a @ u
    swiglu = silu(a @ transpose(j, [1, 0])) * (a @ q)
    return relu(a @ w + b), (a @ v) * s + r * 0.5, silu(g @ h + hb), k @ l - hb, swiglu, z, z + b, relu(o @ h + hb)
}
"""


@pytest.mark.parametrize("target", ["cpu", "cpu:x86-64-v3"])
@pytest.mark.parametrize("native", [True, False])
def test_matmul_epilogues_against_numpy(monkeypatch, target: str, native: bool) -> None:
    """The elementwise chain that alone reads a packed product runs on each of its tiles in the matmul's kernel
    (`matmul.epilogues`): the product is never stored, and the chain's kernel is gone."""
    if ":" in target and named_target(target.split(":")[1]).why_not_here() is not None:
        pytest.skip(f"{target} does not run here")
    if not native:
        monkeypatch.setenv("SPARSA_NATIVE_HOST", "0")
    monkeypatch.setattr(host, "NATIVE_SPLIT_WORK", 0)
    monkeypatch.setattr(jit, "SPLIT_WORK", 0)
    m = sparsa.compile(EPI, target=target)
    mlir = m.native.stages["mlir"]
    names = sorted(line.split("@")[1].split("(")[0].split("_", 1)[1] for line in mlir.splitlines()
                   if "func.func @k" in line)
    assert names == ["matmul_add_relu", "matmul_add_relu", "matmul_add_silu", "matmul_mul_mul_add", "matmul_silu_mul",
                     "matmul_sub", "tensor_add", "tensor_constant", "tensor_matmul"], " ".join(names)
    f64 = np.float64
    rng = np.random.default_rng(2)
    for rows in (2, 100):
        a, w, b, r, s = (rng.standard_normal(n).astype(np.float32) for n in ((130, 37), (37, 70), 70, (130, 70),
                                                                              (130, 1)))
        g, h, hb, k, l = (rng.standard_normal(n).astype(np.float32) for n in ((rows, 3, 33), (33, 40), (1, 40),
                                                                                (130, 2100), (2100, 40)))
        j, v, u, q = (rng.standard_normal(n).astype(np.float32) for n in ((70, 37), (37, 70), (37, 70), (37, 70)))
        o = rng.standard_normal((1, 150, 33)).astype(np.float32)  # batch 1: the host splits no rows
        silu = lambda t: t / (1 + np.exp(-t))  # noqa: E731
        z = a.astype(f64) @ u
        want = [np.maximum(a.astype(f64) @ w + b, 0), (a.astype(f64) @ v) * s + r * 0.5, silu(g.astype(f64) @ h + hb),
                k.astype(f64) @ l - hb, silu(a.astype(f64) @ j.T) * (a.astype(f64) @ q), z, z + b,
                np.maximum(o.astype(f64) @ h + hb, 0)]
        for threads in ("1", "3"):
            monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
            got = m(a, w, b, r, s, g, h, hb, k, l, j, v, u, q, o)
            for i, (x, y) in enumerate(zip(got, want, strict=True)):
                assert x.shape == y.shape, i
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * np.sqrt(2100), err_msg=str(i))


@pytest.mark.parametrize("native", [True, False])
def test_fixed_weights_packed_once(monkeypatch, native: bool) -> None:
    """A w that is a param (or a frozen torch parameter) is packed in panels once per set of weights, by the host,
    and kept (`Kernel.panels`); the kernel reads them as they are. Static rows, rows at run time (few: w read in
    place; many: the panels), K past a span, an epilogue, a transposed param; new weights, new panels."""
    if not native:
        monkeypatch.setenv("SPARSA_NATIVE_HOST", "0")
    monkeypatch.setattr(host, "NATIVE_SPLIT_WORK", 0)
    monkeypatch.setattr(jit, "SPLIT_WORK", 0)
    src = """model M(x: f32[130, 2100], y: f32[T, 37]) -> (f32[130, 70], f32[T, 3, 40], f32[T, 70]) {
        param w: f32[2100, 70]
        param h: f32[37, 120]
        param b: f32[120]
        param j: f32[70, 37]
        return x @ w, reshape(relu(y @ h + b), [T, 3, 40]), y @ transpose(j, [1, 0])
    }
    """
    m, ref = sparsa.compile(src, target="cpu"), sparsa.compile(src, target="reference")
    rng = np.random.default_rng(3)
    for seed in (1, 2):
        m.init_weights(seed)
        ref.init_weights(seed)
        for rows in (2, 100):
            x, y = rng.standard_normal((130, 2100)).astype(np.float32), rng.standard_normal((rows, 37)).astype(np.float32)
            want = ref(x, y)
            for threads in ("1", "3"):
                monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
                for got, w in zip(m(x, y), want, strict=True):
                    np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4 * np.sqrt(2100))
    kernels = [k for k in m.native.kernels.values() if "matmul" in k.name]
    assert [k.panels for k in kernels] == [[2]] * 3, [k.name for k in kernels]
    assert ("panels", id(kernels[0].inputs[2])) in m._cache
    if native:
        assert m.native.calls["native"] > m.native.calls["python"] == 2  # the Python host once per set of weights


@pytest.mark.parametrize("machine", ["x86-64-v3", "x86-64"])
def test_a_packed_tile_of_six_rows_broadcasts_its_column_from_memory(machine) -> None:
    """AVX2's 6x16 and SSE's 6x8 packed tiles read their column of A (6 floats) element by element (`_scalar_reads`):
    left a vector of 6, LLVM split it 4 + 2 and broadcast the sixth through a permute."""
    fn = sparsa.compile(SRC, target=f"cpu:{machine}").native
    assert fn.target.packed_rows == 6
    assert f"vector<1x6x{fn.target.tile[1]}xf32>" in fn.stages["loops"]  # the packed tiles' accumulators
    assert "vector<1x1x6xf32>" not in fn.stages["loops"] and "-> vector<6xf32>" not in fn.stages["llvm"]  # no loads


def test_reads_only_for_their_elements_become_scalar_loads() -> None:
    """`_scalar_reads` on its own: an in-bounds read of 6 used only element by element becomes memref.loads at the
    elements' indices; a read that may be out of bounds, a power of two and a read also used whole stay."""
    from torch_mlir import ir

    text = """func.func @f(%m: memref<4x6xf32>, %i: index, %o: memref<8xf32>) -> (f32, f32, f32, f32, vector<6xf32>, f32) {
  %p = arith.constant 0.0 : f32
  %c0 = arith.constant 0 : index
  %a = vector.transfer_read %m[%i, %c0], %p {in_bounds = [true]} : memref<4x6xf32>, vector<6xf32>
  %a0 = vector.extract %a[0] : f32 from vector<6xf32>
  %a5 = vector.extract %a[5] : f32 from vector<6xf32>
  %b = vector.transfer_read %m[%i, %c0], %p {in_bounds = [false]} : memref<4x6xf32>, vector<6xf32>
  %b1 = vector.extract %b[1] : f32 from vector<6xf32>
  %c = vector.load %o[%i] : memref<8xf32>, vector<4xf32>
  %c1 = vector.extract %c[1] : f32 from vector<4xf32>
  %d = vector.transfer_read %m[%i, %c0], %p {in_bounds = [true]} : memref<4x6xf32>, vector<6xf32>
  %d2 = vector.extract %d[2] : f32 from vector<6xf32>
  return %a0, %a5, %b1, %c1, %d, %d2 : f32, f32, f32, f32, vector<6xf32>, f32
}"""
    with ir.Context(), ir.Location.unknown():
        module = ir.Module.parse(text)
        jit._scalar_reads(module)
        out = str(module)
    assert out.count("memref.load") == 2 and out.count("vector.transfer_read") == 2 and "vector.load" in out
    assert "memref.load %arg0[%arg1, %c0]" in out and "arith.constant 5 : index" in out
