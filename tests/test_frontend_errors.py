"""Bad programs: every error is `file:LINE:COL: error: ...`, the line, a caret, and what was expected."""

from __future__ import annotations

import textwrap

import pytest

import sparsa
from sparsa.frontend import CompileErrors
from sparsa.ir.diagnostics import ParseError, SparsaError


def errors_of(src: str) -> list[SparsaError]:
    src = textwrap.dedent(src).lstrip("\n")
    with pytest.raises(SparsaError) as info:
        sparsa.compile(src, target="reference")
    err = info.value
    return err.errors if isinstance(err, CompileErrors) else [err]


def check(err: SparsaError, line: int, col: int, fragment: str) -> None:
    assert (err.loc.line, err.loc.col) == (line, col), str(err)
    assert fragment in err.message, err.message
    head, text, caret = str(err).splitlines()[:3]
    assert head.startswith(f"<source>:{line}:{col}: error: ")
    assert caret == " " * (col - 1) + "^"


def test_shape_errors_name_both_shapes_and_the_dim():
    errs = errors_of("""
        const D = 64
        model M(x: f32[T, D]) -> f32[T, D] {
            param w: f32[D, 32]
            param u: f32[16, D]
            h = x @ w
            y = h @ u
            c = x + ones([3])
            return x
        }
    """)
    assert len(errs) == 2
    check(errs[0], 6, 11, "matmul of f32[T, 32] and f32[16, 64]: the inner dims 32 and 16 differ")
    check(errs[1], 7, 11, "shapes f32[T, 64] and f32[3] do not broadcast (dim -1: 64 vs 3)")


def test_names_types_and_topk():
    errs = errors_of("""
        model M(x: f32[T, 8]) -> f32[T, 8] {
            k = sofmax(x)
            a, b = topk(x, k=9)
            b2 = x and x
            y = x[0, 0, 0]
            return x
        }
    """)
    check(errs[0], 2, 9, "unknown name 'sofmax'; did you mean 'softmax'?")
    check(errs[1], 3, 22, "topk(): k = 9 is out of range; expected 1 <= k <= 8 (the last dim of f32[T, 8])")
    check(errs[2], 4, 10, "'and' needs booleans, got f32[T, 8]")
    check(errs[3], 5, 9, "too many indices (3) for f32[T, 8]")


def test_mask_and_score_must_have_the_right_type():
    errs = errors_of("""
        mask bad(q, k) = q - k
        score notfloat(s, q, k) = s > 0.0
        model M(q: f32[1, 2, S, 8]) -> f32[1, 2, S, 8] {
            return attention(q, q, q, mask=|q, k| q * 2)
        }
    """)
    check(errs[0], 1, 20, "a mask must be boolean, got i64")
    check(errs[1], 2, 29, "a score must be a float expression, got bool")
    check(errs[2], 4, 36, "a mask must be boolean, got i64")


def test_moe_body_must_be_row_wise():
    (err,) = errors_of("""
        model M(x: f32[T, 8], idx: i64[T, 2], g: f32[T, 2]) -> f32[T, 8] {
            param w: f32[4, 8, 8]
            return moe(x, idx, g) |e, h| { sum(h, axis=0, keepdim=true) @ w[e] }
        }
    """)
    check(err, 3, 36, "must be row-wise (each token on its own): sum over axis 0 sums across tokens")
    (err,) = errors_of("""
        model M(x: f32[T, 8], idx: i64[T, 2], g: f32[T, 2]) -> f32[T, 8] {
            param w: f32[4, 8, 8]
            return moe(x, idx, g) |e, h| { softmax(h @ w[e], axis=0) }
        }
    """)
    check(err, 3, 36, "softmax along axis 0 mixes tokens")


def test_model_call_mismatch_points_at_the_call():
    (err,) = errors_of("""
        model Inner(x: f32[N, 8]) -> f32[N, 4] {
            param w: f32[8, 4]
            return x @ w
        }
        model Outer(x: f32[T, 16]) -> f32[T, 4] {
            return Inner(x)
        }
    """)
    check(err, 6, 12, "input 'x' of model 'Inner' (line 1) expects f32[N, 8], got f32[T, 16] (dim 1: 8 vs 16)")


def test_return_type_is_checked():
    (err,) = errors_of("""
        model M(x: f32[T, 8]) -> f32[T, 4] {
            return x
        }
    """)
    assert "the result of model 'M' expects f32[T, 4], got f32[T, 8] (dim 1: 4 vs 8)" in err.message


def test_syntax_error_says_what_was_expected():
    (err,) = errors_of("""
        model M(x: f32[T, 8]) -> f32[T, 8] {
            y = x +
            return y
        }
    """)
    assert isinstance(err, ParseError)
    check(err, 2, 12, "unexpected end of line; expected one of")
    (err,) = errors_of("model M(x: f32[T, 8]) -> f32[T, 8] {\n  return x $ 2\n}\n")
    check(err, 2, 12, "unexpected character '$'")


def test_redefinition_and_missing_return():
    errs = errors_of("""
        const D = 4
        const D = 5
        model M(x: f32[T, D]) -> f32[T, D] {
            y = x
        }
    """)
    check(errs[0], 2, 1, "redefinition of 'D' (first defined at line 1)")
    check(errs[1], 3, 1, "model 'M' has no 'return'")


def test_data_mask_needs_its_data():
    (err,) = errors_of("""
        mask doc_causal(q, k; doc: i32[S]) = doc[q] == doc[k] and k <= q
        model M(q: f32[1, 2, S, 8]) -> f32[1, 2, S, 8] {
            return attention(q, q, q, mask=doc_causal)
        }
    """)
    check(err, 3, 36, "mask 'doc_causal' needs its data: doc_causal(doc=...)")


def test_sparse_layout_must_fit_the_shape():
    (err,) = errors_of("""
        model M(x: f32[T, 100]) -> f32[T, 64] {
            param w: f32[100, 64] sparse bsr(32, 32)
            return x @ w
        }
    """)
    check(err, 2, 27, "dim 0 of f32[100, 64] (100) is not a multiple of 32 required by sparse bsr(32, 32)")


def test_a_reserved_word_cannot_name_a_size():
    """A dim named `class` or `return` (the grammar reads either as a name there) is an error at its place, not a
    Python SyntaxError from the IR's size arithmetic."""
    for word in ("class", "return", "in", "lambda"):
        (err,) = errors_of(f"model M(x: f32[T, {word}]) -> f32[T, 4] {{\n    return x[:, 0:4]\n}}\n")
        check(err, 1, 19, f"'{word}' cannot name a size: it is a reserved word")
    sparsa.compile("const class = 4\nmodel M(x: f32[T, class]) -> f32[T, class] {\n    return x\n}\n",
                   target="reference")  # a const of that name is its value


def test_unknown_model_is_named():
    with pytest.raises(SparsaError, match=r"no model 'Nope' in <source> \(it has: M\)"):
        sparsa.compile("model M(x: f32[4]) -> f32[4] {\n return x\n}\n", model="Nope", target="reference")
