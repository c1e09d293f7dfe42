"""Training on the cpu target: a MoE layer's saved forward (its training form: the products the backward reads
kept) and its backward run on the native host, with values of a dispatch's length at its bound; the workspace
lets temporaries whose lifetimes do not meet share bytes; results come from a pool of reused memory;
SPARSA_PROFILE=1 times each kernel; the Python host lets each value go after its last read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_mlir")

from example_inputs import SIZES, make_inputs  # noqa: E402

import sparsa  # noqa: E402
from sparsa.backends.cpu import outputs  # noqa: E402
from sparsa.backends.cpu.jit import _last_reads  # noqa: E402
from sparsa.ir import parse_module  # noqa: E402
from sparsa.ir.types import numpy_dtype  # noqa: E402

EXAMPLES = Path(__file__).parent.parent / "examples"
MOE = ["mixtral_moe.sp", "switch_capacity.sp", "tiny_moe_decoder.sp"]


def _models(example: str, monkeypatch) -> tuple:
    """(native, Python host, reference) of one example, the same weights in each."""
    src = (EXAMPLES / example).read_text()
    native = sparsa.compile(src, target="cpu")
    monkeypatch.setenv("SPARSA_NATIVE_HOST", "0")
    python = sparsa.compile(src, target="cpu")
    monkeypatch.delenv("SPARSA_NATIVE_HOST")
    ref = sparsa.compile(src, target="reference")
    for m in (native, python, ref):
        m.init_weights(2)
    return native, python, ref


@pytest.mark.parametrize("example", MOE)
@pytest.mark.parametrize("tokens", [1, 37, 150])
def test_moe_training_runs_on_the_native_host(monkeypatch, example, tokens):
    """Both halves native from the second call (the first packs the weights on the Python host); the saved
    forward's residuals of a dispatch's length at its bound (perm -1 past offsets[E]); every gradient as the
    Python host's, which takes those longer residuals as it takes the segments' own padding, and the reference's."""
    native, python, ref = _models(example, monkeypatch)
    ins = make_inputs(native, seed=tokens, sizes={**SIZES, "T": tokens, "S": tokens, "B": 1})
    dy = np.random.default_rng(1).standard_normal(np.shape(ref(*ins))).astype(np.float32)
    want = ref.vjp(*ins)[1](dy)
    for _ in range(2):
        y, pullback = native.vjp(*ins)
        got = pullback(dy)
    grad = native._grad
    assert grad.forward.calls["native"] == 1 and grad.native.calls["native"] == 1, grad.native.host.why_not
    both = native._run(grad.forward, list(ins), grad.cache)
    returned = grad.forward.func_op.regions[0].block.ops[-1].operands
    dispatch = next(v.owner for v in returned if getattr(v.owner, "NAME", "") == "moe.dispatch")
    perm, offsets = (both[returned.index(r)] for r in dispatch.results)
    assert perm.shape[0] > offsets[-1] and (perm[offsets[-1]:] == -1).all()  # at its bound, past the segments
    saved = both[1:]
    on_python = python._run(python._backward().native, [*saved, dy], python._grad.cache)
    for name, g in got.items():  # float32 sums of many terms: within a share of the gradient's largest entry
        scale = float(np.abs(want[name]).max()) + 1e-3
        np.testing.assert_allclose(g, want[name], rtol=1e-4, atol=2e-5 * scale, err_msg=name)
        np.testing.assert_allclose(g, on_python[grad.names.index(name)], rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    np.testing.assert_allclose(y, ref(*ins), rtol=1e-4, atol=1e-5)


def test_moe_backward_reads_the_saved_products():
    """The training form: the saved forward computes each SwiGLU product once and keeps it, and keeps the down
    projection fused with the combine (the gates' gradient comes from dY's rows through W2^T, the GEMM dH needs
    anyway), not silu(h1) (made again in the backward's elementwise kernel, from h1); the backward runs the three
    GEMMs of dX and dH and the three weight gradients, and computes no product of the forward again."""
    m = sparsa.compile(EXAMPLES / "mixtral_moe.sp", target="cpu").init_weights(0)
    module = parse_module(m.ir(grad=True))
    model, fwd, bwd = module.funcs
    ops = {f: [op.NAME for op in f.walk()] for f in (model, fwd, bwd)}
    assert ops[model].count("moe.grouped_matmul") == 1 and "moe.grouped_matmul_combine" in ops[model]
    assert ops[fwd].count("moe.grouped_matmul") == 2 and ops[fwd].count("moe.grouped_matmul_combine") == 1
    assert ops[bwd].count("moe.grouped_matmul") == 3 and ops[bwd].count("moe.grouped_weight_grad") == 3
    saved = [v.defining_op.NAME for v in fwd.regions[0].block.ops[-1].operands if v.defining_op]
    assert "tensor.silu" not in saved and saved.count("moe.grouped_matmul") == 2, saved
    m.vjp(x := np.ones((5, 512), np.float32))[1](x)
    kernels = [launch.kernel.name for launch in m._grad.native.host.launches]
    assert not [k for k in kernels if "silu" in k and "fused" not in k], kernels


CLAMPED_GLU = """
model G(x: f32[T, 16], wg: f32[16, 32], wu: f32[16, 32], wd: f32[32, 16]) -> f32[T, 16] {
    g = min(x @ wg, 7.0)
    u = min(max(x @ wu, -7.0), 7.0)
    return ((u + 1.0) * (g * sigmoid(g * 1.702))) @ wd
}
"""


@pytest.mark.parametrize("tokens", [3, 70])
def test_elementwise_residuals_are_made_again_in_fused_backward_kernels(tokens):
    """GPT-OSS's clamped, gated activation: the saved forward keeps the two GEMMs' outputs and the activation the
    down projection reads (stored anyway), not the clamps and the sigmoid between them (`differentiate` makes
    those again in the backward); the backward's kernels make each value read by several of the gradient's
    elementwise steps again in each reader's kernel (none stored by a kernel of its own); the gradients as the
    reference's and as one function that recomputes the whole forward."""
    m = sparsa.compile(CLAMPED_GLU, target="cpu").init_weights(0)
    ref = sparsa.compile(CLAMPED_GLU, target="reference").init_weights(0)
    recompute = sparsa.compile(CLAMPED_GLU, target="reference", passes="differentiate{residuals=recompute}")
    module = parse_module(m.ir(grad=True))
    fwd = module.funcs[-2]
    saved = [v.defining_op.NAME for v in fwd.regions[0].block.ops[-1].operands[1:] if v.defining_op]
    assert sorted(saved) == ["tensor.matmul"] * 2 + ["tensor.mul"], saved  # and inputs
    ins = make_inputs(m, seed=tokens, sizes={**SIZES, "T": tokens})
    dy = np.random.default_rng(tokens).standard_normal((tokens, 16)).astype(np.float32)
    got = m.vjp(*ins)[1](dy)
    kernels = [launch.kernel.name for launch in m._grad.native.host.launches]
    assert not [k for k in kernels if k.split("_", 1)[1] in ("tensor_minimum", "tensor_maximum", "tensor_sigmoid",
                                                             "fused_mul_sigmoid")], kernels
    for want in (ref.vjp(*ins)[1](dy), recompute.init_weights(0).vjp(*ins)[1](dy)):
        for name, g in want.items():
            np.testing.assert_allclose(got[name], g, rtol=1e-4, atol=1e-5, err_msg=name)


def test_temporaries_share_workspace_bytes_only_when_their_lifetimes_do_not_meet():
    """Brute force over every example's functions and backward: two temporaries alive at one launch never
    overlap, and the workspace is smaller than the temporaries laid end to end where some die early."""
    shared = 0
    for name in ["mixtral_moe.sp", "tiny_moe_decoder.sp", "sliding_window_attention.sp", "selective_scan.sp",
                 "sparse_ffn.sp"]:
        m = sparsa.compile(EXAMPLES / name, target="cpu").init_weights(0)
        ins = make_inputs(m, seed=0)
        for _ in range(2):
            y = m(*ins)
            m.vjp(*ins)[1](*[np.ones_like(v) for v in (y if isinstance(y, tuple) else (y,))])
        for fn in (m.native, m._grad.forward, m._grad.native):
            host = fn.host
            if host.why_not is not None:
                continue
            known = _shapes(fn, host)
            if known is None:
                continue
            offsets, total = host._offsets(known)
            temps = [p.value for p in host.places.values() if p.kind == "temp"]
            size = {id(v): int(np.prod(known[id(v)])) * numpy_dtype(v.type.dtype).itemsize for v in temps}
            for i, a in enumerate(temps):
                fa, la = host.lifetimes.get(id(a), (-1, len(host.launches)))
                assert offsets[id(a)] % 64 == 0 and offsets[id(a)] + size[id(a)] <= total
                for b in temps[i + 1:]:
                    fb, lb = host.lifetimes.get(id(b), (-1, len(host.launches)))
                    if fa <= lb and fb <= la and size[id(a)] and size[id(b)]:
                        assert (offsets[id(a)] + size[id(a)] <= offsets[id(b)]
                                or offsets[id(b)] + size[id(b)] <= offsets[id(a)]), (name, a, b)
            laid_end_to_end = sum(-(-s // 64) * 64 for s in size.values())
            shared += total < laid_end_to_end
    assert shared >= 3


def _shapes(fn, host):
    """Every value's shape in the function's last plan (its argv's dims), or None before a native call."""
    for plan in fn._plans.values():
        known = {}
        at = host.tail
        for place in host.places.values():
            i = place.dims - at
            known[id(place.value)] = tuple(plan.tail[i:i + place.rank])
        return known
    return None


def test_results_come_from_a_pool_of_reused_memory():
    """A large result's memory is reused once the array and every view of it are gone (a torch tensor made from
    it counts as a view); small results are plain arrays."""
    shape = (512, 256)
    a = outputs.empty(shape, np.float32)
    where = a.__array_interface__["data"][0]
    view = a[3:]
    del a
    b = outputs.empty(shape, np.float32)  # the view keeps a's memory: b is other memory
    assert b.__array_interface__["data"][0] != where and b.flags.c_contiguous and b.flags.writeable
    del view
    c = outputs.empty((256, 512), np.float32)  # the same bytes: a's memory again
    assert c.__array_interface__["data"][0] == where and c.shape == (256, 512)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(c)
    del c
    d = outputs.empty(shape, np.float32)
    assert d.__array_interface__["data"][0] != where
    del t, d
    assert outputs.empty((8, 8), np.float32).base is None


def test_native_results_reuse_the_last_calls_memory():
    m = sparsa.compile(EXAMPLES / "mixtral_moe.sp", target="cpu").init_weights(0)
    x = np.random.default_rng(0).standard_normal((300, 512)).astype(np.float32)
    want = m(x)  # (packs the weights on the Python host)
    first = m(x)
    where = first.__array_interface__["data"][0]
    del first
    again = m(x)
    assert m.native.calls["native"] == 2 and again.__array_interface__["data"][0] == where
    np.testing.assert_array_equal(again, want)


def test_profile_times_each_kernel(monkeypatch):
    src = (EXAMPLES / "mixtral_moe.sp").read_text()
    plain = sparsa.compile(src, target="cpu").init_weights(0)
    assert "compiled without SPARSA_PROFILE=1" in plain.profile()
    monkeypatch.setenv("SPARSA_PROFILE", "1")
    m = sparsa.compile(src, target="cpu").init_weights(0)
    x = np.random.default_rng(0).standard_normal((200, 512)).astype(np.float32)
    for _ in range(3):
        m(x)
    assert "sparsa_now" in m.native.stages["host"]
    rows = m.native.profile()
    assert [r[0] for r in rows] == [launch.kernel.name for launch in m.native.host.launches]
    assert sum(ms for *_, ms in rows) > 0 and all(ms >= 0 for *_, ms in rows)
    text = m.profile()
    assert "MixtralMoE: 2 native call(s)" in text and "moe.grouped_matmul" in text
    assert text.splitlines()[1].split()[0] == f"{max(ms for *_, ms in rows) / 2:.3f}"  # largest first, per call


def test_the_python_host_lets_values_go_after_their_last_read():
    module = parse_module("""module {
  func.func @F(%x: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
    %0 = tensor.exp(%x) : (tensor<4xf32>) -> tensor<4xf32>
    %1 = tensor.add(%0, %x) : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
    %2 = tensor.mul(%1, %1) : (tensor<4xf32>, tensor<4xf32>) -> tensor<4xf32>
    func.return(%2, %0) : (tensor<4xf32>, tensor<4xf32>) -> ()
  }
}""")
    f = module.funcs[0]
    block = f.regions[0].block
    x = block.args[0]
    v0, v1 = block.ops[0].result, block.ops[1].result
    dead = _last_reads(f)
    assert dead == {1: [id(x)], 2: [id(v1)]}  # %0 is returned: kept; %2 never read after it is made
    assert id(v0) not in sum(dead.values(), [])


FUSABLE = """model M(a: f32[T, 48], b: f32[T, 48], c: f32[48], m: bool[T, 48]) -> (f32[T, 48], f32[T, 48], f32[T, 48]) {
    s = sigmoid(a)
    y = silu(a) * b + c * 2.0
    z = where(a > b, s * y, y - s)
    w = where(m, z, 0.0)
    return y, z, w
}
"""


@pytest.mark.parametrize("rows", [1, 37, 700])
def test_elementwise_chains_run_as_one_kernel(monkeypatch, rows):
    """silu, mul and the add that only feed one another are one kernel (`c * 2.0`, of another shape, is not
    computed again per row: a kernel of its own); `y`, returned, ends its group; `s`, read twice inside `z`'s
    group only, is made there (`fused_groups`: never stored); the comparison inside `z`'s group stays a register,
    never a bool tensor; `w` reads a bool input and stays apart. Native and Python hosts agree bitwise, and with
    the reference."""
    src = FUSABLE
    native = sparsa.compile(src, target="cpu")
    monkeypatch.setenv("SPARSA_NATIVE_HOST", "0")
    python = sparsa.compile(src, target="cpu")
    monkeypatch.delenv("SPARSA_NATIVE_HOST")
    ref = sparsa.compile(src, target="reference")
    names = sorted(k.name for k in native.native.kernels.values())
    assert any("fused_silu_mul_add" in n for n in names) and any(n.endswith("tensor_mul") for n in names), names
    assert any("fused_sigmoid_cmp_mul_sub_and_1_more" in n for n in names), names
    assert sum("fused" in n for n in names) == 2 and any(n.endswith("_tensor_where") for n in names), names
    rng = np.random.default_rng(rows)
    ins = [rng.standard_normal((rows, 48)).astype(np.float32), rng.standard_normal((rows, 48)).astype(np.float32),
           rng.standard_normal(48).astype(np.float32), rng.random((rows, 48)) > 0.5]
    got, again, want = native(*ins), python(*ins), ref(*ins)
    assert native.native.calls["native"] == 1
    for g, p, r in zip(got, again, want, strict=True):
        np.testing.assert_array_equal(g, p)
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


SUMMED = """model M(h: f32[T, 8, 16], c: f32[T, 1, 16], d: f32[8]) -> (f32[T, 8], f32[T, 8, 1], f32[16]) {
    y = sum(h * c, axis=-1)
    z = sum(exp(h) * c + 1.0, axis=2, keepdim=true)
    w = sum(sum(h * h, axis=1), axis=0)
    return y + d, z, w
}
"""


@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("native_host", ["1", "0"])
def test_a_sum_ends_an_elementwise_chain(monkeypatch, rows, native_host):
    """sum(h * c) sums the products as they are made (c read broadcast); with keepdim, over a middle axis and
    under another sum; on both hosts, split by rows or not, as the reference."""
    monkeypatch.setenv("SPARSA_NATIVE_HOST", native_host)
    cpu = sparsa.compile(SUMMED, target="cpu")
    names = [k.name for k in cpu.native.kernels.values()]
    assert sum(n.endswith(("_fused_mul_sum", "_fused_exp_mul_add_sum")) for n in names) == 3, names
    ref = sparsa.compile(SUMMED, target="reference")
    rng = np.random.default_rng(rows)
    ins = [rng.standard_normal((rows, 8, 16)).astype(np.float32),
           rng.standard_normal((rows, 1, 16)).astype(np.float32), rng.standard_normal(8).astype(np.float32)]
    for g, r in zip(cpu(*ins), ref(*ins), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_a_fused_sum_over_a_dim_of_size_one():
    """Found by the random-program test: a chain summed over a dim of size 1 that no input is broadcast along
    (the loop nest reads it by its index; read as a constant 0 the transform interpreter crashed)."""
    src = """model M(a: f32[3, 1], b: f32[3, 1]) -> f32[3, 1] {
    return sum(where(b <= a, a, b), axis=1, keepdim=true)
}
"""
    cpu = sparsa.compile(src, target="cpu")
    assert any("fused" in k.name for k in cpu.native.kernels.values())
    a, b = np.array([[1.0], [2.0], [-1.0]], np.float32), np.array([[0.5], [3.0], [-1.0]], np.float32)
    np.testing.assert_array_equal(cpu(a, b), np.maximum(a, b))
