"""The triangular solve (`tensor.solve_triangular`, gated delta nets' UT transform): its rule against central finite
differences and torch autograd, its backward on the native targets, and torch.compile of transformers' chunked
gated delta rule (Qwen3-Next, Qwen3.5) forward and backward with nothing left to PyTorch."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
from test_torch_training import _trains_as_eager

from sparsa.ir import TensorType
from sparsa.ir.dialects.tensor import SinOp
from sparsa.ir.dialects.tensor_linalg import SolveTriangularOp

from ir_helpers import make_func, roundtrip

torch = pytest.importorskip("torch")
FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (upper, unit)


def _solve_module(dtype: str, upper: bool, unit: bool, shape_a=(2, 5, 5), k: int = 3):
    """f(a, b) = sin(solve(a, b)): the cotangent reaching X differs from element to element."""
    types = [TensorType(dtype, shape_a), TensorType(dtype, shape_a[:-1] + (k,))]

    def body(block, args):
        x = block.append(SolveTriangularOp.build(*args, upper=upper, unit=unit)).result
        return [block.append(SinOp.build(x)).result]

    return roundtrip(make_func("f", types, body, ["a", "b"]))


def _inputs(dtype, shape_a=(2, 5, 5), k: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = shape_a[-1]
    a = (rng.standard_normal(shape_a) * 0.5 + 3 * np.eye(n)).astype(dtype)  # well conditioned either way
    return [a, rng.standard_normal(shape_a[:-1] + (k,)).astype(dtype)]


@pytest.mark.parametrize(("upper", "unit"), FLAGS)
def test_rule_against_finite_differences_and_torch(upper: bool, unit: bool) -> None:
    """float64 on the reference: <dy, J e_i> by central differences, and torch autograd of
    torch.linalg.solve_triangular, equal the backward function's gradients; nothing flows to the entries of A the
    solve does not read (the other triangle, and the diagonal with `unit`)."""
    from sparsa.backends.reference import run_function
    from sparsa.passes import PassManager
    from sparsa.runtime.compiler import grad_pipeline

    grad = PassManager(grad_pipeline("canonicalize,cse,dce").replace(
        "differentiate", "differentiate{residuals=recompute}")).run(_solve_module("f64", upper, unit))
    fwd, back = (f.attributes["sym_name"] for f in grad.funcs)
    xs = _inputs(np.float64)
    (y,) = run_function(grad, xs, func=fwd)
    dy = np.random.default_rng(7).standard_normal(np.shape(y))
    da, db = run_function(grad, [*xs, dy], func=back)
    eps = 1e-6
    for got, k in ((da, 0), (db, 1)):
        want = np.zeros_like(xs[k])
        for i in np.ndindex(xs[k].shape):
            plus, minus = [a.copy() for a in xs], [a.copy() for a in xs]
            plus[k][i] += eps
            minus[k][i] -= eps
            diff = run_function(grad, plus, func=fwd)[0] - run_function(grad, minus, func=fwd)[0]
            want[i] = np.sum(diff * dy) / (2 * eps)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=f"input {k}")
    ta, tb = (torch.tensor(x, requires_grad=True) for x in xs)
    torch.linalg.solve_triangular(ta, tb, upper=upper, unitriangular=unit).sin().backward(torch.tensor(dy))
    np.testing.assert_allclose(da, ta.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(db, tb.grad.numpy(), rtol=1e-9, atol=1e-12)
    n = xs[0].shape[-1]
    unread = np.triu(np.ones((n, n)), 1 - unit) if not upper else np.tril(np.ones((n, n)), unit - 1)
    assert not np.any(da * unread)


@pytest.mark.parametrize("target", ["cpu", "cpu:x86-64-v3", "cpu:x86-64", "triton"])
@pytest.mark.parametrize(("upper", "unit"), FLAGS)
def test_vjp_on_native_targets(target: str, upper: bool, unit: bool, monkeypatch) -> None:
    """m.vjp of the solve on the target equals the reference's, at column counts around the vector widths
    (whole vectors of 4 at a time, single vectors, a masked tail), in AVX-512 (or the host's), AVX2 and SSE code,
    the batch items split over 3 threads."""
    from sparsa.backends import base as backends
    from sparsa.runtime.compiler import CompiledModel

    if target.startswith("cpu"):
        pytest.importorskip("torch_mlir")
        from sparsa.backends.cpu import host
        from sparsa.backends.cpu.target import named_target

        if ":" in target and named_target(target.split(":")[1]).why_not_here() is not None:
            pytest.skip(f"{target} does not run here")
        monkeypatch.setenv("SPARSA_NUM_THREADS", "3")
        monkeypatch.setattr(host, "NATIVE_SPLIT_WORK", 0)  # split however small
    if target == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    for shape_a, k in (((3, 2, 9, 9), 83), ((1, 6, 6), 5)):
        xs = _inputs(np.float32, shape_a, k, seed=k)
        dy = np.random.default_rng(1).standard_normal(shape_a[:-1] + (k,)).astype(np.float32)
        got = {}
        for name in ("reference", target):
            backend = backends.get(name)
            m = CompiledModel(_solve_module("f32", upper, unit, shape_a, k), "f", backend, backend.PIPELINE)
            y, pullback = m.vjp(*xs)
            got[name] = (y, pullback(dy))
        np.testing.assert_allclose(got[target][0], got["reference"][0], rtol=1e-5, atol=1e-5)
        for n in ("a", "b"):
            np.testing.assert_allclose(np.asarray(got[target][1][n]), got["reference"][1][n], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{target}: d{n}")


def test_torch_left_false_and_broadcast_batch_dims_import() -> None:
    """X A = B (left=False) and an A shared by a batch of B's compile whole and equal torch."""
    from sparsa.runtime.torch_backend import SparsaBackend

    pytest.importorskip("torch_mlir")

    def f(a, b, c):
        return (torch.linalg.solve_triangular(a, b, upper=True, left=False)
                + torch.linalg.solve_triangular(a[0], c, upper=False, unitriangular=True).transpose(-1, -2))

    torch.manual_seed(0)
    a = torch.randn(3, 6, 6) + 3 * torch.eye(6)
    b, c = torch.randn(3, 6, 6), torch.randn(3, 6, 6)
    backend = SparsaBackend({"target": "cpu"})
    torch.testing.assert_close(torch.compile(f, backend=backend)(a, b, c), f(a, b, c), rtol=1e-5, atol=1e-5)
    assert not backend.fallbacks, dict(backend.fallbacks)
    solves = [op for part in backend.partitions for op in part.func.walk() if op.NAME == "tensor.solve_triangular"]
    assert sorted((op.upper, op.unit) for op in solves) == [(False, False), (False, True)]


class GatedDeltaNet(torch.nn.Module):
    """Projections into transformers' chunked gated delta rule (Qwen3-Next's, Qwen3.5's): l2-normed q and k,
    sigmoid beta, a softplus log-decay, chunks of 8 solved by two unit lower triangular solves each."""

    def __init__(self, rule, dim: int = 16, heads: int = 2, head_dim: int = 8):
        super().__init__()
        self.rule, self.heads, self.head_dim = rule, heads, head_dim
        self.qkv = torch.nn.Linear(dim, 3 * heads * head_dim)
        self.ab = torch.nn.Linear(dim, 2 * heads)
        self.o = torch.nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, self.head_dim).unbind(2)
        a, b = self.ab(x).view(B, S, 2, self.heads).unbind(2)
        out, _ = self.rule(q, k, v, g=-torch.nn.functional.softplus(a), beta=b.sigmoid(), chunk_size=8,
                           use_qk_l2norm_in_kernel=True)
        return self.o(out.reshape(B, S, -1))


def test_chunked_gated_delta_rule_trains_with_nothing_left_to_pytorch() -> None:
    """Two SGD steps under backend=sparsa equal eager's (losses and every gradient); the triangular solves run in
    Sparsa's partitions forward (the UT transform) and backward (the transposed, upper solve), none in PyTorch."""
    pytest.importorskip("torch_mlir")
    qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    from sparsa.runtime.torch_backend import SparsaBackend

    torch.manual_seed(0)
    model = GatedDeltaNet(qwen3_next.torch_chunk_gated_delta_rule)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 20, 16)  # 20 rows: the rule pads them to 3 chunks of 8
    backend = SparsaBackend({"target": "cpu"})
    _trains_as_eager(model, ref, backend, x)
    assert not backend.fallbacks, dict(backend.fallbacks)
    solves = [op.upper for part in backend.partitions for op in part.func.walk()
              if op.NAME == "tensor.solve_triangular"]
    assert sorted(set(solves)) == [False, True], solves  # lower forward, upper (Aᵀ) backward
