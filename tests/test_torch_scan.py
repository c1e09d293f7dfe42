"""`sparsa::linear_scan` and the fold of parallel prefix scans into it (frontend/torch_scan.py): the op against
a loop and autograd, torch's generic associative scan of the linear recurrence folded at every length (odd ones
interleave with a pad) and along any dim, forward and backward as eager; other combines left as written."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from sparsa.frontend.torch_scan import linear_scan  # noqa: E402
from sparsa.runtime.torch_backend import SparsaBackend  # noqa: E402

associative_scan = pytest.importorskip("torch._higher_order_ops.associative_scan").associative_scan


def loop(a, b, dim, reverse=False):
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.movedim(dim, 0), b.movedim(dim, 0)
    out, h = [], torch.zeros_like(b[0])
    steps = range(len(b) - 1, -1, -1) if reverse else range(len(b))
    for t in steps:
        h = (a[t + 1] * h if t + 1 < len(b) else 0 * h) + b[t] if reverse else a[t] * h + b[t]
        out.append(h)
    return torch.stack(out[::-1] if reverse else out).movedim(0, dim)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("shape_a", "shape_b", "dim"), [((5,), (5,), 0), ((2, 7, 3), (2, 7, 3), 1),
                                                         ((1, 6, 1), (3, 6, 4), 1), ((4, 3), (4, 3), -1)])
def test_linear_scan_op_is_the_recurrence_with_its_gradients(shape_a, shape_b, dim, reverse):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(shape_a, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(shape_b, generator=gen, dtype=torch.float64).requires_grad_()
    torch.testing.assert_close(linear_scan(a, b, dim, reverse), loop(a, b, dim, reverse))
    torch.autograd.gradcheck(lambda x, y: linear_scan(x, y, dim, reverse), (a, b))


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _other(left, right):  # the same pairs composed the other way round: not the forward recurrence
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_l * b_r + b_l


def _compiled(fn, *xs):
    backend = SparsaBackend({"target": "reference"})
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, dynamic=False)(*xs), backend


@pytest.mark.parametrize("L", [2, 3, 8, 13])
@pytest.mark.parametrize("dim", [0, 2])
def test_generic_associative_scans_fold_forward_and_backward(L, dim):
    shape = [2, 3, 4]
    shape[dim] = L
    gen = torch.Generator().manual_seed(L)
    a0, b0 = torch.rand(shape, generator=gen), torch.randn(shape, generator=gen)

    def fn(a, b):
        _, h = associative_scan(_combine, (torch.exp(-a), b), dim, combine_mode="generic")
        return h * 2.0

    want = fn(a0, b0)
    torch.testing.assert_close(want, loop(torch.exp(-a0), b0, dim) * 2.0)
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    got, backend = _compiled(fn, a, b)
    torch.testing.assert_close(got, want)
    assert backend.stats["parallel scans recognized"] == 1
    got.sum().backward()
    a1, b1 = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    fn(a1, b1).sum().backward()
    torch.testing.assert_close(a.grad, a1.grad)
    torch.testing.assert_close(b.grad, b1.grad)
    assert not backend.fallbacks, dict(backend.fallbacks)


def test_other_combines_are_left_as_written():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 9, generator=gen), torch.randn(2, 9, generator=gen)

    def fn(a, b):
        _, h = associative_scan(_other, (a, b), 1, combine_mode="generic")
        return h

    with torch.no_grad():
        got, backend = _compiled(fn, a, b)
    torch.testing.assert_close(got, fn(a, b))
    assert backend.stats["parallel scans recognized"] == 0


def _rotary(x, y):  # GPT-J's rotary embedding slices even and odd elements too
    even, odd = x[..., ::2], x[..., 1::2]
    c, s = y[..., ::2], y[..., 1::2]
    return torch.stack([even * c - odd * s, odd * c + even * s], -1).flatten(-2)


def _one_level(x, y):  # a scan's first combine of pairs (partial results over [0, 1], [2, 3], ..), no more
    return x[..., 1::2] * y[..., ::2] + y[..., 1::2]


@pytest.mark.parametrize("fn", [_rotary, _one_level])
def test_strided_slices_of_other_computations_are_left_as_written(fn):
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 5, 8, generator=gen) for _ in range(2))
    with torch.no_grad():
        got, backend = _compiled(fn, x, y)
    torch.testing.assert_close(got, fn(x, y))
    assert backend.stats["parallel scans recognized"] == 0
