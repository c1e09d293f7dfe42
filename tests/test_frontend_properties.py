"""Random well-typed `.sp` expressions: the compiled reference result equals direct NumPy evaluation."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsa


def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


UNARY = [
    ("relu({})", lambda a: np.maximum(a, 0)), ("tanh({})", np.tanh), ("sigmoid({})", _sigmoid),
    ("abs({})", np.abs), ("exp(tanh({}))", lambda a: np.exp(np.tanh(a))), ("(-{})", np.negative),
    ("softmax({}, axis=-1)", _softmax), ("sum({}, axis=-1, keepdim=true)", lambda a: a.sum(-1, keepdims=True)),
    ("mean({}, axis=-1, keepdim=true)", lambda a: a.mean(-1, keepdims=True)), ("silu({})", lambda a: a * _sigmoid(a)),
    ("({} ** 2)", np.square), ("sqrt(abs({}) + 1)", lambda a: np.sqrt(np.abs(a) + 1)),
]
BINARY = [
    ("({} + {})", np.add), ("({} - {})", np.subtract), ("({} * {})", np.multiply),
    ("({} / (1.0 + abs({})))", lambda a, b: a / (1 + np.abs(b))), ("max({}, {})", np.maximum),
    ("min({}, {})", np.minimum), ("where({0} < {1}, {0}, {1})", lambda a, b: np.where(a < b, a, b)),
]
LEAVES = [("x", "x"), ("y", "y"), ("z", "z")]


@st.composite
def expressions(draw, depth=3):
    """(source text, NumPy function of the inputs dict)."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        name, key = draw(st.sampled_from(LEAVES))
        return name, lambda env, key=key: env[key]
    kind = draw(st.sampled_from(["unary", "binary", "literal"]))
    if kind == "unary":
        text, fn = draw(st.sampled_from(UNARY))
        src, f = draw(expressions(depth - 1))
        return text.format(src), lambda env: fn(f(env))
    if kind == "literal":
        c = draw(st.sampled_from([0.5, 2, 1.0, 3, 0.25]))
        text, fn = draw(st.sampled_from(BINARY[:3]))
        src, f = draw(expressions(depth - 1))
        return text.format(src, c), lambda env: fn(f(env), c)
    text, fn = draw(st.sampled_from(BINARY))
    (a, fa), (b, fb) = draw(expressions(depth - 1)), draw(expressions(depth - 1))
    return text.format(a, b), lambda env: fn(fa(env), fb(env))


def _dims(shape):
    return ", ".join("T" if d == 3 else str(d) for d in shape)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions(), st.integers(0, 1000))
def test_compiled_expression_matches_numpy(case, seed):
    src, fn = case
    rng = np.random.default_rng(seed)
    env3 = {"x": rng.standard_normal((3, 4)), "y": rng.standard_normal((3, 4)), "z": rng.standard_normal(4)}
    shape = np.shape(fn(env3))
    program = f"model E(x: f32[T, 4], y: f32[T, 4], z: f32[4]) -> f32[{_dims(shape)}] {{\n    return {src}\n}}\n"
    model = sparsa.compile(program, target="reference")
    for T in (3, 5):
        env = {"x": rng.standard_normal((T, 4)), "y": rng.standard_normal((T, 4)), "z": rng.standard_normal(4)}
        got = model(*(env[k].astype(np.float32) for k in ("x", "y", "z")))
        want = fn({k: v.astype(np.float32).astype(np.float64) for k, v in env.items()})
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=program)
