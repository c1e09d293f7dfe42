"""The cpu target's native host (backends/cpu/host.py): one call into native code runs every kernel, on the
workspace it lays out and the OpenMP team it splits work over. Checked against the Python host that runs the
same kernels one by one (SPARSA_NATIVE_HOST=0, bitwise) and against the reference interpreter."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

pytest.importorskip("torch_mlir")

from example_inputs import make_inputs  # noqa: E402

import sparsa  # noqa: E402
from sparsa.backends.cpu.jit import CpuFunction  # noqa: E402
from sparsa.ir.analysis import RuntimeShapeError  # noqa: E402
from sparsa.ir.diagnostics import SparsaError  # noqa: E402

rng = np.random.default_rng(0)

DENSE = """model M(x: f32[T, 32], b: f32[32]) -> (f32[T, 32], f32[T, 32], f32[T, 32], f32[32], f32[T, 4, 8]) {
    param w: f32[32, 32]
    h = relu(x @ w + b)
    y = softmax(h @ w, axis=-1) * mean(h, axis=-1, keepdim=true)
    return y, h, y, b, reshape(y, [T, 4, 8])
}
"""


def _pair(src: str, monkeypatch, target: str = "cpu", **weights):
    """(native, Python host, reference) of one model, the same weights in each."""
    ref = sparsa.compile(src, target="reference")
    native = sparsa.compile(src, target=target)
    monkeypatch.setenv("SPARSA_NATIVE_HOST", "0")
    python = sparsa.compile(src, target=target)
    monkeypatch.delenv("SPARSA_NATIVE_HOST")
    for m in (ref, native, python):
        m.load_weights(weights) if weights else m.init_weights(1)
    return native, python, ref


def test_host_stage_is_one_native_function(monkeypatch):
    native, python, _ = _pair(DENSE, monkeypatch)
    host = native.native.stages["host"]
    at = 0
    for line in ("llvm.func @k0_matmul_add_relu(", "llvm.func @sparsa_parallel(", "llvm.call %pool(",
                 "llvm.func @host_k0_matmul_add_relu_0(%frame: !llvm.ptr)", "llvm.atomicrmw add",
                 "llvm.func @sparsa_main(%argv: !llvm.ptr)", "llvm.call @sparsa_parallel(", "llvm.intr.memcpy"):
        at = host.index(line, at)  # in this order
    assert "llvm.func @sparsa_main" in native.native.stages["llvm"]
    assert native.native.main is not None and python.native.main is None
    assert python.native.stages["host"].startswith("// no native host: SPARSA_NATIVE_HOST=0")


@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("rows", [0, 1, 5, 64, 700, 2049])
def test_native_host_matches_the_python_host_bitwise(monkeypatch, threads, rows):
    """Every result (kernel outputs written in place, an input and a value returned twice copied out, a view),
    at shapes that split over the team and ones that do not."""
    native, python, ref = _pair(DENSE, monkeypatch)
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    x, b = rng.standard_normal((rows, 32), np.float32), rng.standard_normal(32, np.float32)
    got, want, oracle = native(x, b), python(x, b), ref(x, b)
    got = native(x, b)  # the first call packs and caches what only the weights feed on the Python host
    assert native.native.calls["native"] >= 1 and python.native.calls["native"] == 0
    for g, w, o in zip(got, want, oracle, strict=True):
        assert g.shape == o.shape and g.flags.c_contiguous and g.flags.writeable
        assert g.flags.owndata or type(g.base).__name__ == "_Lease"  # its own memory, or a pooled result's
        np.testing.assert_array_equal(g, w)
        np.testing.assert_allclose(g, o, rtol=1e-5, atol=1e-5)


BATCH = """model M(x: f32[B, S, D], y: f32[B, S, D], z: f32[D], w: f32[B, 1, D], u: f32[S, D]) -> (f32[B, S, D],
        f32[B, S, D], f32[B, S, D]) {
    return silu(x) * y + z * w, exp(x) - u, x * 2.0
}"""


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("shape", [(1, 4096, 64), (1, 7, 5), (3, 700, 40)])
def test_elementwise_kernels_at_batch_1_cut_dim_1(monkeypatch, threads, shape):
    """At batch 1 ([1, S, D]) an elementwise kernel is cut along S (dim 0 would be one part): inputs with S whole
    are cut with the result, those that broadcast along it ([B, 1, D], [D]) are not, and an [S, D] input is cut
    along its own dim 0; the native host equal to the Python host bitwise and both to the reference."""
    native, python, ref = _pair(BATCH, monkeypatch)
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    B, S, D = shape
    xs = [rng.standard_normal(s, np.float32) for s in [(B, S, D), (B, S, D), (D,), (B, 1, D), (S, D)]]
    got, want, oracle = native(*xs), python(*xs), ref(*xs)
    for g, w, o in zip(got, want, oracle, strict=True):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_allclose(g, o, rtol=1e-5, atol=1e-5)
    kernels = [k for k in native.native.kernels.values() if k.split == "rows"]
    assert all((k.rows_1 is not None) == (k.outputs[0].type.shape[1] == "S") for k in kernels)
    # silu(x) * y + (z * w): x and y cut, z * w ([B, 1, D]) not; exp(x) - u: u [S, D] along its dim 0; x * 2.0
    assert sorted(str(k.rows_1) for k in kernels if k.rows_1) == ["[1, 0]", "[1, 1, None]", "[1, None]"]


def test_native_host_under_deterministic_splits(monkeypatch):
    monkeypatch.setenv("SPARSA_DETERMINISTIC", "1")
    native, _, _ = _pair(DENSE, monkeypatch)
    x, b = rng.standard_normal((3000, 32), np.float32), rng.standard_normal(32, np.float32)
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
        results.append(native(x, b))
    for other in results[1:]:
        for a, b_ in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(a, b_)


def test_shapes_change_between_calls(monkeypatch):
    """A plan per set of shapes; the workspace grows and is reused; results never alias it."""
    native, _, ref = _pair(DENSE, monkeypatch)
    b = rng.standard_normal(32, np.float32)
    kept = []
    for rows in (3, 900, 2, 900, 17):
        x = rng.standard_normal((rows, 32), np.float32)
        kept.append((x, native(x, b)))
    for x, got in kept:  # earlier results unchanged by later calls
        for g, o in zip(got, ref(x, b), strict=True):
            np.testing.assert_allclose(g, o, rtol=1e-5, atol=1e-5)


def test_inputs_converted_or_refused_as_the_interpreter_does(monkeypatch):
    native, _, ref = _pair(DENSE, monkeypatch)
    x64 = rng.standard_normal((6, 64)).astype(np.float64)[:, ::2]  # float64, strided
    b = rng.standard_normal(32, np.float32)
    for g, o in zip(native(x64, b), ref(x64, b), strict=True):
        np.testing.assert_allclose(g, o, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeShapeError, match=r"input 'x' must have shape f32\[\{T\}, 32\]|dim 1 is 31"):
        native(np.zeros((4, 31), np.float32), b)
    with pytest.raises(RuntimeShapeError, match="element type f32"):
        native(np.zeros((4, 32), np.int32), b)


def test_calls_from_several_threads_at_once(monkeypatch):
    native, _, ref = _pair(DENSE, monkeypatch)
    b = rng.standard_normal(32, np.float32)
    xs = [rng.standard_normal((r, 32), np.float32) for r in (5, 300, 40, 1200)]
    got: dict[int, tuple] = {}

    def work(i: int) -> None:
        for _ in range(20):
            got[i] = native(xs[i], b)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(xs):
        for g, o in zip(got[i], ref(x, b), strict=True):
            np.testing.assert_allclose(g, o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_data_mask_block_maps_are_classified_in_the_native_call(monkeypatch, threads):
    """The document example: its block map classified at each call by a kernel, from the document ids of that
    call, inside the one native call; bitwise the Python host's, which runs the same kernel, and the reference's
    answer for documents in runs, in any order, one token long and all one document."""
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    native, python, ref = _pair(open(_example("document_attention.sp")).read(), monkeypatch)
    assert native.native.main is not None, native.native.host.why_not
    assert "attn_block_map" in native.native.stages["host"]
    for S, doc in ((1, [0]), (70, np.sort(rng.integers(0, 3, 70))), (200, rng.integers(0, 4, 200)),
                   (130, np.zeros(130)), (130, np.arange(130))):
        q, k, v = (rng.standard_normal((1, 2, S, 64), np.float32) for _ in range(3))
        doc = np.asarray(doc, np.int32)
        calls = native.native.calls["native"]
        got = native(q, k, v, doc)
        assert native.native.calls["native"] == calls + 1
        np.testing.assert_array_equal(got, python(q, k, v, doc))
        np.testing.assert_allclose(got, ref(q, k, v, doc), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("example", ["mixtral_moe.sp", "switch_capacity.sp", "tiny_moe_decoder.sp"])
@pytest.mark.parametrize("tokens", [1, 4, 150])
def test_moe_layers_run_natively(monkeypatch, example, tokens):
    """Dispatch (its permutation at its bound, the capacity per set of shapes), the grouped GEMMs on the panels the
    first call packed (segments of one or two rows as a two-row register tile), a combine's parts summed: bitwise the
    Python host's, at decode and at prefill sizes."""
    src = open(_example(example)).read()
    native, python, ref = _pair(src, monkeypatch)
    assert native.native.main is not None, native.native.host.why_not
    assert re.search(r"vector<(1x)?2x\d+xf32>", native.native.stages["loops"])  # whatever the target's tile
    sizes = {"T": tokens, "S": tokens, "B": 1}
    ins = [rng.standard_normal([sizes.get(d, 2) if isinstance(d, str) else d for d in t.shape], np.float32)
           if t.dtype.startswith("f") else rng.integers(0, 50, [sizes.get(d, 2) if isinstance(d, str) else d
                                                                    for d in t.shape]).astype(np.int32)
           for t in native.input_types]
    native(*ins)
    got, want = native(*ins), python(*ins)
    assert native.native.calls["native"] == 1
    for g, w, o in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want, ref(*ins))), strict=True):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_allclose(g, o, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["cpu", "cpu:x86-64-v3", "cpu:x86-64"])
@pytest.mark.parametrize("threads", ["1", "3"])
def test_moe_items_over_weight_groups(monkeypatch, threads, target):
    """Grouped GEMMs whose items are (expert, group of weight panels) over the expert's segment, one panel a group
    here (the machine's L2 gives one group at these sizes): every group of an expert covers its columns once,
    the first zeroes the padding rows, the rows come packed by register tile from pack_rows (Python host) and
    its kernel (native host), bitwise alike, and a deterministic run gives the same bits at any thread count.
    On AVX2 and SSE code the tiles have 6 rows, 11 to a 64-row block (`block_tiles`)."""
    from sparsa.backends.cpu.target import CpuTarget, named_target

    if ":" in target and named_target(target.split(":")[1]).why_not_here() is not None:
        pytest.skip(f"{target} does not run here")
    monkeypatch.setattr(CpuTarget, "weight_group", lambda self, k, weights: 1)
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    src = open(_example("mixtral_moe.sp")).read()
    native, python, ref = _pair(src, monkeypatch, target)
    assert "pack_rows" in native.native.stages["host"]
    assert [k.packed_rows for k in native.native.kernels.values() if k.packed_rows] == \
        [native.native.target.packed_rows]
    for tokens in (150, 64, 3):
        x = rng.standard_normal((tokens, native.input_types[0].shape[1]), np.float32)
        native(x)
        got, want = native(x), python(x)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, ref(x), rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("SPARSA_DETERMINISTIC", "1")
    exact = sparsa.compile(src, target=target).init_weights(1)
    x = rng.standard_normal((150, native.input_types[0].shape[1]), np.float32)
    first = exact(x)
    for n in ("1", "2", "3"):
        monkeypatch.setenv("SPARSA_NUM_THREADS", n)
        np.testing.assert_array_equal(exact(x), first)


def test_an_expert_id_out_of_range_is_the_python_hosts_error():
    src = """model R(x: f32[T, 8], e: i32[T, 2], w: f32[T, 2]) -> f32[T, 8] {
    param w1: f32[4, 8, 8]
    return moe(x, e, w) |i, h| { h @ w1[i] }
}
"""
    m = sparsa.compile(src, target="cpu").init_weights(0)
    x, w = rng.standard_normal((3, 8), np.float32), rng.standard_normal((3, 2), np.float32)
    m(x, np.zeros((3, 2), np.int32), w)
    assert m.native.main is not None, m.native.host.why_not
    with pytest.raises(SparsaError, match="expert id outside 0..3"):
        m(x, np.array([[0, 1], [2, 4], [3, 3]], np.int32), w)
    assert "llvm.call @sparsa_indices_ok_i32(" in m.native.stages["host"]  # checked natively, said by Python


def _example(name: str) -> str:
    from pathlib import Path

    return str(Path(__file__).parent.parent / "examples" / name)


def test_cached_object_keeps_the_entry(monkeypatch, tmp_path):
    """A second compile of the same function loads the object from the disk cache, sparsa_main with it."""
    monkeypatch.setenv("SPARSA_CACHE_DIR", str(tmp_path))
    ref = sparsa.compile(DENSE, target="reference").init_weights(2)
    first = sparsa.compile(DENSE, target="cpu").init_weights(2)
    second = sparsa.compile(DENSE, target="cpu").init_weights(2)
    assert not first.native.cached and second.native.cached and second.native.main is not None
    x, b = rng.standard_normal((9, 32), np.float32), rng.standard_normal(32, np.float32)
    for g, o in zip(second(x, b), ref(x, b), strict=True):
        np.testing.assert_allclose(g, o, rtol=1e-5, atol=1e-5)


def test_direct_function_without_weights():
    """A function called with no weight cache (a fresh dict) still runs natively: nothing weight-only to read."""
    m = sparsa.compile("model M(a: f32[N, 8], b: f32[8, 3]) -> f32[N, 3] {\n  return tanh(a @ b)\n}\n",
                       target="reference")
    fn = CpuFunction(m.module.funcs[-1])
    a, b = rng.standard_normal((11, 8), np.float32), rng.standard_normal((8, 3), np.float32)
    calls = []
    main = fn.main
    fn.main = lambda p: (calls.append(p), main(p))
    np.testing.assert_allclose(fn([a, b], None, {})[0], np.tanh(a @ b), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


VIEWS = """model V(x: f32[T, 12], ids: i32[T]) -> (f32[T, 6], f32[T, 4], f32[T, 5], f32[T, 3], f32[T, 12]) {
    a, b = split(x, [6, 6], axis=1)
    return a[:, ::-1] * 2.0, x[:, 1:9:2] + 1.0, x[:, -5:], b[:, 3:], x[ids] * 1.0
}
"""


@pytest.mark.parametrize("rows", [1, 6, 300])
def test_strided_views_and_gathers_run_natively(monkeypatch, rows):
    """Slices (negative steps and starts) and splits copied out by their kernels; gathers with their index tensors
    checked first: the same results as the Python host and the reference."""
    native, python, ref = _pair(VIEWS, monkeypatch)
    assert native.native.main is not None, native.native.host.why_not
    assert "llvm.call @sparsa_indices_ok_i32(" in native.native.stages["host"]
    x = rng.standard_normal((rows, 12), np.float32)
    ids = rng.integers(-rows, rows, rows).astype(np.int32)
    for g, w, o in zip(native(x, ids), python(x, ids), ref(x, ids), strict=True):
        np.testing.assert_array_equal(g, w)
        np.testing.assert_allclose(g, o, rtol=1e-6)


ROWS_GATHER = """model R(x: f32[N, 3, 5], ids: i64[2, T]) -> f32[2, T, 3, 5] {
    return x[ids]
}
"""


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("T", [1, 7, 3000])
def test_a_gather_of_rows_copies_them_whole(monkeypatch, threads, T):
    """One index tensor (2-D, negative ids among them) into the leading axis of a rank-3 tensor: each picked
    [3, 5] row a contiguous copy, split over the threads; bitwise NumPy's on both hosts."""
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    native, python, _ = _pair(ROWS_GATHER, monkeypatch)
    assert "gather" in native.native.stages["host"]
    x = rng.standard_normal((40, 3, 5), np.float32)
    ids = rng.integers(-40, 40, (2, T))
    for m in (native, python):
        np.testing.assert_array_equal(m(x, ids), x[ids])


def test_an_index_out_of_range_is_the_python_hosts_error(monkeypatch):
    native, python, _ = _pair(VIEWS, monkeypatch)
    x = rng.standard_normal((4, 12), np.float32)
    for m in (native, python):
        with pytest.raises(SparsaError, match="index 4 is out of range for axis 0 of size 4") as e:
            m(x, np.array([0, 4, 1, 2], np.int32))
        assert "<source>:3:70" in str(e.value)  # the gather's place
    np.testing.assert_array_equal(native(x, np.array([0, 3, -4, 2], np.int32))[4], x[[0, 3, 0, 2]])


def test_attention_runs_natively_with_its_block_map_per_shape(monkeypatch):
    """The sliding-window example: its block map classified once per set of sizes, K transposed by a kernel."""
    src = open(_example("sliding_window_attention.sp")).read()
    native, python, ref = _pair(src, monkeypatch)
    assert native.native.main is not None, native.native.host.why_not
    assert "k1_transpose" in native.native.stages["host"] or "_transpose" in native.native.stages["host"]
    for S in (70, 200):
        ins = [rng.standard_normal([S if d == "S" else 2 if isinstance(d, str) else d for d in t.shape], np.float32)
               for t in native.input_types]
        got, want = native(*ins), python(*ins)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, ref(*ins), rtol=1e-5, atol=1e-5)


def test_torch_moe_block_runs_natively_packing_its_weights_each_call():
    """transformers' grouped_mm Mixtral block under torch.compile, parameters read afresh at each call (no
    freezing): the expert weights are packed into panels by a kernel of the native host at every call, from the
    transposes PyTorch's layout makes (no kernel makes those); a write through `.data` is seen."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    config._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(config).eval()
    for p in block.parameters():  # transformers leaves them uninitialised outside a model
        torch.nn.init.normal_(p, std=0.2)
    backend = SparsaBackend({"target": "cpu"})
    compiled = torch.compile(block, backend=backend)
    x = torch.randn(1, 7, 32)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5)
        for p in block.parameters():
            p.data.mul_(1.5)
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5)
    natives = [p.native for p in backend.partitions if getattr(p, "native", None) is not None]
    assert any("pack_panels" in n.stages["host"] for n in natives)
    assert sum(n.calls["native"] for n in natives) >= 2


@pytest.mark.parametrize("target", ["cpu", "cpu:x86-64-v3", "cpu:x86-64"])
@pytest.mark.parametrize("view,E,N,K", [
    ("transpose(wt[:, 5:75, :], [0, 2, 1])", 3, 70, 37),  # a slice of PyTorch's layout: a partial panel, K % lanes
    ("transpose(wt, [0, 2, 1])", 2, 64, 48),  # whole panels, K a multiple of every vector width
    ("wt[:, :, 3:99]", 2, 96, 20),  # columns contiguous in the source
    ("wt[:, :, ::2]", 2, 64, 20),  # every other column (GPT-OSS's interleaved gate): two vectors shuffled into one
    ("wt[:, :, 1::2]", 3, 70, 37),  # the odd ones, the last at the end of the source's row; a partial panel
    ("transpose(wt[:, 1::2, :], [0, 2, 1])", 2, 40, 24),  # strided along PyTorch's N: every other row read
    ("transpose(wt[:, :, ::2], [0, 2, 1])", 2, 64, 48),  # strided along PyTorch's K (GPT-OSS's gate, for dX)
    ("transpose(wt[:, 3:73, 1::2], [0, 2, 1])", 3, 70, 37),  # and the odd ones, K % lanes, a partial panel
    ("wt[:, :, ::3]", 2, 32, 20),  # a step of 3: an element at a time
])
def test_expert_weights_packed_from_their_views_at_each_call(monkeypatch, target, view, E, N, K):
    """Expert weights that are inputs, read through a transpose or a slice (with steps too): packed into panels by
    the native host's pack kernel at every call (vectors along the source's contiguous axis, transposed in
    registers where it is PyTorch's [E, N, K], every other element shuffled out of two), on AVX-512, AVX2 and SSE
    code; bitwise the Python host's NumPy packing, and the
    reference's result. A second call with other weights is packed afresh."""
    from sparsa.backends.cpu.target import named_target

    if ":" in target and named_target(target.split(":")[1]).why_not_here() is not None:
        pytest.skip(f"{target} does not run here")
    shape = {"transpose(wt[:, 5:75, :], [0, 2, 1])": (E, 80, K), "transpose(wt, [0, 2, 1])": (E, N, K),
             "wt[:, :, 3:99]": (E, K, 100), "wt[:, :, ::2]": (E, K, 2 * N), "wt[:, :, 1::2]": (E, K, 2 * N),
             "transpose(wt[:, 1::2, :], [0, 2, 1])": (E, 2 * N, K), "transpose(wt[:, :, ::2], [0, 2, 1])": (E, N, 2 * K),
             "transpose(wt[:, 3:73, 1::2], [0, 2, 1])": (E, 80, 2 * K), "wt[:, :, ::3]": (E, K, 3 * N)}[view]
    head = f"x: f32[T, {K}], idx: i64[T, 2], w: f32[T, 2], wt: f32{list(shape)}, w2: f32[{E}, {N}, {K}]"
    src = f"""model P({head}) -> f32[T, {K}] {{
    wu = {view}
    return moe(x, idx, w) |e, h| {{ silu(h @ wu[e]) @ w2[e] }}
}}
"""
    ref = sparsa.compile(src, target="reference")
    native = sparsa.compile(src, target=target)
    monkeypatch.setenv("SPARSA_NATIVE_HOST", "0")
    python = sparsa.compile(src, target=target)
    monkeypatch.delenv("SPARSA_NATIVE_HOST")
    assert "pack_panels" in native.native.stages["host"] and native.native.main is not None
    for seed in (0, 1):
        r = np.random.default_rng(seed)
        idx = np.stack([r.permutation(E)[:2] for _ in range(50)])
        ins = (r.standard_normal((50, K), np.float32), idx, r.random((50, 2), np.float32),
               r.standard_normal(shape, np.float32) * 0.3, r.standard_normal((E, N, K), np.float32) * 0.3)
        got = native(*ins)
        np.testing.assert_array_equal(got, python(*ins))
        np.testing.assert_allclose(got, ref(*ins), rtol=1e-4, atol=1e-4)
    assert native.native.calls == {"native": 2, "python": 0}


@pytest.mark.parametrize("sq,hq,hk,sk", [(1, 8, 8, 4099), (3, 8, 2, 700), (1, 4, 1, 1), (2, 2, 2, 256)])
def test_decode_attention_reads_k_and_v_in_place(monkeypatch, sq, hq, hk, sk):
    """A few static query rows, no mask: the Flash-Decoding kernels (chunks of keys, merged by log-sum-exp) instead
    of K transposed and the prefill kernel; grouped heads; key counts that do not fill the last chunk."""
    src = f"""model D(q: f32[2, {hq}, {sq}, 64], k: f32[2, {hk}, S, 64], v: f32[2, {hk}, S, 32]) -> f32[2, {hq}, {sq}, 32] {{
    return attention(q, k, v)
}}
"""
    native, python, ref = _pair(src, monkeypatch)
    host = native.native.stages["host"]
    assert "attention_decode" in host and "attention_merge" in host and "transpose" not in host
    q = rng.standard_normal((2, hq, sq, 64), np.float32)
    k, v = rng.standard_normal((2, hk, sk, 64), np.float32), rng.standard_normal((2, hk, sk, 32), np.float32)
    got = native(q, k, v)
    assert native.native.calls["native"] == 1
    np.testing.assert_allclose(got, ref(q, k, v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, python(q, k, v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("example", ["sliding_window_attention.sp", "selective_scan.sp", "sparse_ffn.sp"])
def test_backward_functions_run_natively(monkeypatch, example):
    """m.vjp's backward: attention's (Q^T and dO^T by kernels, per-part dQs zeroed and summed natively), the scan's
    and sparse weights' (broadcasts, scalars among them, copied out by kernels): as the Python host and the
    reference compute them."""
    native, python, ref = _pair(open(_example(example)).read(), monkeypatch)
    ins = make_inputs(native, seed=3)
    results = []
    for m in (native, python, ref):
        y, pullback = m.vjp(*ins)
        dy = np.ones_like(np.asarray(y))
        pullback(dy)
        results.append(pullback(dy))
    assert native._grad.native.calls["native"] >= 1, native._grad.native.host.why_not
    for name in results[0]:
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(results[0][name], results[2][name], rtol=2e-4, atol=2e-4)


SPARSE_3D = """model M(x: f32[B, T, 64]) -> f32[B, T, 48] {
    param a: f32[64, 64] sparse bsr(8, 16)
    param b: f32[64, 48] sparse nm(2, 4)
    return relu(x @ a) @ b
}
"""


@pytest.mark.parametrize("shape", [(1, 5), (3, 70)])
def test_sparse_weight_matmuls_run_natively_on_rows(monkeypatch, shape):
    """BSR and N:M matmuls take x and write the result as 2-D rows: views of the 3-D buffers, split over threads."""
    native, python, ref = _pair(SPARSE_3D, monkeypatch)
    x = rng.standard_normal((*shape, 64), np.float32)
    native(x)
    got = native(x)
    assert native.native.calls["native"] >= 1, native.native.host.why_not
    np.testing.assert_array_equal(got, python(x))
    np.testing.assert_allclose(got, ref(x), rtol=1e-5, atol=1e-5)


MASKED_DECODE = """mask recent(q, k; pos: i32[1], keep: i32[S]) = k <= pos[0] + q and pos[0] + q - k < 300 and keep[k] != 0
score capped(s, q, k) = 5.0 * tanh(s / 5.0)

model D(q: f32[1, 4, 2, 64], k: f32[1, 2, S, 64], v: f32[1, 2, S, 64], pos: i32[1], keep: i32[S]) -> f32[1, 4, 2, 64] {
    return attention(q, k, v, mask=recent(pos=pos, keep=keep), score=capped)
}
"""


@pytest.mark.parametrize("sk,at", [(1000, 998), (600, 0), (5, 3)])
def test_decode_attention_with_a_mask_its_data_and_a_score_modifier(monkeypatch, sk, at):
    """Decode against a cache: a window ending at the query's position (data), keys dropped by a data mask, a
    softcap; chunks with nothing allowed (at=0: every chunk but the first) weigh nothing, rows with nothing
    allowed give zeros."""
    native, python, ref = _pair(MASKED_DECODE, monkeypatch)
    assert "attention_decode" in native.native.stages["host"]
    q = rng.standard_normal((1, 4, 2, 64), np.float32)
    k, v = rng.standard_normal((1, 2, sk, 64), np.float32), rng.standard_normal((1, 2, sk, 64), np.float32)
    pos, keep = np.array([at], np.int32), (rng.random(sk) > 0.3).astype(np.int32)
    got = native(q, k, v, pos, keep)
    assert native.native.calls["native"] == 1
    np.testing.assert_allclose(got, ref(q, k, v, pos, keep), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, python(q, k, v, pos, keep), rtol=1e-5, atol=1e-6)


def test_decode_attention_writes_the_log_sum_exp_the_backward_reads(monkeypatch):
    """m.vjp of a decode-shaped attention: its saved forward is attn.attention_lse, whose decode merge also writes
    each row's log-sum-exp (+inf where nothing is allowed); the gradients match the reference's."""
    src = """mask upto(q, k) = k <= q + 650
score capped(s, q, k) = 5.0 * tanh(s / 5.0)

model D(q: f32[1, 4, 2, 64], k: f32[1, 2, S, 64], v: f32[1, 2, S, 64]) -> f32[1, 4, 2, 64] {
    return attention(q, k, v, mask=upto, score=capped)
}
"""
    native, _, ref = _pair(src, monkeypatch)
    q = rng.standard_normal((1, 4, 2, 64), np.float32)
    k, v = rng.standard_normal((1, 2, 700, 64), np.float32), rng.standard_normal((1, 2, 700, 64), np.float32)
    ins = [q, k, v]
    dy = rng.standard_normal((1, 4, 2, 64), np.float32)
    got, want = native.vjp(*ins)[1](dy), ref.vjp(*ins)[1](dy)
    assert "attention_merge" in native._grad.forward.stages["host"]
    for name in ("q", "k", "v"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_plans_dropped_by_one_thread_are_not_read_through_another_threads_argv(monkeypatch):
    """Past 256 sets of shapes the plans are dropped (a growing KV cache); a thread whose argv was made from a
    dropped plan (whose arrays, here a block map of the call's sizes, are gone) makes a new one from the new plan."""
    import queue

    src = open(_example("sliding_window_attention.sp")).read()
    native, _, ref = _pair(src, monkeypatch)
    fn = native.native

    def inputs(s: int) -> list[np.ndarray]:
        return [np.random.default_rng(s).standard_normal((1, s, 512), np.float32)]

    jobs: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def worker() -> None:  # one thread, its argv cache kept between its calls
        while (s := jobs.get()) is not None:
            try:
                out = native(*inputs(s))
                argvs = fn._scratch.__dict__["argv"]
                done.put((out, all(m[-1] is fn._plans[k] for k, m in argvs.items() if k in fn._plans)))
            except Exception as e:  # said in the test's thread, never a hang
                done.put((e, False))

    thread = threading.Thread(target=worker)
    thread.start()
    jobs.put(70)
    done.get(timeout=120)
    for s in range(1, 260):  # then this thread needs a new plan past 256 and drops them all
        fn._plans.setdefault(("stand-in", s), None)
    native(*inputs(71))
    jobs.put(70)
    got, fresh = done.get(timeout=120)
    jobs.put(None)
    thread.join()
    assert fresh
    np.testing.assert_allclose(got, ref(*inputs(70)), rtol=1e-4, atol=1e-4)


SLICES = """model M(x: f32[B, L]) -> (f32[B, L], f32[B, L], f32[B, 2]) {
    c = cumsum(x, axis=1)
    return c - c[:, -1:], x - x[:, -2:-1] + x[:, :1], x[:, -2:] * 2.0
}"""


@pytest.mark.parametrize("L", [2, 3, 17])
def test_slices_from_the_end_of_a_symbolic_axis_broadcast(monkeypatch, L):
    """c[:, -1:] of L columns is one column in its type, a dim the kernels broadcast. It had been `?`, which they
    read as L, past the end of the one column (torch.compile(dynamic=True) of a cumsum less its last: wrong sums)."""
    native, python, ref = _pair(SLICES, monkeypatch)
    assert "tensor<{B}x1xf32>" in ref.ir() and "tensor<{B}x2xf32>" in ref.ir() and "x?x" not in ref.ir()
    x = rng.standard_normal((3, L), np.float32)
    c = x.cumsum(1)
    want = [c - c[:, -1:], x - x[:, -2:-1] + x[:, :1], x[:, -2:] * 2]
    for m in (native, python, ref):
        for g, w in zip(m(x), want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_one_size_written_two_ways_is_cut_as_one(monkeypatch, threads):
    """`1+L-1` rows (a concat of x[:1] and x[1:]) and `2+L-2` are both L: the host cuts both operands of their sum
    with its rows. It had compared the texts and read the second whole in every part (a slice's backward put back
    under torch.compile(dynamic=True) of Mamba: wrong gradients from 32 tokens on, at two threads)."""
    native, python, ref = _pair("model M(x: f32[L, 64]) -> f32[L, 64] {\n    a = concat([x[:1], exp(x[1:])], axis=0)\n"
                                "    b = concat([x[:2] * 2.0, x[2:]], axis=0)\n    return a + b\n}", monkeypatch)
    assert "tensor<{1+L-1}x64xf32>" in ref.ir() and "tensor<{2+L-2}x64xf32>" in ref.ir()
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    x = rng.standard_normal((700, 64), np.float32)
    want = np.concatenate([x[:1], np.exp(x[1:])]) + np.concatenate([x[:2] * 2, x[2:]])
    for m in (native, python, ref):
        np.testing.assert_allclose(m(x), want, rtol=1e-5, atol=1e-5)


def test_bounds_past_a_symbolic_axis_and_unknown_dims_that_broadcast_are_errors(monkeypatch):
    """What the types took for granted is checked at each call, on every host: a slice's bounds lie inside the
    axis (x[:, -2:] of one column), and a dim of unknown size (x[:, -5:1]: 1 column where L is 5, none
    otherwise) is the result's, never a broadcast 1 (a kernel would read past it)."""
    native, python, ref = _pair(SLICES, monkeypatch)
    for m in (native, python, ref):
        with pytest.raises(RuntimeShapeError, match=r":3:\d+: error: .*'tensor.slice'.* has 0 at dim 1"):
            m(np.ones((2, 1), np.float32))
    native, python, ref = _pair("model M(x: f32[B, L]) -> f32[B, L] {\n    return x - x[:, -5:1]\n}", monkeypatch)
    for m in (native, python, ref):
        for L, n in ((5, 1), (6, 0)):
            with pytest.raises(RuntimeShapeError, match=rf":2:14: error: 'tensor.sub': operand 1 \(tensor<{{B}}x\?"
                               rf"xf32>\) has {n} at dim 1, .* against {L} in the result; .* does not broadcast"):
                m(np.ones((2, L), np.float32))
    views = _pair("model M(x: f32[B, K], y: f32[B, L]) -> f32[B, L] {\n    return reshape(x * 2.0, [B, L]) + y\n}",
                  monkeypatch)
    for m in views:  # a reshape over symbols the types cannot prove equal in count: 6 elements to 10
        np.testing.assert_allclose(m(np.ones((2, 4), np.float32), np.ones((2, 4), np.float32)), np.full((2, 4), 3))
        with pytest.raises(SparsaError, match=r":2:12: error: 'tensor.reshape'.* size 6 .*|:2:12: error: "
                           r"'tensor.reshape' of an operand of shape \[2, 3\] \(6 elements\) to .* \(10 elements\)"):
            m(np.ones((2, 3), np.float32), np.ones((2, 5), np.float32))
    batch = _pair("model M(x: f32[B, 4, 8], w: f32[B, 8, 3]) -> f32[B, 4, 3] {\n    return x[-5:1] @ w\n}",
                  monkeypatch)
    inner = _pair("model M(x: f32[4, K], v: f32[1, 3]) -> f32[4, 3] {\n    return x[:, -5:1] @ v\n}", monkeypatch)
    x, w = np.ones((5, 4, 8), np.float32), np.ones((5, 8, 3), np.float32)
    for m in batch:  # a batch dim of unknown size, 1 where B is 5
        with pytest.raises(RuntimeShapeError, match=r":2:20: error: 'tensor.matmul': operand 0 \(tensor<\?x4x8xf32>\) "
                           r"has 1 at dim 0, .* against 5 in the result; a dim of unknown size does not broadcast"):
            m(x, w)
    for m in inner:  # a contracted dim of unknown size, none where K is 6
        np.testing.assert_allclose(m(np.ones((4, 5), np.float32), np.ones((1, 3), np.float32)), np.ones((4, 3)))
        with pytest.raises(RuntimeShapeError, match=r":2:23: error: 'tensor.matmul': operand 0 \(tensor<4x\?xf32>\) "
                           r"has 0 at dim 1, .* against 1 in operand 1; the contracted dims differ"):
            m(np.ones((4, 6), np.float32), np.ones((1, 3), np.float32))


LINEAR = """model LA(q: f32[B, H, L, 12], k: f32[B, H, L, 12], v: f32[B, H, L, 20], g: f32[B, H, L]) -> f32[B, H, L, 20] {
    h = scan(sigmoid(g)[:, :, :, None, None], k[:, :, :, :, None] * v[:, :, :, None, :], axis=2)
    return sum(h * q[:, :, :, :, None], axis=-2)
}
"""


@pytest.mark.parametrize("threads", ["1", "3"])
@pytest.mark.parametrize("b,h,length", [(2, 3, 45), (1, 1, 1), (3, 2, 0)])
def test_matrix_state_scans_run_natively_as_sequences(monkeypatch, threads, b, h, length):
    """`scan.linear_attention` reads q, k, v and the decay, and writes its result, as [B*H, L, .] sequences: views of
    their buffers, split over the team; one whose operands broadcast keeps the Python host and says so."""
    native, python, ref = _pair(LINEAR, monkeypatch)
    assert "scan.linear_attention" in native.ir()
    monkeypatch.setenv("SPARSA_NUM_THREADS", threads)
    ins = [rng.standard_normal(s, np.float32) for s in ((b, h, length, 12), (b, h, length, 12), (b, h, length, 20),
                                                         (b, h, length))]
    got = native(*ins)
    assert native.native.calls["native"] == 1, native.native.host.why_not
    np.testing.assert_array_equal(got, python(*ins))
    np.testing.assert_allclose(got, ref(*ins), rtol=1e-5, atol=1e-5)
    shared = sparsa.compile(LINEAR.replace("k: f32[B, H, L, 12]", "k: f32[1, H, L, 12]"), target="cpu")
    assert shared.native.host.why_not == "the host side of 'scan.linear_attention' broadcasting its operands is still Python"
