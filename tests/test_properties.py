"""Property tests: random modules round-trip, corrupted ones fail to verify, and the clean-up
passes never change what a module computes (reference backend before vs after)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsa.backends.reference import run_function
from sparsa.ir import OP_REGISTRY, TensorType, VerifyError, parse_module, print_module, verify_module
from sparsa.passes import PassManager

from ir_helpers import make_func

UNARY = ["tensor.neg", "tensor.abs", "tensor.relu", "tensor.exp", "tensor.tanh", "tensor.sigmoid",
         "tensor.silu", "tensor.sin", "tensor.softplus", "tensor.gelu_tanh"]
BINARY = ["tensor.add", "tensor.sub", "tensor.mul", "tensor.minimum", "tensor.maximum"]
REDUCE = ["tensor.sum", "tensor.max", "tensor.mean"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def random_modules(draw):
    """A function of one or two f32 inputs [T or 3, n] built from a random chain of ops."""
    rows = draw(st.sampled_from(["T", 3]))
    cols = draw(st.integers(1, 4))
    shape = (rows, cols)
    nargs = draw(st.integers(1, 2))
    steps = draw(st.lists(st.tuples(st.sampled_from(["unary", "binary", "const", "reduce", "where", "softmax",
                                                      "transpose2"]),
                                    st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 5)),
                          min_size=1, max_size=12))

    def body(block, args):
        pool = list(args)

        def add(name, *operands, result_types=None, **attrs):
            op = OP_REGISTRY[name].build(*operands, result_types=result_types, **attrs)
            block.append(op)
            return op.results[0]

        for kind, a, b, c in steps:
            x, y = pool[a % len(pool)], pool[b % len(pool)]
            if kind == "unary":
                pool.append(add(UNARY[c % len(UNARY)], x))
            elif kind == "binary":
                pool.append(add(BINARY[c % len(BINARY)], x, y))
            elif kind == "const":
                pool.append(add("tensor.constant", value=[0.0, 1.0, 0.5, -2.0, 3.0, 1.0][c],
                                result_types=[TensorType("f32", ())]))
            elif kind == "reduce" and x.type.rank == 2:
                pool.append(add(REDUCE[c % len(REDUCE)], x, axes=(c % 2,), keepdim=True))
            elif kind == "where":
                cond = add("tensor.cmp", x, y, pred=["lt", "le", "eq", "ne", "gt", "ge"][c])
                pool.append(add("tensor.where", cond, y, x))
            elif kind == "softmax" and x.type.rank == 2:
                pool.append(add("tensor.softmax", x, axis=c % 2))
            elif kind == "transpose2" and x.type.rank == 2 and x.type.shape[0] == x.type.shape[1]:
                pool.append(add("tensor.transpose", add("tensor.transpose", x, perm=(1, 0)), perm=(1, 0)))
        outs = [v for v in pool[len(args):] if v.type.rank == 2] or list(args)
        return outs[-2:]

    return make_func("random", [TensorType("f32", shape)] * nargs, body), shape


def inputs_for(module, seed):
    rng = np.random.default_rng(seed)
    arrays = []
    for a in module.funcs[0].regions[0].block.args:
        shape = [d if isinstance(d, int) else 3 for d in a.type.shape]
        arrays.append(rng.standard_normal(shape).astype(np.float32))
    return arrays


@SETTINGS
@given(random_modules())
def test_random_modules_round_trip(case):
    module, _ = case
    verify_module(module)
    text = print_module(module)
    again = parse_module(text)
    verify_module(again)
    assert print_module(again) == text


@SETTINGS
@given(random_modules(), st.integers(0, 10_000), st.sampled_from(["i32", "i1", "f16"]))
def test_verifier_rejects_a_wrong_result_type(case, pick, dtype):
    module, _ = case
    ops = [op for op in module.walk() if op.results and op.NAME not in ("tensor.constant", "func.func")]
    if not ops:
        return
    victim = ops[pick % len(ops)]
    r = victim.results[0]
    if r.type.dtype == dtype:
        return
    r.type = TensorType(dtype, r.type.shape)
    try:
        verify_module(module)
    except VerifyError as e:
        assert victim.NAME in str(e) or "returns" in str(e) or "operands" in str(e) or "element type" in str(e)
    else:
        raise AssertionError(f"verifier accepted {victim.NAME} with result type {r.type}")


@SETTINGS
@given(random_modules(), st.integers(0, 10_000))
def test_cleanup_passes_preserve_semantics(case, seed):
    module, _ = case
    inputs = inputs_for(module, seed)
    before = run_function(module, inputs)
    PassManager("canonicalize,cse,dce").run(module)
    after = run_function(module, inputs)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
