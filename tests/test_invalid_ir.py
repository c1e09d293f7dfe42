"""Malformed and invalid IR: positioned parse errors and named verifier errors."""

from __future__ import annotations

import pytest

from sparsa.ir import ParseError, VerifyError, parse_module, verify_module

HEAD = "module {\n  func.func @f(%x: tensor<4x8xf32>) -> (tensor<4x8xf32>) {\n"
TAIL = "    func.return(%x) : (tensor<4x8xf32>) -> ()\n  }\n}\n"

PARSE_ERRORS = [
    # (body line, expected message fragment, column of the caret)
    ("    %y = tensor.add(%x, %z) : (tensor<4x8xf32>, tensor<4x8xf32>) -> tensor<4x8xf32>",
     "use of undefined value %z", 25),
    ("    %y = tensor.frobnicate(%x) : (tensor<4x8xf32>) -> tensor<4x8xf32>", "unknown op 'tensor.frobnicate'", 10),
    ("    %y = tensor.exp(%x) : (tensor<4x8xf33>) -> tensor<4x8xf32>", "expected an element type", 39),
    ("    %y = tensor.exp(%x) : (tensor<4x8xf32>) -> tensor<4x8xf32", "'>' closing the tensor type", 62),
    ("    %y = tensor.sum(%x) {axis = [1]} : (tensor<4x8xf32>) -> tensor<4xf32>",
     "'tensor.sum' has no attribute 'axis' (it has: axes, keepdim)", 26),
    ("    %y = tensor.sum(%x) {axes = 1} : (tensor<4x8xf32>) -> tensor<4xf32>",
     "attribute 'axes' of 'tensor.sum': expected a list of integers, got 1", 33),
    ("    %y = tensor.exp(%x) : (tensor<4x4xf32>) -> tensor<4x8xf32>", "do not match the operands' types", 27),
    ("    %y, %z = tensor.exp(%x) : (tensor<4x8xf32>) -> tensor<4x8xf32>", "names 2 results but its type has 1", 5),
    ("    %x = tensor.exp(%x) : (tensor<4x8xf32>) -> tensor<4x8xf32>", "redefinition of %x", 5),
    ("    %y = tensor.sum(%x) : (tensor<4x8xf32>) -> tensor<4xf32>", "'tensor.sum' needs attribute 'axes'", 10),
    ("    %y = tensor.cmp(%x, %x) {pred = lt} : (tensor<4x8xf32>, tensor<4x8xf32>) -> tensor<4x8xi1>",
     "expected a string, got lt", 37),
]


@pytest.mark.parametrize("line,message,col", PARSE_ERRORS)
def test_parse_error_is_positioned(line, message, col):
    with pytest.raises(ParseError) as info:
        parse_module(HEAD + line + "\n" + TAIL, "bad.sir")
    err = info.value
    assert message in err.message
    assert (err.loc.file, err.loc.line, err.loc.col) == ("bad.sir", 3, col)
    text = str(err).splitlines()
    assert text[0].startswith(f"bad.sir:3:{col}: error: ")
    assert text[1] == line
    assert text[2] == " " * (col - 1) + "^"


def test_truncated_input():
    with pytest.raises(ParseError, match="unexpected end of input inside a block"):
        parse_module(HEAD)


VERIFY_ERRORS = [
    ("    %y = tensor.exp(%x) : (tensor<4x8xf32>) -> tensor<4x9xf32>",
     "result type tensor<4x9xf32> does not match the inferred type tensor<4x8xf32>"),
    ("    %c = tensor.constant() {value = 1} : () -> tensor<3xf32>\n"
     "    %y = tensor.add(%x, %c) : (tensor<4x8xf32>, tensor<3xf32>) -> tensor<4x8xf32>",
     "operands tensor<4x8xf32> and tensor<3xf32> do not broadcast"),
    ("    %y = tensor.matmul(%x, %x) : (tensor<4x8xf32>, tensor<4x8xf32>) -> tensor<4x8xf32>",
     "contracts dim 8 of tensor<4x8xf32> with dim 4 of tensor<4x8xf32>"),
    ("    %c = tensor.constant() {value = 1.5} : () -> tensor<i32>", "value 1.5 does not fit element type i32"),
    ("    %y = tensor.transpose(%x) {perm = [0, 0]} : (tensor<4x8xf32>) -> tensor<4x4xf32>",
     "perm [0, 0] is not a permutation"),
    ("    %v, %i = tensor.topk(%x) {k = 9} : (tensor<4x8xf32>) -> (tensor<4x9xf32>, tensor<4x9xi64>)",
     "k = 9 must be in 1..8"),
    ("    %y = tensor.reshape(%x) {shape = [5, 7]} : (tensor<4x8xf32>) -> tensor<5x7xf32>",
     "cannot reshape tensor<4x8xf32> (32 elements) to [5, 7] (35 elements)"),
    ("    func.return(%x) : (tensor<4x8xf32>) -> ()", "is a terminator and must be the last op of its block"),
    ("    %y = tensor.and(%x, %x) : (tensor<4x8xf32>, tensor<4x8xf32>) -> tensor<4x8xf32>",
     "needs bool operands, got f32"),
    ("    %y = tensor.sum(%x) {axes = [2]} : (tensor<4x8xf32>) -> tensor<4xf32>", "axis 2 is out of range for rank 2"),
    ("    %y = tensor.solve_triangular(%x, %x) : (tensor<4x8xf32>, tensor<4x8xf32>) -> tensor<4x8xf32>",
     "needs a square A, got tensor<4x8xf32>"),
    ("    %a = tensor.constant() {value = 1.0} : () -> tensor<8x8xf32>\n"
     "    %y = tensor.solve_triangular(%a, %x) : (tensor<8x8xf32>, tensor<4x8xf32>) -> tensor<4x8xf32>",
     "solves A of 8 rows for B of 4 rows"),
    ("    %a = tensor.constant() {value = 1.0} : () -> tensor<2x4x4xf32>\n"
     "    %y = tensor.solve_triangular(%a, %x) : (tensor<2x4x4xf32>, tensor<4x8xf32>) -> tensor<4x8xf32>",
     "needs A [..., n, n] and B [..., n, k] of one rank"),
    ("    %a = tensor.constant() {value = 1.0} : () -> tensor<2x4x4xf32>\n"
     "    %b = tensor.constant() {value = 1.0} : () -> tensor<3x4x8xf32>\n"
     "    %y = tensor.solve_triangular(%a, %b) : (tensor<2x4x4xf32>, tensor<3x4x8xf32>) -> tensor<3x4x8xf32>",
     "needs the same batch dims in A and B (broadcast them first)"),
    ("    %a = tensor.constant() {value = 1} : () -> tensor<4x4xi64>\n"
     "    %y = tensor.solve_triangular(%a, %a) : (tensor<4x4xi64>, tensor<4x4xi64>) -> tensor<4x4xi64>",
     "needs float operands"),
]


@pytest.mark.parametrize("body,message", VERIFY_ERRORS)
def test_verifier_names_the_problem(body, message):
    module = parse_module(HEAD + body + "\n" + TAIL, "bad.sir")
    with pytest.raises(VerifyError) as info:
        verify_module(module)
    assert message in str(info.value)


def test_wrong_return_type():
    text = HEAD.replace("-> (tensor<4x8xf32>)", "-> (tensor<4x8xi32>)") + TAIL
    with pytest.raises(VerifyError, match=r"returns \(tensor<4x8xf32>\) but @f declares \(tensor<4x8xi32>\)"):
        verify_module(parse_module(text))


def test_moe_body_must_yield_rows():
    text = """module {
  func.func @f(%x: tensor<4x8xf32>, %i: tensor<4x1xi64>, %g: tensor<4x1xf32>) -> (tensor<4x8xf32>) {
    %y = moe.moe(%x, %i, %g) ({
    ^bb0(%e: tensor<i64>, %h: tensor<?x8xf32>):
      %s = tensor.sum(%h) {axes = [0]} : (tensor<?x8xf32>) -> tensor<8xf32>
      func.yield(%s) : (tensor<8xf32>) -> ()
    }) {num_experts = 2} : (tensor<4x8xf32>, tensor<4x1xi64>, tensor<4x1xf32>) -> tensor<4x8xf32>
    func.return(%y) : (tensor<4x8xf32>) -> ()
  }
}"""
    with pytest.raises(VerifyError, match="expert body must yield one 2-D tensor"):
        verify_module(parse_module(text))


def test_attention_mask_must_be_boolean():
    text = """module {
  func.func @f(%q: tensor<1x2x4x8xf32>) -> (tensor<1x2x4x8xf32>) {
    %o = attn.attention(%q, %q, %q) ({
    ^bb0(%b: tensor<i64>, %h: tensor<i64>, %qi: tensor<i64>, %ki: tensor<i64>):
      %d = tensor.sub(%qi, %ki) : (tensor<i64>, tensor<i64>) -> tensor<i64>
      func.yield(%d) : (tensor<i64>) -> ()
    }, {}) {scale = 0.5} : (tensor<1x2x4x8xf32>, tensor<1x2x4x8xf32>, tensor<1x2x4x8xf32>) -> tensor<1x2x4x8xf32>
    func.return(%o) : (tensor<1x2x4x8xf32>) -> ()
  }
}"""
    module = parse_module(text)
    with pytest.raises(VerifyError, match="mask region must yield a scalar i1, got tensor<i64>"):
        verify_module(module)


LAYOUT_ERRORS = [
    ("""%p, %o = moe.dispatch(%i) {num_experts = 4} : (tensor<4x2xi64>) -> (tensor<?xi64>, tensor<5xi64>)
    %y = moe.grouped_matmul_combine(%x, %p, %o, %w, %g) ({
    ^bb0(%r: tensor<?x8xf32>):
      func.yield(%r) : (tensor<?x8xf32>) -> ()
    }) {topk = 2, gather = true} : (tensor<4x8xf32>, tensor<?xi64>, tensor<5xi64>, tensor<3x8x8xf32>, tensor<4x2xf32>) -> tensor<4x8xf32>""",
     "offsets tensor<5xi64> must have one entry per expert plus one, for weights with 3 experts"),
    ("""%rp = func.param() {name = "rp"} : () -> tensor<3xi64>
    %ci = func.param() {name = "ci"} : () -> tensor<?xi64>
    %b = func.param() {name = "b"} : () -> tensor<?x2x2xf32>
    %y = sparse.bsr_matmul(%x, %rp, %ci, %b) {cols = 8} : (tensor<4x8xf32>, tensor<3xi64>, tensor<?xi64>, tensor<?x2x2xf32>) -> tensor<4x8xf32>""",
     "2 block rows of 2 do not cover the 8 inputs of tensor<4x8xf32>"),
]


@pytest.mark.parametrize("body,message", LAYOUT_ERRORS)
def test_sparse_metadata_is_verified(body, message):
    text = ("module {\n  func.func @f(%x: tensor<4x8xf32>, %i: tensor<4x2xi64>, %g: tensor<4x2xf32>, "
            "%w: tensor<3x8x8xf32>) -> (tensor<4x8xf32>) {\n    " + body +
            "\n    func.return(%y) : (tensor<4x8xf32>) -> ()\n  }\n}\n")
    with pytest.raises(VerifyError, match=message):
        verify_module(parse_module(text))


@pytest.mark.parametrize("group_top", [0, 3])
def test_route_group_top_is_checked(group_top):
    """A group of 2 experts has no third best (the cpu kernel read and wrote index -1 for it)."""
    text = ("module {\n  func.func @f(%x: tensor<4x8xf32>) -> (tensor<4x2xf32>) {\n"
            f"    %w, %e = moe.route(%x) {{score = \"softmax\", k = 2, groups = 4, group_top = {group_top}, "
            "groups_kept = 2} : (tensor<4x8xf32>) -> (tensor<4x2xf32>, tensor<4x2xi64>)\n"
            "    func.return(%w) : (tensor<4x2xf32>) -> ()\n  }\n}\n")
    with pytest.raises((ParseError, VerifyError), match=rf"group_top = {group_top} must be in 1..2"):
        verify_module(parse_module(text, "route.sir"))
