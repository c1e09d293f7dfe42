"""Every registered op on every backend: it lowers, and agrees with the reference on the inputs of its case in
test_ops.py, or the backend's `supports` names a reason (and the op is listed below as known unsupported).

Each case of test_ops.py runs its modules on the reference interpreter through `run_function`; here that
function is wrapped so that every module a case runs is also compiled for the backend under test (after the
pipeline where the module holds a composite op such as `moe.moe`, which no backend lowers directly) and its
results compared. Triton runs in its interpreter without a GPU. The cpu target's NEON code (`cpu:neoverse-n1`) runs
too, under qemu-aarch64 where it and an AArch64 C compiler are installed (tests/cross_run.py); a function whose host
side is still Python cannot run there (PYTHON_HOSTED says which ops' cases have only such functions, and why).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import test_ops
from cross_run import run_there, toolchain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import inputs_for, random_modules

import sparsa.backends.reference as reference
from sparsa.backends import base as backends
from sparsa.backends.reference.backend import ReferenceFunction
from sparsa.ir import parse_module, print_module
from sparsa.ir.core import Module, Operation
from sparsa.ir.traits import Composite
from sparsa.passes import PassManager

import ir_helpers

# op name -> the reason the backend gives; both lists are to stay empty
KNOWN_UNSUPPORTED: dict[str, dict[str, str]] = {"cpu": {}, "triton": {}}
# element types a backend refuses by name, whatever the op: a module of the case that has a value of one of these
# is not run there (every op must still run on the case's other modules)
UNSUPPORTED_DTYPES = {"cpu": {"f16", "bf16"}, "triton": set()}
TOL = {"cpu": 2e-4, "triton": 2e-4}
# NEON code, run under qemu-aarch64 (tests/cross_run.py); functions whose host side is still Python cannot run there
AARCH64 = "cpu:neoverse-n1"
UNSUPPORTED_DTYPES[AARCH64], TOL[AARCH64] = UNSUPPORTED_DTYPES["cpu"], TOL["cpu"]
# op -> why its case's functions keep the Python host, so run nothing on AArch64 (each runs on the cpu target here)
_RANKS = "it exchanges rows between ranks (expert parallel)"
_PADDED = "it returns a value of a MoE dispatch's length"  # (the cases return it; the examples' MoE layers run there)
PYTHON_HOSTED = {"moe.all_to_all": _RANKS, "moe.all_to_all_start": _RANKS, "moe.all_to_all_wait": _RANKS,
                 "moe.insert_own_rows": _RANKS, "moe.local_experts": _RANKS, "moe.exchange_plan": _RANKS,
                 "moe.rank_rows": _RANKS, "moe.combine_rows": "'moe.combine_rows' runs on the Python host",
                 "moe.dispatch": _PADDED, "moe.grouped_matmul": _PADDED,
                 "sparse.convert": "'sparse.convert' runs on the Python host",
                 "sparse.matmul": "'sparse.convert' runs on the Python host"}


class PythonHosted(Exception):
    """A function compiled for another machine whose host side is still Python: it cannot run there."""


def _available(name: str) -> bool:
    backend = backends.get(name)
    if name == "triton":
        pytest.importorskip("triton")
        pytest.importorskip("torch")
        return True
    if name == AARCH64 and backend.unavailable() is None and toolchain("aarch64") is None:
        pytest.skip("needs an AArch64 C compiler and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu, qemu-user)")
    return backend.unavailable() is None


def _on(backend: backends.Backend, func: Operation, inputs: list, params: dict | None, exchange: object = None) -> list:
    """`func` compiled by `backend` and run (on a copy: the pipeline must not touch the caller's); `exchange`: the
    process group of an expert-parallel case."""
    copy = parse_module(print_module(Module([func])))
    if any(isinstance(op, Composite) for op in copy.walk()):
        copy = PassManager(backend.PIPELINE).run(copy)
    compiled = backend.compile(copy.funcs[-1], {"exchange": exchange})  # UnsupportedOp: supports() said no
    if backend.label == AARCH64:
        if compiled.host.why_not is not None:
            raise PythonHosted(compiled.host.why_not)
        cache: dict = {}
        reference.Interpreter(compiled.func_op, params or {}, cache, compiled.weight_only).precompute()
        with tempfile.TemporaryDirectory() as folder:
            return [np.asarray(o) for o in run_there(compiled, list(inputs), cache, 2, Path(folder))]
    outs = compiled(list(inputs), params or {}, {})
    return [_numpy(o) for o in outs]


def _numpy(o: object) -> np.ndarray:
    """A result as NumPy (half-precision tensors widened to float32, as the reference stores them)."""
    if not hasattr(o, "detach"):
        return np.asarray(o)
    o = o.detach().cpu()
    return (o.float() if o.is_floating_point() and o.element_size() < 4 else o).numpy()


@pytest.mark.parametrize("target", ["cpu", "triton", AARCH64])
@pytest.mark.parametrize("name", sorted(test_ops.CASES))
def test_every_op_lowers_or_says_why(name, target, monkeypatch):
    if not _available(target):
        pytest.skip(f"target {target} cannot run here")
    backend = backends.get(target)
    real = reference.run_function
    compared: list[str] = []
    refused: list[str] = []
    hosted: list[str] = []  # (AArch64: functions that keep the Python host)

    def check(f, inputs, params, want, exchange=None):
        try:
            got = _on(backend, f, inputs, params, exchange)
        except backends.UnsupportedOp as e:
            dtypes = {v.type.dtype for op in f.walk() for v in (*op.operands, *op.results)}
            if not dtypes & UNSUPPORTED_DTYPES[target]:
                refused.append(str(e))
            return want
        except PythonHosted as e:
            hosted.append(str(e))
            return want
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == np.shape(w), f"{name} on {target}: shape {g.shape}, reference {np.shape(w)}"
            if np.asarray(w).dtype.kind == "f":
                np.testing.assert_allclose(g, w, rtol=TOL[target], atol=TOL[target], err_msg=f"{name} on {target}")
            else:
                np.testing.assert_array_equal(g, w, err_msg=f"{name} on {target}")
        compared.append(name)
        return want

    def both(module, inputs, params=None, func=None, cache=None, exchange=None):
        want = real(module, inputs, params, func, cache, exchange)
        return check(module.lookup(func) if func else module.funcs[-1], inputs, params, want, exchange)

    def compiled(self, inputs, weights, cache, constant_args=frozenset()):
        want = real_call(self, inputs, weights, cache, constant_args)
        return check(self.func, inputs, weights, want)

    real_call = ReferenceFunction.__call__
    monkeypatch.setattr(reference, "run_function", both)
    monkeypatch.setattr(ir_helpers, "run_function", both)
    monkeypatch.setattr(ReferenceFunction, "__call__", compiled)
    test_ops.CASES[name]()
    if name in KNOWN_UNSUPPORTED.get(target, {}):
        assert refused, f"{name} now lowers on {target}: remove it from KNOWN_UNSUPPORTED"
        return
    assert not refused, f"{name} is refused by {target}: {refused[0]}"
    if target == AARCH64 and name in PYTHON_HOSTED:
        assert hosted and all(PYTHON_HOSTED[name] in why for why in hosted), \
            f"{name}: its case's functions now run natively (remove it from PYTHON_HOSTED), or for another reason"
        return
    assert compared, f"the case of {name} ran nothing on {target}: {hosted[:1]}"


def test_known_unsupported_lists_are_empty():
    """The contract's goal: every op on every native target."""
    assert KNOWN_UNSUPPORTED == {"cpu": {}, "triton": {}}


# Programs outside the shared examples that once failed on a native target: each runs on both and matches the
# reference.
PROGRAMS = {
    "slice in a mask": ("""model M(q: f32[1, 2, 70, 16], doc: i64[71]) -> f32[1, 2, 70, 16] {
    return attention(q, q, q, mask=|b, h, i, j| doc[1:][i] == doc[1:][j])
}""", {}),
    "slice in a score": ("""model M(q: f32[1, 2, 70, 16], bias: f32[72]) -> f32[1, 2, 70, 16] {
    return attention(q, q, q, mask=|b, h, i, j| j <= i, score=|s, b, h, i, j| s + bias[2:][i])
}""", {}),
    "a 0-d input in a mask and a score": ("""model M(q: f32[1, 2, 70, 16], n: i64[]) -> f32[1, 2, 70, 16] {
    return attention(q, q, q, mask=|i, j| j <= i and (j >= i - n - 5 or j < n), score=|s, i, j| s - cast(n, f32))
}""", {}),
    "unfused scan": ("""model M(a: f32[B, L, D], b: f32[B, L, D]) -> f32[B, L, D] {
    return scan(a, b, axis=1) * 2.0
}""", {"B": 2, "L": 9, "D": 5}),
    "linear attention with a per-key decay": ("""model M(q: f32[B, L, 12], k: f32[B, L, 12], v: f32[B, L, 20], g: f32[B, L, 12]) -> f32[B, L, 20] {
    h = scan(g[:, :, :, None], k[:, :, :, None] * v[:, :, None, :], axis=1)
    return sum(h * q[:, :, :, None], axis=-2)
}""", {"B": 2, "L": 37}),
    "linear attention with a per-value decay": ("""model M(q: f32[B, L, 12], k: f32[B, L, 12], v: f32[B, L, 20], g: f32[B, L, 20]) -> f32[B, L, 20] {
    h = scan(g[:, :, None, :], k[:, :, :, None] * v[:, :, None, :], axis=1)
    return sum(h * q[:, :, :, None], axis=-2)
}""", {"B": 2, "L": 37}),
    "linear attention read over values": ("""model M(q: f32[B, L, 20], k: f32[B, L, 12], v: f32[B, L, 20], g: f32[B, L]) -> f32[B, L, 12] {
    h = scan(g[:, :, None, None], k[:, :, :, None] * v[:, :, None, :], axis=1)
    return sum(h * q[:, :, None, :], axis=-1, keepdim=true)[:, :, :, 0]
}""", {"B": 2, "L": 37}),
    "scan read over a middle axis": ("""model M(a: f32[B, L, D], b: f32[B, L, D]) -> f32[B, 4, L] {
    h = scan(a[:, :, :, None] * ones([4]), b[:, :, :, None] * ones([4]), axis=1)
    return transpose(sum(h * 2.0, axis=2), [0, 2, 1])
}""", {"B": 2, "L": 9, "D": 5}),
}


@pytest.mark.parametrize("target", ["cpu", "triton"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_programs_outside_the_examples(name, target):
    import sparsa

    if not _available(target):
        pytest.skip(f"target {target} cannot run here")
    src, sizes = PROGRAMS[name]
    ref = sparsa.compile(src, target="reference")
    rng = np.random.default_rng(0)
    inputs = []
    for t in ref.input_types:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)
        if t.dtype == "i64":
            ids = rng.integers(0, 4, shape)
            inputs.append((np.sort(ids) if ids.ndim else ids + 6).astype(np.int64))
        else:  # decays and gates in (0.5, 1): the scans stay bounded
            inputs.append(rng.uniform(0.5, 1.0, shape).astype(np.float32) if t is ref.input_types[-1] and "g" in
                          ref.input_names[-1:] else rng.standard_normal(shape).astype(np.float32))
    want = ref(*inputs)
    got = _numpy(sparsa.compile(src, target=target)(*inputs))
    np.testing.assert_allclose(got, want, rtol=TOL[target], atol=TOL[target])


@pytest.mark.parametrize("target", ["reference", "cpu", "triton", AARCH64])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_programs_match_the_reference_on_every_target(target, data):
    """Hypothesis-generated programs (test_properties.random_modules), compiled by each registered backend."""
    if not _available(target):
        pytest.skip(f"target {target} cannot run here")
    module, _ = data.draw(random_modules())
    inputs = inputs_for(module, data.draw(st.integers(0, 1000)))
    want = reference.run_function(module, inputs)
    backend = backends.get(target)
    got = _on(backend, module.funcs[0], inputs, {}) if target == AARCH64 else \
        [_numpy(o) for o in backend.compile(module.funcs[0])(inputs, {}, {})]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["cpu", "triton"])
@pytest.mark.parametrize(("capacity", "experts", "tokens", "k"), [(1.1, 7, 70, 1), (1.25, 8, 37, 2), (0.3, 5, 24, 3),
                                                                   (2.0, 3, 11, 2), (0.7, 6, 50, 2)])
def test_capacity_limits_are_one_rule_on_every_target(target, capacity, experts, tokens, k):
    """moe.dispatch keeps the same assignments everywhere: ceil(capacity * T * K / E), one function
    (`DispatchOp.capacity_limit`), where the cpu target once rounded ceil(n * (capacity / E)) (1.1, 7, 70, 1:
    11 kept by the reference, 12 by cpu)."""
    import sparsa

    if not _available(target):
        pytest.skip(f"target {target} cannot run here")
    src = (f"model M(x: f32[T, 16], i: i64[T, {k}], g: f32[T, {k}]) -> f32[T, 16] {{\n    param w: f32[{experts}, 16, 16]\n"
           f"    return moe(x, i, g, capacity={capacity}) |e, h| {{ h @ w[e] }}\n}}\n")
    rng = np.random.default_rng(tokens)
    x = rng.standard_normal((tokens, 16)).astype(np.float32)
    # half the tokens go to expert 0 first: its limit decides which are dropped (11 vs 12 kept in the first case)
    rows = [rng.permutation(experts)[:k] for _ in range(tokens)]
    rows = [r if t % 2 else np.concatenate([[0], [e for e in r if e != 0]])[:k] for t, r in enumerate(rows)]
    ids = np.stack(rows).astype(np.int64)
    gates = rng.random((tokens, k)).astype(np.float32)
    want = sparsa.compile(src, target="reference").init_weights(0)(x, ids, gates)
    got = _numpy(sparsa.compile(src, target=target).init_weights(0)(x, ids, gates))
    np.testing.assert_allclose(got, want, rtol=TOL[target], atol=TOL[target])
