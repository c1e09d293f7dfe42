"""Block maps of attention masks: sound on every tile (checked exhaustively against brute force on
hypothesis-generated masks), exact on the common patterns, and used by the block-sparse reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsa
from sparsa.backends import base as backends
from sparsa.backends.reference.interpreter import Interpreter
from sparsa.frontend import compile_source
from sparsa.ir import VerifyError, parse_module, verify_module
from sparsa.ir.dialects.attn import AttentionOp, index_grids
from sparsa.ir.dialects.attn_blocks import EMPTY, FULL, BlockMap, BlockMapOp, classify, outer_values
from sparsa.ir.dialects.tensor_shape import GatherOp as TensorGather
from sparsa.passes import PassManager

INT_OPS = ["({} + {})", "({} - {})", "min({}, {})", "max({}, {})"]
CMP_OPS = ["<", "<=", ">", ">=", "==", "!="]


@st.composite
def int_exprs(draw, depth=2):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(["q", "k", "q", "k", str(draw(st.integers(-6, 12)))]))
    kind = draw(st.sampled_from(["bin", "div", "mod", "mul", "abs", "neg", "where", "doc"]))
    a = draw(int_exprs(depth - 1))
    if kind == "bin":
        return draw(st.sampled_from(INT_OPS)).format(a, draw(int_exprs(depth - 1)))
    if kind == "abs":
        return f"abs({a})"
    if kind == "neg":
        return f"(-{a})"
    if kind == "where":
        return f"where({a} {draw(st.sampled_from(CMP_OPS))} q, {draw(int_exprs(depth - 1))}, {a})"
    if kind == "doc":  # data in arithmetic, at indices in range
        return draw(st.sampled_from(["doc[q]", "doc[k]", "doc[max(q - 2, 0)]", "doc[min(q, k)]"]))
    c = draw(st.integers(1, 5)) * draw(st.sampled_from([1, 1, -1]))
    return f"({a} {'//' if kind == 'div' else '%' if kind == 'mod' else '*'} {c})"


@st.composite
def bool_exprs(draw, depth=2):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        leaf = draw(st.sampled_from(["cmp", "cmp", "doc", "table", "allowed"]))
        if leaf == "cmp":
            return f"({draw(int_exprs())} {draw(st.sampled_from(CMP_OPS))} {draw(int_exprs())})"
        if leaf == "doc":
            return "(doc[q] == doc[k])"
        if leaf == "table":
            return f"table[q // {draw(st.integers(1, 4))} % 4, k // {draw(st.integers(1, 4))} % 4]"
        return "allowed[q, k]"
    kind = draw(st.sampled_from(["and", "or", "not"]))
    if kind == "not":
        return f"(not {draw(bool_exprs(depth - 1))})"
    return f"({draw(bool_exprs(depth - 1))} {kind} {draw(bool_exprs(depth - 1))})"


def mask_source(expr: str, S: int) -> str:
    return (f"mask m(q, k; doc: i32[S], table: bool[4, 4], allowed: bool[S, S]) = {expr}\n"
            f"model M(x: f32[1, 1, {S}, 4], doc: i32[{S}], table: bool[4, 4], allowed: bool[{S}, {S}]) -> "
            f"f32[1, 1, {S}, 4] {{\n    return attention(x, x, x, mask=m(doc=doc, table=table, allowed=allowed))\n}}\n")


def mask_arrays(S: int, seed: int, ids: tuple[int, int] = (0, 3), runs: bool = True) -> list[np.ndarray]:
    """x, document ids in ids[0]..ids[1]-1 (in runs, as packed documents are, or in any order), table, allowed."""
    rng = np.random.default_rng(seed)
    doc = rng.integers(*ids, S)
    return [np.zeros((1, 1, S, 4), np.float32), (np.sort(doc) if runs else doc).astype(np.int32),
            rng.random((4, 4)) > 0.5, rng.random((S, S)) > 0.3]


def mask_setup(expr: str, S: int, seed: int):
    module, _ = compile_source(mask_source(expr, S))
    func = module.funcs[0]
    arrays = mask_arrays(S, seed)
    interp = Interpreter(func)
    for a, x in zip(func.regions[0].block.args, arrays, strict=True):
        interp.values[id(a)] = interp.bind(a, x, a.name_hint)
    (att,) = [o for o in func.walk() if isinstance(o, AttentionOp)]
    return att.mask, interp


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bool_exprs(), st.integers(1, 19), st.integers(1, 19), st.integers(1, 7), st.integers(1, 7), st.integers(0, 99))
def test_block_map_is_sound(expr, S, _unused, bq, bk, seed):
    region, interp = mask_setup(expr, S, seed)
    with np.errstate(all="ignore"):
        (dense,) = interp.run_region(region, index_grids(1, 1, S, S))
    dense = np.broadcast_to(np.asarray(dense, bool), (1, 1, S, S))[0, 0]
    data = {id(v): interp.lookup(v) for v in outer_values(region)}
    kinds = classify(region, S, S, bq, bk, 1, 1, data)[0, 0]
    for i in range(kinds.shape[0]):
        for j in range(kinds.shape[1]):
            tile = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            if kinds[i, j] == EMPTY:
                assert not tile.any(), f"allowed pair in an EMPTY tile ({i}, {j}) of {expr}"
            if kinds[i, j] == FULL:
                assert tile.all(), f"disallowed pair in a FULL tile ({i}, {j}) of {expr}"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bool_exprs(), st.integers(1, 40), st.integers(1, 7), st.integers(1, 7), st.integers(0, 99), st.booleans())
def test_native_block_maps_are_the_reference_maps(expr, S, bq, bk, seed, runs):
    """The cpu kernel that classifies a data mask's tiles per call (the interval rules built as native code, data
    bounded by sparse tables and boxes) gives the map `classify` gives, tile for tile, on generated masks; ids
    negative too (floored // and % of negatives) and in any order (a range's min and max inside it)."""
    pipeline = backends.get("cpu").PIPELINE.replace("sparsify-attention",
                                                     f"sparsify-attention{{block_q={bq} block_k={bk}}}")
    expr = f"{expr} or doc[q] < -100"  # data read whatever the leaves are (ids are > -100: the same map)
    fn = sparsa.compile(mask_source(expr, S), passes=pipeline, target="cpu").native
    (op,) = [o for o in fn.func_op.walk() if isinstance(o, BlockMapOp)]
    k = fn.kernels[id(op)]
    arrays = dict(zip(["x", "doc", "table", "allowed"], mask_arrays(S, seed, (-4, 4), runs), strict=True))
    ins = [arrays[v.name_hint] for v in k.inputs]
    got = np.full((1, 1, -(-S // bq), -(-S // bk)), -1, np.int8)
    fn.call(k, ins + [np.array([S, S], np.int64), got])
    want = classify(op.mask, S, S, bq, bk, 1, 1, {id(v): a for v, a in zip(k.inputs, ins, strict=True)})
    np.testing.assert_array_equal(got, want, err_msg=expr)


def sliding(S, w, bq=64, bk=64):
    src = (f"mask sliding(q, k) = k <= q and q - k < {w}\n"
           f"model M(q: f32[1, 1, {S}, 64]) -> f32[1, 1, {S}, 64] {{\n"
           f"    return attention(q, q, q, mask=sliding)\n}}\n")
    module, _ = compile_source(src)
    pm = PassManager(f"sparsify-attention{{block_q={bq} block_k={bk}}}")
    pm.run(module)
    return pm.statistics()["sparsify-attention"]


def test_sliding_window_counts_are_exact():
    stats = sliding(4096, 256)
    # Row i >= 4: the diagonal tile and tile i-4 are PARTIAL, tiles i-1..i-3 FULL, the rest EMPTY.
    assert stats == {"blocks partial": 4 + 60 * 2, "blocks proven full": 1 + 2 + 3 + 60 * 3,
                     "blocks proven empty": 64 * 64 - 124 - 186, "block maps computed at compile time": 1}


def test_causal_and_document_maps_are_exact():
    stats = sliding(1000, 10**6, 100, 100)  # plain causal, tail-free
    assert stats["blocks partial"] == 10 and stats["blocks proven full"] == 45
    region, interp = mask_setup("doc[q] == doc[k]", 16, 0)
    doc = np.array([0] * 4 + [1] * 8 + [2] * 4, np.int32)
    data = {id(v): doc for v in outer_values(region) if v.type.shape == (16,)}
    data.update({id(v): interp.lookup(v) for v in outer_values(region) if id(v) not in data})
    kinds = classify(region, 16, 16, 4, 4, 1, 1, data)[0, 0]
    expected = np.array([[2, 0, 0, 0], [0, 2, 2, 0], [0, 2, 2, 0], [0, 0, 0, 2]])
    np.testing.assert_array_equal(kinds, expected)


def test_block_map_text_round_trips():
    data = np.random.default_rng(0).integers(0, 3, size=(1, 2, 3, 5)).astype(np.int8)
    assert BlockMap.decode(BlockMap(data).encode()) == BlockMap(data)
    with pytest.raises(ValueError, match="covers 4 key blocks, not 5"):
        BlockMap.decode("1x1x1x5:E2F2")


@pytest.mark.parametrize("S,bq,bk", [(37, 8, 16), (64, 64, 64), (5, 4, 2)])
def test_block_sparse_attention_matches_dense(S, bq, bk):
    src = """
mask m(b, h, q, k) = (k <= q and q - k < 9 + h) and not (q > 20 and q < 24)
score sc(s, q, k) = s - 0.01 * cast(abs(q - k), f32)
model M(q: f32[2, 2, S, 8], k: f32[2, 1, S, 8], v: f32[2, 1, S, 8]) -> f32[2, 2, S, 8] {
    return attention(q, k, v, mask=m, score=sc)
}
"""
    dense = sparsa.compile(src, passes="canonicalize", target="reference")
    sparse = sparsa.compile(src, passes=f"canonicalize,sparsify-attention{{block_q={bq} block_k={bk}}}", target="reference")
    assert "attn.block_map" in sparse.ir() and "attn.block_map" not in dense.ir()
    rng = np.random.default_rng(S)
    ins = [rng.standard_normal((2, h, S, 8)).astype(np.float32) for h in (2, 1, 1)]
    out = sparse(*ins)
    np.testing.assert_allclose(out, dense(*ins), rtol=1e-5, atol=1e-6)
    assert not np.isnan(out).any() and (out[:, :, 21:24] == 0).all()  # fully masked rows are zeros


def test_verifier_checks_block_map_shapes():
    text = """module {
  func.func @f(%q: tensor<1x1x6x4xf32>) -> (tensor<1x1x6x4xf32>) {
    %m = attn.block_map() ({}) {block_q = 2, block_k = 2, sq = 6, sk = 6, map = "1x1x3x3:P1E2;F1P1E1;F2P1"} : () -> tensor<1x1x3x3xi8>
    %o = attn.attention(%q, %q, %q, %m) ({
    ^bb0(%b: tensor<i64>, %h: tensor<i64>, %qi: tensor<i64>, %ki: tensor<i64>):
      %c = tensor.cmp(%ki, %qi) {pred = "le"} : (tensor<i64>, tensor<i64>) -> tensor<i1>
      func.yield(%c) : (tensor<i1>) -> ()
    }, {}) {scale = 0.5, block_q = 3, block_k = 2} : (tensor<1x1x6x4xf32>, tensor<1x1x6x4xf32>, tensor<1x1x6x4xf32>, tensor<1x1x3x3xi8>) -> tensor<1x1x6x4xf32>
    func.return(%o) : (tensor<1x1x6x4xf32>) -> ()
  }
}"""
    with pytest.raises(VerifyError, match=r"does not tile q .* in 3x2 blocks \(expected \[\*, \*, 2, 3\] of i8\)"):
        verify_module(parse_module(text))
    bad_map = text.replace("block_q = 3", "block_q = 2").replace('map = "1x1x3x3:P1E2;F1P1E1;F2P1"',
                                                                  'map = "1x1x2x3:P1E2;F1P1E1"')
    with pytest.raises(VerifyError, match=r"map of shape \[1, 1, 2, 3\] does not match \[1, 1, 3, 3\]"):
        verify_module(parse_module(bad_map))


RULES_MASK = ("where(abs(-(q // 3) * k % 4) < max(q, k) - min(q, 2), k, q + 1) == q and not (q != k) or q >= k "
              "and cast(cast(q, f32) * 0.5, i64) > 1 and cast(k, f32) <= 2.5 or (q < k) == (k > 1)")


def _interval_rules_natively(ops: list) -> tuple:
    """A native function per op that applies the op's interval rule (built by the cpu backend's namespace) to
    rows of operand bounds: in[r] = (lo0, hi0, lo1, hi1, lo2, hi2), out[r] = (lo, hi)."""
    from torch_mlir import execution_engine, ir, passmanager
    from torch_mlir.dialects import func

    from sparsa.backends.cpu import build as B
    from sparsa.backends.cpu.block_map import NativeBounds, Scalar
    from sparsa.backends.cpu.jit import PIPELINE
    from sparsa.ir.intervals import Interval, full_range

    ctx = ir.Context()
    with ctx, ir.Location.unknown():
        module = ir.Module.create()
        f64 = ir.F64Type.get()
        t = ir.MemRefType.get([ir.ShapedType.get_dynamic_size(), 6], f64)
        o = ir.MemRefType.get([ir.ShapedType.get_dynamic_size(), 2], f64)
        n = NativeBounds({})
        for i, op in enumerate(ops):
            with ir.InsertionPoint(module.body):
                fn = func.FuncOp(f"rule{i}", ir.FunctionType.get([t, o], []))
                fn.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
                entry = fn.add_entry_block()
            with ir.InsertionPoint(entry):
                src, dst = entry.arguments
                with B.nest([B.mdim(src, 0)]) as (r,):
                    args = [Interval(Scalar(B.load(src, r, 2 * j)), Scalar(B.load(src, r, 2 * j + 1)))
                            for j in range(len(op.operands))]
                    out = op.interval(n, *args)
                    out = n.result(out if out is not None else full_range(op.results[0].type))
                    B.store(out.lo.v, dst, r, 0)
                    B.store(out.hi.v, dst, r, 1)
                func.ReturnOp([])
        passmanager.PassManager.parse(PIPELINE).run(module.operation)
        engine = execution_engine.ExecutionEngine(module, opt_level=2)
    return ctx, engine


def test_every_interval_rule_is_the_same_natively():
    """Each op's interval rule, built as native code (backends/cpu/block_map.py), gives the bounds NumPy gives on
    random operand bounds: integers, halves, infinities, NaN and boolean intervals, row by row."""
    import ctypes

    from sparsa.backends.cpu.jit import _packed_args
    from sparsa.ir.core import Operation
    from sparsa.ir.intervals import Interval, NumpyBounds
    from sparsa.ir.types import is_int

    module, _ = compile_source(f"mask m(q, k) = {RULES_MASK}\nmodel M(x: f32[1, 1, 8, 4]) -> f32[1, 1, 8, 4] {{\n"
                               "    return attention(x, x, x, mask=m)\n}\n")
    (att,) = [o for o in module.funcs[0].walk() if isinstance(o, AttentionOp)]
    ops = [op for op in att.mask.block.ops if not op.TERMINATOR]
    ruled = {type(op) for op in ops if type(op).interval is not Operation.interval}
    every = {c for c in _subclasses(Operation) if "interval" in c.__dict__ and c is not Operation}
    assert every - ruled == {TensorGather}, "an op with an interval rule the mask above does not use"
    rng = np.random.default_rng(5)
    rows = 4000
    ctx, engine = _interval_rules_natively(ops)
    with ctx:
        for i, op in enumerate(ops):
            bounds = np.empty((rows, 6))
            for j, v in enumerate(op.operands):
                if v.type.dtype == "i1":
                    lo = rng.integers(0, 2, rows).astype(float)
                    hi = np.maximum(lo, rng.integers(0, 2, rows))
                else:
                    lo = rng.integers(-9, 9, rows) / rng.choice([1, 1, 2], rows)
                    hi = lo + rng.choice([0, 0, 1, 2, 5, np.inf], rows)
                    lo = np.where(rng.random(rows) < 0.1, -np.inf, lo)
                    hi = np.where(rng.random(rows) < 0.02, np.nan, hi)
                    if is_int(v.type.dtype):
                        lo, hi = np.floor(lo), np.ceil(hi)
                bounds[:, 2 * j], bounds[:, 2 * j + 1] = lo, hi
            got = np.full((rows, 2), -7.0)
            packed, _keep = _packed_args([bounds, got])
            ctypes.CFUNCTYPE(None, ctypes.c_void_p)(engine.raw_lookup(f"_mlir_ciface_rule{i}"))(packed.ctypes.data)
            n = NumpyBounds({})
            with np.errstate(all="ignore"):
                want = op.interval(n, *[n.result(Interval(bounds[:, 2 * j], bounds[:, 2 * j + 1]))
                                        for j in range(len(op.operands))])
            want = n.result(want) if want is not None else None
            if want is None:
                continue
            for side, w in enumerate((want.lo, want.hi)):
                np.testing.assert_array_equal(got[:, side], np.broadcast_to(w, (rows,)), err_msg=op.NAME)


def _subclasses(cls: type) -> set[type]:
    out = set()
    for c in cls.__subclasses__():
        out |= {c} | _subclasses(c)
    return out
