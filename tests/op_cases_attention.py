"""test_ops.py's cases for attention's reverse mode: `attn.attention_lse` and the backward op against torch
autograd in float64, on a masked, soft-capped attention with grouped heads and two fully masked rows."""

from __future__ import annotations

import numpy as np

from sparsa.ir import OP_REGISTRY, scalar

from ir_helpers import region, run_op

B, HQ, HKV, S, DH, CAP = 1, 4, 2, 7, 8, 5.0
rng = np.random.default_rng(77)


def _op(block, name, *args, **attrs):
    return block.append(OP_REGISTRY[name].build(*args, **attrs)).result


def _const(block, value, dtype):
    return _op(block, "tensor.constant", value=value, result_types=[scalar(dtype)])


def _mask(block, args):  # k <= q and q >= 2: rows 0 and 1 allow nothing
    _, _, qi, ki = args
    return [_op(block, "tensor.and", _op(block, "tensor.cmp", ki, qi, pred="le"),
                _op(block, "tensor.cmp", qi, _const(block, 2, "i64"), pred="ge"))]


def _score(block, args):  # CAP * tanh(s / CAP)
    c = _const(block, CAP, "f32")
    return [_op(block, "tensor.mul", c, _op(block, "tensor.tanh", _op(block, "tensor.div", args[0], c)))]


def _score_grad(block, args):  # ds * (1 - tanh(s / CAP)^2)
    s, ds = args[:2]
    t = _op(block, "tensor.tanh", _op(block, "tensor.div", s, _const(block, CAP, "f32")))
    return [_op(block, "tensor.mul", ds, _op(block, "tensor.sub", _const(block, 1.0, "f32"),
                                             _op(block, "tensor.mul", t, t)))]


def _regions(grad: bool):
    idx, f = scalar("i64"), scalar("f32")
    out = [region([idx] * 4, _mask), region([f] + [idx] * 4, _score)]
    return out + [region([f, f] + [idx] * 4, _score_grad)] if grad else out


def _torch_forward(q, k, v):
    import torch

    rep = HQ // HKV
    s = 0.3 * q @ k.repeat_interleave(rep, 1).transpose(-1, -2)
    s = CAP * torch.tanh(s / CAP)
    i = torch.arange(S)
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] >= 2)
    s = s.masked_fill(~allowed, float("-inf"))[..., 2:, :]  # the rows that allow something
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v.repeat_interleave(rep, 1)
    return out, lse


def _data():
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, HQ, S, DH), (B, HKV, S, DH), (B, HKV, S, DH)))
    return q, k, v, rng.standard_normal((B, HQ, S, DH)).astype(np.float32)


def case_attention_lse():
    import torch

    q, k, v, _ = _data()
    out, lse = run_op("attn.attention_lse", [q, k, v], {"scale": 0.3}, regions=_regions(False))
    want_out, want_lse = _torch_forward(*(torch.tensor(x, dtype=torch.float64) for x in (q, k, v)))
    np.testing.assert_allclose(out[..., 2:, :], want_out.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse[..., 2:], want_lse.numpy(), rtol=1e-5, atol=1e-6)
    assert (out[..., :2, :] == 0).all() and np.isposinf(lse[..., :2]).all()


def case_attention_grad():
    """The backward op, fed the forward's lse and delta, give autograd's dq, dk, dv (rows allowing nothing: 0)."""
    import torch

    q, k, v, dout = _data()
    out, lse = run_op("attn.attention_lse", [q, k, v], {"scale": 0.3}, regions=_regions(False))
    delta = (dout.astype(np.float64) * out).sum(-1).astype(np.float32)
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v)]
    want, _ = _torch_forward(*ts)
    want.backward(torch.tensor(dout[..., 2:, :], dtype=torch.float64))
    args = [q, k, v, dout, lse, delta]
    dq, dk, dv = run_op("attn.attention_grad", args, {"scale": 0.3}, regions=_regions(True))
    for got, t in zip((dq, dk, dv), ts, strict=True):
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert (dq[..., :2, :] == 0).all()


CASES = {"attn.attention_lse": case_attention_lse, "attn.attention_grad": case_attention_grad}
