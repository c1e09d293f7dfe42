"""Block maps of attention masks: sound on every tile (checked exhaustively against brute force on
hypothesis-generated masks), exact on the common patterns, and used by the block-sparse reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsa
from sparsa.backends.reference.interpreter import Interpreter
from sparsa.frontend import compile_source
from sparsa.ir import VerifyError, parse_module, verify_module
from sparsa.ir.dialects.attn import AttentionOp, index_grids
from sparsa.ir.dialects.attn_blocks import EMPTY, FULL, BlockMap, classify, outer_values
from sparsa.passes import PassManager

INT_OPS = ["({} + {})", "({} - {})", "min({}, {})", "max({}, {})"]
CMP_OPS = ["<", "<=", ">", ">=", "==", "!="]


@st.composite
def int_exprs(draw, depth=2):
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(["q", "k", "q", "k", str(draw(st.integers(-6, 12)))]))
    kind = draw(st.sampled_from(["bin", "div", "mod", "mul", "abs"]))
    a = draw(int_exprs(depth - 1))
    if kind == "bin":
        return draw(st.sampled_from(INT_OPS)).format(a, draw(int_exprs(depth - 1)))
    if kind == "abs":
        return f"abs({a})"
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


def mask_setup(expr: str, S: int, seed: int):
    src = (f"mask m(q, k; doc: i32[S], table: bool[4, 4], allowed: bool[S, S]) = {expr}\n"
           f"model M(x: f32[1, 1, {S}, 4], doc: i32[{S}], table: bool[4, 4], allowed: bool[{S}, {S}]) -> "
           f"f32[1, 1, {S}, 4] {{\n    return attention(x, x, x, mask=m(doc=doc, table=table, allowed=allowed))\n}}\n")
    module, _ = compile_source(src)
    func = module.funcs[0]
    rng = np.random.default_rng(seed)
    arrays = [np.zeros((1, 1, S, 4), np.float32), np.sort(rng.integers(0, 3, S)).astype(np.int32),
              rng.random((4, 4)) > 0.5, rng.random((S, S)) > 0.3]
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
