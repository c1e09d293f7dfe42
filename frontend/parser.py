"""Parses `.sp` source into the AST with lark (LALR), turning syntax errors into positioned messages."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from pathlib import Path

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from sparsa.frontend import ast as A
from sparsa.ir.diagnostics import Location, ParseError

_GRAMMAR = Path(__file__).with_name("grammar.lark")

_DESCRIBE = {"NAME": "a name", "INT": "an integer", "FLOAT": "a number", "_SEP": "a new line", "SEMICOLON": "';'",
             "COMP_OP": "a comparison", "ADD_OP": "'+' or '-'", "MUL_OP": "an operator", "$END": "end of file"}


class _DropNewlinesInBrackets:
    """Post-lexer: newlines inside (...) and [...] are whitespace; inside {...} they end statements."""

    always_accept = ("_SEP",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        depth: list[str] = []
        for tok in stream:
            if tok.type == "_SEP":
                if depth and depth[-1] in "([":
                    if ";" in tok.value:  # the data separator of a mask/score signature
                        yield Token.new_borrow_pos("SEMICOLON", ";", tok)
                    continue
            elif tok.value in ("(", "[", "{"):
                depth.append(tok.value)
            elif tok.value in (")", "]", "}") and depth:
                depth.pop()
            yield tok


@cache
def _parser() -> Lark:
    """The LALR parser, built once per process (~0.07 s). Lark's own table cache is a pickle, and nothing is
    unpickled from a cache directory, so the tables are not kept on disk."""
    return Lark(_GRAMMAR.read_text(), parser="lalr", postlex=_DropNewlinesInBrackets(),
                propagate_positions=True, maybe_placeholders=True)


def _pos(meta_or_tok: object) -> A.Pos:
    return A.Pos(getattr(meta_or_tok, "line", 1) or 1, getattr(meta_or_tok, "column", 1) or 1)


@v_args(meta=True)
class _ToAst(Transformer):
    """One method per grammar rule, building the matching AST node."""

    def start(self, meta, items):
        return items

    def const_def(self, meta, items):
        return A.Const(_pos(meta), str(items[0]), items[1])

    def _fn(self, kind, meta, items):
        name, params, _semicolon, data, body = items
        return A.MaskDef(_pos(meta), kind, str(name), params, data or [], body)

    def mask_def(self, meta, items):
        return self._fn("mask", meta, items)

    def score_def(self, meta, items):
        return self._fn("score", meta, items)

    def index_params(self, meta, items):
        return [str(t) for t in items]

    def data_params(self, meta, items):
        return items

    def data_param(self, meta, items):
        return A.DataParam(_pos(meta), str(items[0]), items[1])

    def model_def(self, meta, items):
        name, *args, returns, body = items
        return A.Model(_pos(meta), str(name), [a for a in args if a is not None], returns, body)

    def model_arg(self, meta, items):
        return A.ModelArg(_pos(meta), str(items[0]), items[1])

    def return_types(self, meta, items):
        return items

    def type(self, meta, items):
        name, *dims = items
        return A.TypeExpr(_pos(meta), str(name), None if dims == [None] else [d for d in dims if d is not None])

    def block(self, meta, items):
        return A.Block(_pos(meta), items)

    def param_stmt(self, meta, items):
        return A.Param(_pos(meta), str(items[0]), items[1], items[2])

    def layout(self, meta, items):
        return A.Layout(_pos(meta), str(items[0]), items[1:])

    def assign(self, meta, items):
        return A.Assign(_pos(meta), [str(t) for t in items[:-1]], items[-1])

    def for_stmt(self, meta, items):
        return A.For(_pos(meta), str(items[0]), items[1], items[2], items[3])

    def return_stmt(self, meta, items):
        return A.Return(_pos(meta), items)

    def expr_stmt(self, meta, items):
        return A.ExprStmt(_pos(meta), items[0])

    def lambda_expr(self, meta, items):
        return A.Lambda(_pos(meta), [str(t) for t in items[:-1]], items[-1])

    def or_op(self, meta, items):
        return A.BinOp(_pos(meta), "or", items[0], items[1])

    def and_op(self, meta, items):
        return A.BinOp(_pos(meta), "and", items[0], items[1])

    def not_op(self, meta, items):
        return A.Unary(_pos(meta), "not", items[0])

    def compare(self, meta, items):
        lhs, op, rhs = items
        return A.Compare(_pos(op), str(op), lhs, rhs)

    def binop(self, meta, items):
        lhs, op, rhs = items
        return A.BinOp(_pos(op), str(op), lhs, rhs)

    def unary(self, meta, items):
        return A.Unary(_pos(meta), str(items[0]), items[1])

    def pow_op(self, meta, items):
        return A.BinOp(_pos(items[1]), "**", items[0], items[2])

    def index(self, meta, items):
        return A.Index(_pos(meta), items[0], items[1:])

    def call(self, meta, items):
        func, *args, block = items
        return A.Call(_pos(meta), func, [a for a in args if a is not None], block)

    def attribute(self, meta, items):
        return A.Attribute(_pos(meta), items[0], str(items[1]))

    def int_lit(self, meta, items):
        return A.Num(_pos(meta), int(items[0]))

    def float_lit(self, meta, items):
        return A.Num(_pos(meta), float(items[0]))

    def true_lit(self, meta, items):
        return A.Bool(_pos(meta), True)

    def false_lit(self, meta, items):
        return A.Bool(_pos(meta), False)

    def inf_lit(self, meta, items):
        return A.Num(_pos(meta), float("inf"))

    def none_lit(self, meta, items):
        return A.NoneLit(_pos(meta))

    def name(self, meta, items):
        return A.NoneLit(_pos(meta)) if str(items[0]) == "None" else A.Name(_pos(meta), str(items[0]))

    def list_lit(self, meta, items):
        return A.ListLit(_pos(meta), [i for i in items if i is not None])

    def keyword_arg(self, meta, items):
        return A.Arg(_pos(meta), str(items[0]), items[1])

    def positional_arg(self, meta, items):
        return A.Arg(_pos(meta), None, items[0])

    def slice(self, meta, items):
        return A.Slice(_pos(meta), *items)

    def ellipsis(self, meta, items):
        return A.EllipsisLit(_pos(meta))


def _expected(err: UnexpectedInput, parser: Lark) -> str:
    names = sorted(getattr(err, "expected", None) or getattr(err, "allowed", None) or [])
    shown = []
    for n in names:
        if n in _DESCRIBE:
            shown.append(_DESCRIBE[n])
            continue
        try:
            pattern = parser.get_terminal(n).pattern
        except KeyError:
            continue
        shown.append(repr(pattern.value) if isinstance(pattern, PatternStr) else n.lower())
    shown = sorted(set(shown))
    if not shown:
        return ""
    if len(shown) > 8:
        shown = shown[:8] + ["..."]
    return "; expected " + (shown[0] if len(shown) == 1 else "one of " + ", ".join(shown))


def parse_source(text: str, filename: str = "<source>") -> list[A.Node]:
    """The definitions of a `.sp` file, in order; raises ParseError at the first syntax error."""
    parser = _parser()
    if not text.endswith("\n"):
        text += "\n"
    try:
        tree = parser.parse(text)
    except UnexpectedToken as e:
        tok = e.token
        what = "end of file" if tok.type == "$END" else ("end of line" if tok.type == "_SEP" else repr(str(tok)))
        line, col = (tok.line, tok.column) if tok.type != "$END" else _end(text)
        if tok.type == "_SEP":
            col = len(text.splitlines()[line - 1]) + 1 if line <= len(text.splitlines()) else col
        raise ParseError(f"unexpected {what}{_expected(e, parser)}", Location(filename, line, col), text) from None
    except UnexpectedCharacters as e:
        raise ParseError(f"unexpected character {text[e.pos_in_stream]!r}", Location(filename, e.line, e.column),
                         text) from None
    except UnexpectedEOF as e:
        line, col = _end(text)
        raise ParseError(f"unexpected end of file{_expected(e, parser)}", Location(filename, line, col), text) from None
    return _ToAst().transform(tree)


def _end(text: str) -> tuple[int, int]:
    lines = text.rstrip("\n").splitlines() or [""]
    return len(lines), len(lines[-1]) + 1
