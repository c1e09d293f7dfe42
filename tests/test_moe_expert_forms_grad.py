"""MoE pullbacks of the expert bodies transformers' models write (GPT-OSS's): expert biases before the activation
and after the last matmul, and gate and up read as every other column of one weight, on every target, against
torch autograd."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from test_autodiff import _moe_source, _torch_moe  # noqa: E402

import sparsa  # noqa: E402


@pytest.mark.parametrize("target", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("capacity", [None, 0.6])
def test_moe_layer_with_expert_biases_against_autograd(capacity: float | None, target: str) -> None:
    """Expert biases (GPT-OSS's) before the activation and after the last matmul: the first stage's products as
    grouped matmuls and the bias added to the permuted rows, the last's bias summed over the slots the dispatch
    placed (a capacity drops some); the pullback against torch autograd, with the biases' gradients."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    if target == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    source = _moe_source(2, True, capacity).replace(
        "param w2: f32[E, F, D]", "param w2: f32[E, F, D]\n    param b1: f32[E, F]\n    param b2: f32[E, D]").replace(
        "(silu(h @ w1[e]) * (h @ w3[e])) @ w2[e]", "(silu(h @ w1[e] + b1[e]) * (h @ w3[e])) @ w2[e] + b2[e]")
    m = sparsa.compile(source, target=target).init_weights(5)
    x = np.random.default_rng(5).standard_normal((21, 16)).astype(np.float32)
    dy = np.random.default_rng(8).standard_normal((21, 16)).astype(np.float32)
    y, pullback = m.vjp(x)
    grads = pullback(dy)
    W = {n: torch.tensor(v, requires_grad=True) for n, v in m.weights.items()}
    xt = torch.tensor(x, requires_grad=True)

    def ffn(h, e):
        return (F.silu(h @ W["w1"][e] + W["b1"][e]) * (h @ W["w3"][e])) @ W["w2"][e] + W["b2"][e]

    out = _torch_moe(xt, W, 2, True, capacity, ffn=ffn)
    out.backward(torch.tensor(dy))
    np.testing.assert_allclose(np.asarray(y), out.detach().numpy(), rtol=1e-4, atol=1e-5)
    for n, t in {"x": xt.grad, **{n: t.grad for n, t in W.items()}}.items():
        np.testing.assert_allclose(np.asarray(grads[n]), t.numpy(), rtol=1e-3, atol=2e-5, err_msg=f"{target}: d{n}")
    assert "moe.moe" not in m.ir(grad=True)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_interleaved_gate_and_up_gradients_are_one_concat(target: str) -> None:
    """Experts reading every other column of one weight (GPT-OSS's interleaved gate and up): each slice's gradient
    is put back as one of two interleaved pieces, and their sum is one concat of both (no padded copies added);
    the pullback equals torch autograd's."""
    if target == "cpu":
        pytest.importorskip("torch_mlir")
    src = """model M(x: f32[T, 16], idx: i64[T, 2], w: f32[T, 2], w1: f32[4, 16, 48], w2: f32[4, 24, 16]) -> f32[T, 16] {
    return moe(x, idx, w) |e, h| { (silu(h @ w1[e][:, ::2]) * (h @ w1[e][:, 1::2])) @ w2[e] }
}"""
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((10, 16)).astype(np.float32), np.stack([rng.permutation(4)[:2] for _ in range(10)]),
            rng.random((10, 2)).astype(np.float32), (rng.standard_normal((4, 16, 48)) * 0.3).astype(np.float32),
            (rng.standard_normal((4, 24, 16)) * 0.3).astype(np.float32))
    dy = rng.standard_normal((10, 16)).astype(np.float32)
    m = sparsa.compile(src, target=target)
    y, pullback = m.vjp(*args)
    grads = pullback(dy)
    x, _, w, w1, w2 = (torch.tensor(a, requires_grad=a.dtype == np.float32) for a in args)
    want = torch.zeros(10, 16)
    for t in range(10):
        for j, e in enumerate(args[1][t]):
            h = x[t] @ w1[e]
            want[t] += w[t, j] * ((F.silu(h[::2]) * h[1::2]) @ w2[e])
    want.backward(torch.tensor(dy))
    np.testing.assert_allclose(np.asarray(y), want.detach().numpy(), rtol=1e-4, atol=1e-5)
    for name, t in (("x", x), ("w", w), ("w1", w1), ("w2", w2)):
        np.testing.assert_allclose(np.asarray(grads[name]), t.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    ir = m.ir(grad=True)
    backward = ir[ir.index("@M_bwd"):]
    assert backward.count("tensor.concat") == 1 and "tensor.add" not in "".join(
        line for line in backward.splitlines() if "-> tensor<4x16x48xf32>" in line), backward
