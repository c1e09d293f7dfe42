"""Every registered op: an example that round-trips and verifies, and its reference semantics vs NumPy.

The registry test at the bottom fails when an op is added without a case here.
"""

from __future__ import annotations

import math

import numpy as np
import op_cases_attention
import pytest

from sparsa.ir import OP_REGISTRY, TensorType, scalar
from sparsa.ir.dialects.tensor import AddOp, CmpOp, MulOp
from sparsa.ir.dialects.tensor_shape import GatherOp, MatmulOp

from ir_helpers import region, run_op

rng = np.random.default_rng(1234)


def randn(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(x.astype(np.float64))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


X = randn(3, 4)
Y = randn(3, 4)
POS = np.abs(randn(3, 4)) + 0.1
I = rng.integers(-7, 7, size=(3, 4)).astype(np.int64)
J = np.where(rng.integers(1, 5, size=(3, 4)) % 2 == 0, 3, -2).astype(np.int64)
B1 = rng.random((3, 4)) > 0.5
B2 = rng.random((1, 4)) > 0.5

# name -> (inputs, attrs, expected outputs as a function of the inputs)
UNARY = {
    "tensor.neg": (X, lambda x: -x), "tensor.abs": (X, np.abs), "tensor.relu": (X, lambda x: np.maximum(x, 0)),
    "tensor.exp": (X, np.exp), "tensor.log": (POS, np.log), "tensor.sqrt": (POS, np.sqrt),
    "tensor.rsqrt": (POS, lambda x: 1 / np.sqrt(x)), "tensor.tanh": (X, np.tanh),
    "tensor.sin": (X, np.sin), "tensor.cos": (X, np.cos), "tensor.sigmoid": (X, lambda x: 1 / (1 + np.exp(-x))),
    "tensor.silu": (X, lambda x: x / (1 + np.exp(-x))),
    "tensor.gelu": (X, lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))),
    "tensor.gelu_tanh": (X, lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))),
    "tensor.softplus": (X, lambda x: np.log1p(np.exp(x))),
    "tensor.not": (B1, np.logical_not),
}
BINARY = {
    "tensor.add": (X, Y[:1], np.add), "tensor.sub": (X, Y, np.subtract), "tensor.mul": (X, Y[:, :1], np.multiply),
    "tensor.div": (X, POS, np.divide), "tensor.floordiv": (I, J, lambda a, b: np.array(
        [[int(x) // int(y) for x, y in zip(r, s, strict=True)] for r, s in zip(a, b, strict=True)])),
    "tensor.mod": (I, J, lambda a, b: np.array(
        [[int(x) % int(y) for x, y in zip(r, s, strict=True)] for r, s in zip(a, b, strict=True)])),
    "tensor.pow": (POS, Y, np.power), "tensor.minimum": (X, Y, np.minimum), "tensor.maximum": (X, Y, np.maximum),
    "tensor.and": (B1, B2, np.logical_and), "tensor.or": (B1, B2, np.logical_or),
}


def case_constant():
    (out,) = run_op("tensor.constant", [], {"value": 0.5}, [TensorType("f32", (2, 3))])
    np.testing.assert_array_equal(out, np.full((2, 3), 0.5, np.float32))
    (out,) = run_op("tensor.constant", [], {"value": True}, [scalar("i1")])
    assert out.dtype == np.bool_ and out.shape == () and out


def case_iota():
    (out,) = run_op("tensor.iota", [], {}, [TensorType("i64", (5,))])
    np.testing.assert_array_equal(out, np.arange(5))


def case_cast():
    (out,) = run_op("tensor.cast", [np.array([1.7, -1.7, 2.5], np.float32)], {"to": "i32"})
    np.testing.assert_array_equal(out, [1, -1, 2])
    assert out.dtype == np.int32
    (out,) = run_op("tensor.cast", [np.array([1.0 + 2**-10], np.float32)], {"to": "bf16"})
    assert out[0] == 1.0  # bf16 keeps 8 mantissa bits


def case_cmp():
    for pred, fn in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                     ("gt", np.greater), ("ge", np.greater_equal)]:
        (out,) = run_op("tensor.cmp", [I, J], {"pred": pred})
        np.testing.assert_array_equal(out, fn(I, J))


def case_where():
    (out,) = run_op("tensor.where", [B1, X, Y[:1]], {})
    np.testing.assert_array_equal(out, np.where(B1, X, Y[:1]))


def case_matmul():
    a, b = randn(2, 3, 5), randn(5, 4)
    (out,) = run_op("tensor.matmul", [a, b], {})
    np.testing.assert_allclose(out, a @ b, rtol=1e-5)
    v = randn(5)
    (out,) = run_op("tensor.matmul", [a, v], {})
    np.testing.assert_allclose(out, a @ v, rtol=1e-5)


def case_reshape():
    a = randn(2, 3, 4)
    (out,) = run_op("tensor.reshape", [a], {"shape": (6, -1)})
    np.testing.assert_array_equal(out, a.reshape(6, 4))


def case_transpose():
    a = randn(2, 3, 4)
    (out,) = run_op("tensor.transpose", [a], {"perm": (2, 0, 1)})
    np.testing.assert_array_equal(out, a.transpose(2, 0, 1))


def case_expand_dims():
    (out,) = run_op("tensor.expand_dims", [X], {"axes": (0, 3)})
    np.testing.assert_array_equal(out, X[None, :, :, None])


def case_squeeze():
    a = randn(3, 1, 4, 1)
    (out,) = run_op("tensor.squeeze", [a], {"axes": (1, -1)})
    np.testing.assert_array_equal(out, a[:, 0, :, 0])


def case_slice():
    a = randn(5, 6)
    (out,) = run_op("tensor.slice", [a], {"starts": (1, 0), "stops": (None, 5), "steps": (2, -2)})
    np.testing.assert_array_equal(out, a[1::2, 0:5:-2])
    (out,) = run_op("tensor.slice", [a], {"starts": (-3, 1), "stops": (None, 4), "steps": (1, 1)})
    np.testing.assert_array_equal(out, a[-3:, 1:4])


def test_slice_lengths_over_a_symbolic_axis_brute_force():
    """A slice's length over a symbolic axis s, where its type names one, is Python's for every s its bounds lie
    inside, in order (a bound counted from the end at most s back, one from the start at most s on, start before
    stop), and `?` only where the length depends on where they fall; elsewhere the run says so (SliceOp.checked)."""
    from sparsa.ir.dialects.tensor_shape import _slice_len
    from sparsa.ir.dims import evaluate

    def inside(a: int, b: int | None, n: int) -> bool:  # each bound within the axis, and in order
        lo, hi = a if a >= 0 else n + a, n if b is None else b if b >= 0 else n + b
        return 0 <= lo <= hi <= n

    for start in range(-4, 5):
        for stop in [None, *range(-4, 5)]:
            for step in (1, 2, 3):
                d = _slice_len("s", start, stop, step)
                if d is None:
                    assert start < 0 <= stop, (start, stop, step)  # x[-3:5]: 3 or fewer, as s falls
                    continue
                for n in range(12):
                    if inside(start, stop, n):
                        assert evaluate(d, {"s": n}) == len(range(n)[start:stop:step]), (start, stop, step, n, d)


def case_gather():
    emb = randn(10, 4)
    tok = rng.integers(0, 10, size=(2, 3)).astype(np.int32)
    (out,) = run_op("tensor.gather", [emb, tok], {})
    np.testing.assert_array_equal(out, emb[tok])
    table = randn(4, 5)
    qi, ki = np.arange(4)[:, None], np.arange(5)[None, :] % 4
    (out,) = run_op("tensor.gather", [table, qi, ki], {})
    np.testing.assert_array_equal(out, table[qi, ki])


def case_scatter_add():
    """Rows and single elements added at repeated and negative places (NumPy's add.at)."""
    base, upd = randn(4, 3), randn(2, 3, 3)
    tok = np.array([[0, 2, 2], [-1, 1, 2]], dtype=np.int32)
    (out,) = run_op("tensor.scatter_add", [base, upd, tok], {})
    want = base.copy()
    np.add.at(want, tok, upd)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    pts = randn(5)
    rows, cols = np.array([0, 3, 0, 1, -4]), np.array([2, 1, 2, 0, 0])
    (out,) = run_op("tensor.scatter_add", [base, pts, rows, cols], {})
    want = base.copy()
    np.add.at(want, (rows, cols), pts)
    np.testing.assert_allclose(out, want, rtol=1e-6)


def case_concat():
    a, b = randn(2, 3), randn(2, 5)
    (out,) = run_op("tensor.concat", [a, b], {"axis": -1})
    np.testing.assert_array_equal(out, np.concatenate([a, b], axis=1))


def case_split():
    a = randn(2, 9)
    outs = run_op("tensor.split", [a], {"sizes": (2, 3, 4), "axis": 1})
    for o, e in zip(outs, [a[:, :2], a[:, 2:5], a[:, 5:]], strict=True):
        np.testing.assert_array_equal(o, e)


def case_broadcast_to():
    (out,) = run_op("tensor.broadcast_to", [Y[:1]], {"shape": (2, 3, 4)})
    np.testing.assert_array_equal(out, np.broadcast_to(Y[:1], (2, 3, 4)))


def _reduction(name, fn):
    def case():
        a = randn(2, 3, 4)
        (out,) = run_op(name, [a], {"axes": (0, -1)})
        np.testing.assert_allclose(out, fn(a, axis=(0, 2)), rtol=1e-5)
        (out,) = run_op(name, [a], {"axes": (1,), "keepdim": True})
        np.testing.assert_allclose(out, fn(a, axis=1, keepdims=True), rtol=1e-5)
    return case


def _logsumexp(a, axis, keepdims=False):
    return np.log(np.sum(np.exp(a.astype(np.float64)), axis=axis, keepdims=keepdims))


def case_argmax():
    a = np.array([[1.0, 3.0, 3.0], [2.0, 0.0, 2.0]], np.float32)
    (out,) = run_op("tensor.argmax", [a], {"axis": -1})
    np.testing.assert_array_equal(out, [1, 0])
    assert out.dtype == np.int64


def case_softmax():
    a = randn(3, 5)
    (out,) = run_op("tensor.softmax", [a], {"axis": 0})
    np.testing.assert_allclose(out, softmax(a, axis=0), rtol=1e-5)


def case_cumsum():
    a = randn(3, 5)
    (out,) = run_op("tensor.cumsum", [a], {"axis": 1})
    np.testing.assert_allclose(out, np.cumsum(a, axis=1), rtol=1e-5, atol=1e-6)


def case_solve_triangular():
    """Every triangle and diagonal against NumPy's dense solve of the matrix the flags read, batched, with column
    counts around the cpu target's vector widths (whole vectors and a tail)."""
    for upper in (False, True):
        for unit in (False, True):
            for shape_a, k in (((2, 3, 7, 7), 37), ((9, 9), 1), ((1, 1), 16)):
                n = shape_a[-1]
                a = randn(*shape_a) + 4 * np.eye(n, dtype=np.float32)
                b = randn(*shape_a[:-1], k)
                read = np.triu(a) if upper else np.tril(a)
                if unit:  # its diagonal taken as ones
                    read = read * (1 - np.eye(n, dtype=np.float32)) + np.eye(n, dtype=np.float32)
                (out,) = run_op("tensor.solve_triangular", [a, b], {"upper": upper, "unit": unit})
                want = np.linalg.solve(read.astype(np.float64), b.astype(np.float64))
                np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5, err_msg=f"upper={upper} unit={unit}")


def case_layernorm():
    a, w, b = randn(3, 8), randn(8), randn(8)
    (out,) = run_op("tensor.layernorm", [a, w, b], {"eps": 1e-5})
    mu, var = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
    np.testing.assert_allclose(out, (a - mu) / np.sqrt(var + 1e-5) * w + b, rtol=1e-4, atol=1e-5)


def case_rmsnorm():
    a, w = randn(3, 8), randn(8)
    (out,) = run_op("tensor.rmsnorm", [a, w], {})
    np.testing.assert_allclose(out, a / np.sqrt((a * a).mean(-1, keepdims=True) + 1e-6) * w, rtol=1e-5)


def case_topk():
    a = np.array([[0.1, 0.7, 0.7, 0.2], [3.0, -1.0, 5.0, 5.0]], np.float32)
    vals, idx = run_op("tensor.topk", [a], {"k": 3})
    np.testing.assert_array_equal(idx, [[1, 2, 3], [2, 3, 0]])
    np.testing.assert_array_equal(vals, np.array([[0.7, 0.7, 0.2], [5.0, 5.0, 3.0]], np.float32))


def case_pullback():
    """y = tanh(x @ w) * b: the cotangents of x, w and b (each of the function's values, read by the ops before the
    pullback), and zeros for an input y does not read."""
    from sparsa.backends.reference import run_function

    from ir_helpers import make_func, roundtrip

    x, w, b, c, dy = randn(4, 3), randn(3, 5), randn(1, 5), randn(2, 2), randn(4, 5)

    def fn(block, args):
        xv, wv, bv, cv, dv = args
        m = block.append(MatmulOp.build(xv, wv)).result
        t = block.append(OP_REGISTRY["tensor.tanh"].build(m)).result
        y = block.append(MulOp.build(t, bv)).result
        return block.append(OP_REGISTRY["tensor.pullback"].build(y, dv, [xv, wv, bv, cv, xv])).results

    types = [TensorType("f32", a.shape) for a in (x, w, b, c, dy)]
    module = roundtrip(make_func("f", types, fn))
    dx, dw, db, dc, dx2 = run_function(module, [x, w, b, c, dy])
    t = np.tanh(x @ w)
    dm = dy * b * (1 - t * t)
    for got, want in ((dx, dm @ w.T), (dw, x.T @ dm), (db, (dy * t).sum(0, keepdims=True)), (dc, 0 * c),
                      (dx2, dm @ w.T)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _gather_then(op_cls, *outer):
    """Body builder: gather the expert's weight, then op(h, w_e)."""
    def body(block, args):
        e, h = args
        w = block.append(GatherOp.build(outer[0], [e])).result
        return [block.append(op_cls.build(h, w)).result]
    return body


def case_moe():
    T, D, F, E, K = 7, 4, 3, 3, 2
    x, w = randn(T, D), randn(E, D, F)
    idx = rng.integers(0, E, size=(T, K)).astype(np.int64)
    idx[:, 1] = (idx[:, 0] + 1) % E
    gates = softmax(randn(T, K))
    from sparsa.backends.reference import run_function
    from sparsa.ir.dialects.moe import MoeOp

    from ir_helpers import make_func, roundtrip

    for capacity in (None, 0.5):
        def fn(block, args, capacity=capacity):
            xv, iv, gv, wv = args
            body = region([scalar("i64"), TensorType("f32", (None, D))], _gather_then(MatmulOp, wv))
            return block.append(MoeOp.build(xv, iv, gv, regions=[body], num_experts=E, capacity=capacity)).results

        module = roundtrip(make_func("f", [TensorType("f32", (T, D)), TensorType("i64", (T, K)),
                                           TensorType("f32", (T, K)), TensorType("f32", (E, D, F))], fn))
        (out,) = run_function(module, [x, idx, gates, w])
        cap = T * K if capacity is None else math.ceil(capacity * T * K / E)
        expected, seen = np.zeros((T, F)), [0] * E
        for t in range(T):
            for j in range(K):
                e = idx[t, j]
                seen[e] += 1
                if seen[e] <= cap:
                    expected[t] += gates[t, j] * (x[t] @ w[e])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def case_attention():
    B, Hq, Hkv, S, Dh = 1, 4, 2, 6, 8
    q, k, v = randn(B, Hq, S, Dh), randn(B, Hkv, S, Dh), randn(B, Hkv, S, Dh)
    idx = scalar("i64")

    def mask_body(block, args):  # k <= q and q >= 2: rows 0 and 1 are fully masked
        _, _, qi, ki = args
        c1 = block.append(CmpOp.build(ki, qi, pred="le")).result
        two = block.append(OP_REGISTRY["tensor.constant"].build(value=2, result_types=[idx])).result
        c2 = block.append(CmpOp.build(qi, two, pred="ge")).result
        return [block.append(OP_REGISTRY["tensor.and"].build(c1, c2)).result]

    def score_body(block, args):  # s + 0.1 * (q - k) as a relative bias
        s, _, _, qi, ki = args
        d = block.append(OP_REGISTRY["tensor.sub"].build(qi, ki)).result
        df = block.append(OP_REGISTRY["tensor.cast"].build(d, to="f32")).result
        c = block.append(OP_REGISTRY["tensor.constant"].build(value=0.1, result_types=[scalar("f32")])).result
        return [block.append(AddOp.build(s, block.append(MulOp.build(df, c)).result)).result]

    mask = region([idx] * 4, mask_body)
    score = region([scalar("f32")] + [idx] * 4, score_body)
    (out,) = run_op("attn.attention", [q, k, v], {"scale": 0.3}, regions=[mask, score])
    kk, vv = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    s = 0.3 * q @ kk.transpose(0, 1, 3, 2) + 0.1 * (np.arange(S)[:, None] - np.arange(S)[None, :])
    allowed = (np.arange(S)[None, :] <= np.arange(S)[:, None]) & (np.arange(S)[:, None] >= 2)
    p = softmax(np.where(allowed, s, -np.inf)[..., 2:, :])
    expected = np.zeros_like(q)
    expected[..., 2:, :] = p @ vv
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert not np.isnan(out).any()


def case_block_map():
    from sparsa.ir.dialects.attn_blocks import BlockMap

    def causal(block, args):
        return [block.append(CmpOp.build(args[3], args[2], pred="le")).result]

    mask = region([scalar("i64")] * 4, causal)
    (out,) = run_op("attn.block_map", [], {"block_q": 2, "block_k": 3, "sq": 5, "sk": 7}, regions=[mask])
    q, k = np.arange(5)[:, None], np.arange(7)[None, :]
    allowed = k <= q
    expected = np.zeros((3, 3), np.int8)
    for i in range(3):
        for j in range(3):
            tile = allowed[2 * i : 2 * i + 2, 3 * j : 3 * j + 3]
            expected[i, j] = 2 if tile.all() else 1 if tile.any() else 0
    np.testing.assert_array_equal(out[0, 0], expected)
    static = BlockMap(expected[None, None])
    (out,) = run_op("attn.block_map", [], {"block_q": 2, "block_k": 3, "sq": 5, "sk": 7, "map": static})
    np.testing.assert_array_equal(out[0, 0], expected)


def case_route():
    logits = randn(6, 8)
    bias = randn(8)
    p = softmax(logits.astype(np.float64))
    w, e = run_op("moe.route", [logits], {"score": "softmax", "k": 2, "renormalize": True, "scale": 2.0})
    top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(e, top)
    tw = np.take_along_axis(p, top, -1)
    np.testing.assert_allclose(w, 2.0 * tw / tw.sum(-1, keepdims=True), rtol=1e-5)
    w, e = run_op("moe.route", [logits, bias], {"score": "sigmoid", "k": 3, "groups": 4, "groups_kept": 2})
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    sel = s + bias
    for t in range(6):
        group_score = [np.sort(sel[t, 2 * g : 2 * g + 2])[::-1][:2].sum() for g in range(4)]
        kept = sorted(np.argsort(-np.array(group_score), kind="stable")[:2])
        allowed = [x for g in kept for x in (2 * g, 2 * g + 1)]
        order = sorted(allowed, key=lambda x: (-sel[t, x], x))[:3]
        np.testing.assert_array_equal(e[t], order)
        np.testing.assert_allclose(w[t], s[t, order], rtol=1e-5)


def _dispatch_expected(experts, E, block, capacity):
    T, K = experts.shape
    cap = T * K if capacity is None else math.ceil(capacity * T * K / E)
    segments = [[t * K + j for t in range(T) for j in range(K) if experts[t, j] == e][:cap] for e in range(E)]
    perm, offsets = [], [0]
    for seg in segments:
        padded = -(-len(seg) // block) * block
        perm += seg + [-1] * (padded - len(seg))
        offsets.append(offsets[-1] + padded)
    return np.array(perm, dtype=np.int64), np.array(offsets)


def case_dispatch():
    experts = rng.integers(0, 5, size=(9, 2)).astype(np.int64)
    for block, capacity in ((1, None), (4, None), (3, 0.6)):
        perm, offsets = run_op("moe.dispatch", [experts], {"num_experts": 5, "block": block, "capacity": capacity})
        want_perm, want_offsets = _dispatch_expected(experts, 5, block, capacity)
        np.testing.assert_array_equal(perm, want_perm)
        np.testing.assert_array_equal(offsets, want_offsets)


def case_dispatch_drop_negative():
    """Ids of -1 (slots another rank serves) are no assignment; the rest dispatch as usual."""
    experts = rng.integers(-1, 4, size=(9, 2)).astype(np.int64)
    perm, offsets = run_op("moe.dispatch", [experts], {"num_experts": 4, "block": 2, "drop_negative": True})
    want_perm, want_offsets = _dispatch_expected(np.where(experts < 0, 99, experts), 4, 2, None)
    np.testing.assert_array_equal(perm, want_perm)
    np.testing.assert_array_equal(offsets, want_offsets)


def _world_of_one(case):
    """Run `case(exchange)` on a real gloo process group of one rank (the many-rank runs are in
    test_expert_parallel.py), torn down after."""
    import datetime
    import socket

    import torch.distributed as dist

    from sparsa.runtime.expert_parallel import TorchExchange

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        case(TorchExchange(dist.group.WORLD))
    finally:
        dist.destroy_process_group()


def case_exchange_plan(ex):
    from sparsa.ir.dialects.moe import kept_assignments

    experts = rng.integers(0, 4, size=(7, 2)).astype(np.int64)
    experts[:, 1] = (experts[:, 0] + 1) % 4
    for capacity in (None, 0.5):
        rows, local, sends, receives = run_op("moe.exchange_plan", [experts],
                                              {"num_experts": 4, "ranks": 1, "capacity": capacity}, exchange=ex)
        keep = kept_assignments(experts, 4, capacity)
        want_rows = np.flatnonzero(keep.any(1))
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_array_equal(local, np.where(keep[want_rows], experts[want_rows], -1))
        assert sends.tolist() == receives.tolist() == [want_rows.size]


def case_all_to_all(ex):
    data = randn(5, 3)
    (out,) = run_op("moe.all_to_all", [data, np.array([5]), np.array([5])], exchange=ex)
    np.testing.assert_array_equal(out, data)


def case_all_to_all_start_wait(ex):
    """Begun, then waited for: the same rows as moe.all_to_all."""
    from sparsa.backends.reference import run_function
    from sparsa.ir.dialects.moe_exchange import AllToAllStartOp, AllToAllWaitOp

    from ir_helpers import make_func, roundtrip, type_of

    data = randn(4, 3)

    def body(block, args):
        start = AllToAllStartOp.build(*args)
        wait = AllToAllWaitOp.build(start.result)
        block.append(start)
        block.append(wait)
        return wait.results

    module = roundtrip(make_func("f", [type_of(a) for a in (data, np.array([4]), np.array([4]))], body))
    (out,) = run_function(module, [data, np.array([4]), np.array([4])], exchange=ex)
    np.testing.assert_array_equal(out, data)


def case_rank_rows(ex):
    """On one rank every row is its own, and putting its own block back gives the rows again."""
    data, counts = randn(4, 3), np.array([4])
    own, others = (run_op("moe.rank_rows", [data, counts], {"own": o}, exchange=ex)[0] for o in (True, False))
    np.testing.assert_array_equal(own, data)
    assert others.shape == (0, 3)
    (back,) = run_op("moe.insert_own_rows", [others, own, counts], exchange=ex)
    np.testing.assert_array_equal(back, data)


def case_combine_rows():
    parts, rows, tokens = randn(5, 3), np.array([0, 2, 0, 3, 2]), randn(4, 2)
    (y,) = run_op("moe.combine_rows", [parts, rows, tokens])
    want = np.zeros((4, 3), np.float32)
    for p, t in zip(parts, rows, strict=True):
        want[t] += p
    np.testing.assert_allclose(y, want, rtol=1e-6)


def case_local_experts(ex):
    w = randn(4, 2, 3)
    (out,) = run_op("moe.local_experts", [w], {"ranks": 1}, exchange=ex)
    np.testing.assert_array_equal(out, w)


def case_grouped_weight_grad():
    """X_seg^T dY_seg per expert (dY_seg^T X_seg, transposed), rows through the permutation or already permuted,
    padding adding nothing."""
    T, K, D, N, E = 7, 2, 4, 5, 3
    experts = rng.integers(0, E, size=(T, K)).astype(np.int64)
    for block, capacity in ((1, None), (4, 0.5)):
        perm, offsets = _dispatch_expected(experts, E, block, capacity)
        x, dy = randn(T, D), randn(len(perm), N)
        for gather, transposed in ((True, False), (False, False), (True, True), (False, True)):
            rows = x if gather else randn(len(perm), D)
            (out,) = run_op("moe.grouped_weight_grad", [rows, perm, offsets.astype(np.int64), dy],
                            {"topk": K, "gather": gather, "transposed": transposed})
            want = np.zeros((E, D, N))
            for p, a in enumerate(perm):
                if a >= 0:
                    e = next(e for e in range(E) if offsets[e] <= p < offsets[e + 1])
                    want[e] += np.outer(x[a // K] if gather else rows[p], dy[p])
            np.testing.assert_allclose(out, want.transpose(0, 2, 1) if transposed else want, rtol=1e-5, atol=1e-5)


def _grouped_case(name):
    from sparsa.backends.reference import run_function
    from sparsa.ir.dialects.moe import GroupedMatmulCombineOp, GroupedMatmulOp

    from ir_helpers import make_func, roundtrip

    T, K, D, F, E = 5, 2, 4, 6, 3
    x, w1, w3, gates = randn(T, D), randn(E, D, F), randn(E, D, F), randn(T, K)
    experts = rng.integers(0, E, size=(T, K)).astype(np.int64)
    perm, offsets = _dispatch_expected(experts, E, 2, None)
    rows = TensorType("f32", (None, F))

    def epilogue(block, args):
        return [block.append(MulOp.build(*args)).result] if len(args) == 2 else [args[0]]

    def fn(block, args):
        xv, pv, ov, a, b, g = args
        if name == "moe.grouped_matmul":
            op = GroupedMatmulOp.build(xv, pv, ov, [a, b], regions=[region([rows, rows], epilogue)], topk=K, gather=True)
        else:
            op = GroupedMatmulCombineOp.build(xv, pv, ov, a, g, regions=[region([rows], epilogue)], topk=K, gather=True)
        return [block.append(op).result]

    types = [TensorType("f32", (T, D)), TensorType("i64", (None,)), TensorType("i64", (E + 1,)),
             TensorType("f32", (E, D, F)), TensorType("f32", (E, D, F)), TensorType("f32", (T, K))]
    module = roundtrip(make_func("f", types, fn))
    (out,) = run_function(module, [x, perm, offsets, w1, w3, gates])
    if name == "moe.grouped_matmul":
        expected = np.zeros((len(perm), F))
        for e in range(E):
            for p in range(offsets[e], offsets[e + 1]):
                if perm[p] >= 0:
                    t = perm[p] // K
                    expected[p] = (x[t] @ w1[e]) * (x[t] @ w3[e])
    else:
        expected = np.zeros((T, F))
        for t in range(T):
            for j in range(K):
                expected[t] += gates[t, j] * (x[t] @ w1[experts[t, j]])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def case_scan():
    a, b, h0 = np.abs(randn(2, 5, 3)), randn(2, 5, 3), randn(2, 3)
    (out,) = run_op("scan.scan", [a, b, h0], {"axis": 1})
    h, expected = h0, []
    for t in range(5):
        h = a[:, t] * h + b[:, t]
        expected.append(h)
    np.testing.assert_allclose(out, np.stack(expected, axis=1), rtol=1e-5, atol=1e-6)
    (out,) = run_op("scan.scan", [a[:, :, :1], b], {"axis": -2})
    h, expected = 0, []
    for t in range(5):
        h = a[:, t, :1] * h + b[:, t]
        expected.append(h)
    np.testing.assert_allclose(out, np.stack(expected, axis=1), rtol=1e-5, atol=1e-6)
    for a_ in (a, a[:, :, :1]):  # transposed: from the last step back, a read a step ahead
        (out,) = run_op("scan.scan", [a_, b], {"axis": 1, "transpose": True})
        h, expected = 0, [None] * 5
        for t in range(4, -1, -1):
            h = (np.broadcast_to(a_, b.shape)[:, t + 1] * h if t < 4 else 0) + b[:, t]
            expected[t] = h
        np.testing.assert_allclose(out, np.stack(expected, axis=1), rtol=1e-5, atol=1e-6)


FUSED_SCAN_SRC = """
model M(a: f32[B, L, D], x: f32[B, L, D, N], c: f32[L, N]) -> f32[B, L, D] {
    h = scan(exp(-abs(a))[:, :, :, None] * ones([N]), x * 0.5, axis=1)
    return sum(h * c[:, None, :], axis=-1)
}
"""


def case_fused_scan():
    import sparsa

    m = sparsa.compile(FUSED_SCAN_SRC, passes="canonicalize,fuse-scan,dce", target="reference")
    assert "scan.fused" in m.ir() and "scan.scan" not in m.ir()
    a, x, c = randn(2, 5, 3), randn(2, 5, 3, 4), randn(5, 4)
    h, ys = np.zeros((2, 3, 4)), []
    for t in range(5):
        h = np.exp(-np.abs(a[:, t]))[:, :, None] * h + 0.5 * x[:, t]
        ys.append((h * c[t]).sum(-1))
    np.testing.assert_allclose(m(a, x, c), np.stack(ys, axis=1), rtol=1e-5, atol=1e-6)


def case_fused_scan_grad():
    """The fused scan above differentiated: its backward is one scan.fused_grad (round-tripped), against the
    reverse recurrence written in NumPy."""
    import sparsa
    from sparsa.ir import parse_module, print_module

    src = FUSED_SCAN_SRC
    m = sparsa.compile(src, target="reference")
    text = m.ir(grad=True)
    assert "scan.fused_grad" in text and print_module(parse_module(text)) == text
    a, x, c, dy = randn(2, 5, 3), randn(2, 5, 3, 4), randn(5, 4), randn(2, 5, 3)
    e = np.exp(-np.abs(a))[..., None]
    h, hs = np.zeros((2, 3, 4)), []
    for t in range(5):
        h = e[:, t] * h + 0.5 * x[:, t]
        hs.append(h)
    lam, da, dx, dc = 0.0, np.zeros_like(a), np.zeros_like(x), np.zeros_like(c)
    for t in reversed(range(5)):
        lam = dy[:, t, :, None] * c[t] + (e[:, t + 1] * lam if t < 4 else 0.0)
        dx[:, t] = 0.5 * lam
        before = hs[t - 1] if t else 0.0
        da[:, t] = (lam * before * e[:, t]).sum(-1) * -np.sign(a[:, t])
        dc[t] = (dy[:, t, :, None] * hs[t]).sum((0, 1))
    _, pullback = m.vjp(a, x, c)
    grads = pullback(dy)
    for name, want in (("a", da), ("x", dx), ("c", dc)):
        np.testing.assert_allclose(grads[name], want, rtol=1e-4, atol=1e-5, err_msg=name)


def case_linear_attention():
    B, L, Dk, Dv = 2, 7, 3, 4
    q, k, v = randn(B, L, Dk), randn(B, L, Dk), randn(B, L, Dv)
    a = np.where(rng.random((B, L)) < 0.2, 0.0, randn(B, L)).astype(np.float32)  # zeros and signs too
    state, expected = np.zeros((B, Dk, Dv)), np.zeros((B, L, Dv))
    for t in range(L):
        state = a[:, t, None, None] * state + k[:, t, :, None] * v[:, t, None, :]
        expected[:, t] = np.einsum("bk,bkv->bv", q[:, t], state)
    for chunk in (1, 3, 64):
        (out,) = run_op("scan.linear_attention", [q, k, v, a], {"chunk": chunk})
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def case_sparse_convert():
    w = randn(8, 4)
    w[0:4, 0:2] = 0
    (out,) = run_op("sparse.convert", [w], {"layout": "bsr", "block": (4, 2)})
    np.testing.assert_array_equal(out, w)
    nm = randn(8, 3)
    nm[[0, 1, 4, 7], :] = 0  # every group of 4 rows keeps at most 2 nonzeros per column
    (out,) = run_op("sparse.convert", [nm], {"layout": "nm", "block": (2, 4)})
    np.testing.assert_array_equal(out, nm)
    with pytest.raises(Exception, match="group of rows 0..3 in column 0 has 4 nonzeros"):
        run_op("sparse.convert", [randn(8, 3) + 5], {"layout": "nm", "block": (2, 4)})


def case_sparse_matmul():
    from sparsa.backends.reference import run_function
    from sparsa.ir.dialects.sparse import ConvertOp, SparseMatmulOp

    from ir_helpers import make_func, roundtrip

    x, w = randn(3, 8), randn(8, 4)

    def fn(block, args):
        ws = block.append(ConvertOp.build(args[1], layout="bsr", block=(4, 4))).result
        return [block.append(SparseMatmulOp.build(args[0], ws)).result]

    module = roundtrip(make_func("f", [TensorType("f32", (3, 8)), TensorType("f32", (8, 4))], fn))
    (out,) = run_function(module, [x, w])
    np.testing.assert_allclose(out, x @ w, rtol=1e-5)


def _packed_cases():
    from sparsa.ir.dialects.sparse import pack_bsr, pack_nm

    w = randn(8, 12)
    w[0:4, 4:8] = 0
    w[4:8, 0:4] = 0
    row_ptr, col_idx, blocks = run_op("sparse.pack_bsr", [w], {"block": (4, 4)})
    np.testing.assert_array_equal(row_ptr, [0, 2, 4])
    np.testing.assert_array_equal(col_idx, [0, 2, 1, 2])
    np.testing.assert_array_equal(blocks[1], w[0:4, 8:12])
    x = randn(3, 8)
    (y,) = run_op("sparse.bsr_matmul", [x, row_ptr, col_idx, blocks], {"cols": 12})
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-6)
    assert [a.tolist() for a in pack_bsr(w, 4, 4)[:2]] == [row_ptr.tolist(), col_idx.tolist()]
    (y_dense,) = run_op("sparse.bsr_matmul", [x, row_ptr, col_idx, blocks], {"cols": 12, "dense_above": 0.5})
    np.testing.assert_allclose(y_dense, x @ w, rtol=1e-5, atol=1e-6)  # 4 of 6 blocks stored: the dense kernel

    nm = randn(8, 3)
    nm[[0, 3, 4, 5]] = 0
    nm[1, 0] = 0  # a group with fewer than N nonzeros in one column
    values, indices = run_op("sparse.pack_nm", [nm], {"n": 2, "m": 4})
    np.testing.assert_array_equal(values[:, 1], [nm[1, 1], nm[2, 1], nm[6, 1], nm[7, 1]])
    np.testing.assert_array_equal(indices[:, 1], [1, 2, 2, 3])
    (y,) = run_op("sparse.nm_matmul", [x, values, indices], {"n": 2, "m": 4})
    np.testing.assert_allclose(y, x @ nm, rtol=1e-5, atol=1e-6)
    assert np.array_equal(pack_nm(nm, 2, 4)[0], values)


CASES = {
    **{name: (lambda name=name, c=c: _check_unary(name, *c)) for name, c in UNARY.items()},
    **{name: (lambda name=name, c=c: _check_binary(name, *c)) for name, c in BINARY.items()},
    "tensor.constant": case_constant, "tensor.iota": case_iota, "tensor.cast": case_cast, "tensor.cmp": case_cmp,
    "tensor.where": case_where, "tensor.matmul": case_matmul, "tensor.reshape": case_reshape,
    "tensor.transpose": case_transpose, "tensor.expand_dims": case_expand_dims, "tensor.squeeze": case_squeeze,
    "tensor.slice": case_slice, "tensor.gather": case_gather, "tensor.concat": case_concat,
    "tensor.scatter_add": case_scatter_add,
    "tensor.split": case_split, "tensor.broadcast_to": case_broadcast_to,
    "tensor.sum": _reduction("tensor.sum", np.sum), "tensor.mean": _reduction("tensor.mean", np.mean),
    "tensor.max": _reduction("tensor.max", np.max), "tensor.min": _reduction("tensor.min", np.min),
    "tensor.logsumexp": _reduction("tensor.logsumexp", _logsumexp), "tensor.argmax": case_argmax,
    "tensor.softmax": case_softmax, "tensor.cumsum": case_cumsum, "tensor.layernorm": case_layernorm,
    "tensor.solve_triangular": case_solve_triangular,
    "tensor.rmsnorm": case_rmsnorm, "tensor.topk": case_topk, "tensor.pullback": case_pullback, "moe.moe": case_moe,
    "attn.attention": case_attention, "attn.block_map": case_block_map, "scan.scan": case_scan,
    "scan.fused": case_fused_scan, "scan.fused_grad": case_fused_scan_grad, "scan.linear_attention": case_linear_attention,
    "sparse.convert": case_sparse_convert, "moe.route": case_route,
    "moe.dispatch": lambda: (case_dispatch(), case_dispatch_drop_negative()),
    "moe.exchange_plan": lambda: _world_of_one(case_exchange_plan),
    "moe.all_to_all": lambda: _world_of_one(case_all_to_all), "moe.combine_rows": case_combine_rows,
    **{n: lambda: _world_of_one(case_all_to_all_start_wait) for n in ("moe.all_to_all_start", "moe.all_to_all_wait")},
    "moe.local_experts": lambda: _world_of_one(case_local_experts),
    **{n: lambda: _world_of_one(case_rank_rows) for n in ("moe.rank_rows", "moe.insert_own_rows")},
    "moe.grouped_matmul": lambda: _grouped_case("moe.grouped_matmul"),
    "moe.grouped_weight_grad": case_grouped_weight_grad,
    **{n: _packed_cases for n in ("sparse.pack_bsr", "sparse.bsr_matmul", "sparse.pack_nm", "sparse.nm_matmul")},
    "moe.grouped_matmul_combine": lambda: _grouped_case("moe.grouped_matmul_combine"),
    "sparse.matmul": case_sparse_matmul,
    **op_cases_attention.CASES,
}


def _check_unary(name, x, fn):
    (out,) = run_op(name, [x], {})
    assert out.dtype == x.dtype
    if x.dtype == np.bool_:
        np.testing.assert_array_equal(out, fn(x))
    else:
        np.testing.assert_allclose(out, fn(x.astype(np.float64)), rtol=2e-6, atol=1e-6)


def _check_binary(name, a, b, fn):
    (out,) = run_op(name, [a, b], {})
    expected = fn(a, b)
    if out.dtype.kind == "f":
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    else:
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_reference_semantics(name):
    CASES[name]()


def test_every_registered_op_has_a_case():
    """Structural ops (function, param, return, yield) are exercised by every case; the rest need one here."""
    structural = {n for n, c in OP_REGISTRY.items() if c.STRUCTURAL}
    assert structural == {"func.func", "func.param", "func.return", "func.yield"}
    missing = set(OP_REGISTRY) - structural - set(CASES)
    assert not missing, f"ops without a round-trip/reference case: {sorted(missing)}"
    for name, cls in OP_REGISTRY.items():
        if name not in structural:
            assert "reference" in {k for c in cls.__mro__ for k in vars(c)}, f"{name} lacks reference()"
        assert (cls.__doc__ or "").strip(), f"{name} lacks a docstring"


@pytest.mark.parametrize(("src", "shape", "want"), [
    (("s", 8), (-1, 4, 2), ("s", 4, 2)),  # int factors divide across dims; the symbolic one carries over
    (("s", 6), (3, -1), (3, "2*s")),
    (("s", "t"), ("t", -1), ("t", "s")),
    (("s", 8), (3, -1), (3, None)),  # 8 is not a multiple of 3: unknown
])
def test_reshape_infers_minus_one_with_symbolic_dims(src, shape, want):
    from sparsa.ir.core import Block
    from sparsa.ir.dialects.tensor_shape import ReshapeOp

    x = Block([TensorType("f32", src)]).args[0]
    assert ReshapeOp.build(x, shape=shape).result.type.shape == want
