"""Tensor dimensions: static ints, symbolic expressions over named sizes, or unknown (`?`).

A symbolic dim is a string in a small integer language (`T`, `B*S`, `(S+63)//64`); the
same name means the same size everywhere in a function. Symbols are bound from the
shapes of a call's inputs and expressions are evaluated against those bindings.
"""

from __future__ import annotations

import ast
import functools
import itertools
import re

Dim = int | str | None

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def format_dim(d: Dim) -> str:
    """Textual form inside a tensor type: `512`, `?`, `{T}`."""
    if d is None:
        return "?"
    if isinstance(d, int):
        return str(d)
    return "{" + d + "}"


def is_symbol(d: Dim) -> bool:
    """True for a bare symbolic name like `T`."""
    return isinstance(d, str) and bool(_NAME.match(d))


def symbols(d: Dim) -> set[str]:
    """Names a dim expression mentions."""
    if not isinstance(d, str):
        return set()
    return {n.id for n in ast.walk(ast.parse(d, mode="eval")) if isinstance(n, ast.Name)}


def check_expr(text: str) -> None:
    """Raise ValueError unless `text` is a valid dim expression."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"malformed dim expression {text!r}") from e
    for node in ast.walk(tree):
        if not isinstance(
            node,
            ast.Expression | ast.BinOp | ast.Name | ast.Constant | ast.Load | ast.Add | ast.Sub | ast.Mult
            | ast.FloorDiv | ast.Mod | ast.UnaryOp | ast.USub,
        ):
            raise ValueError(f"dim expression {text!r} may only use names, integers and + - * // %")
        if isinstance(node, ast.Constant) and not isinstance(node.value, int):
            raise ValueError(f"dim expression {text!r} has a non-integer constant")


def evaluate(d: Dim, bindings: dict[str, int]) -> int:
    """Value of a dim under `bindings`; raises KeyError naming an unbound symbol."""
    if isinstance(d, int):
        return d
    if d is None:
        raise KeyError("?")
    return _eval(ast.parse(d, mode="eval").body, bindings)


def _eval(node: ast.AST, env: dict[str, int]) -> int:
    if isinstance(node, ast.Constant):
        return int(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        return -_eval(node.operand, env)
    assert isinstance(node, ast.BinOp)
    a, b = _eval(node.left, env), _eval(node.right, env)
    ops = {ast.Add: a.__add__, ast.Sub: a.__sub__, ast.Mult: a.__mul__, ast.FloorDiv: a.__floordiv__,
           ast.Mod: a.__mod__}
    return ops[type(node.op)](b)


def mul(a: Dim, b: Dim) -> Dim:
    """Product of two dims, folded when both are static."""
    if a is None or b is None:
        return None
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    if a == 1:
        return b
    if b == 1:
        return a
    return f"{_paren(a)}*{_paren(b)}"


def _paren(d: int | str) -> str:
    s = str(d)
    return s if isinstance(d, int) or _NAME.match(s) or "+" not in s and "-" not in s else f"({s})"


def compatible(a: Dim, b: Dim) -> bool:
    """Whether two dims may describe the same size (`?` matches anything)."""
    return a is None or b is None or same(a, b)


def same(a: Dim, b: Dim) -> bool:
    """Whether two known dims are the same size for every binding: equal after `canonical` (`s2*s1` is `s1*s2`,
    `s*(t+1-1)` is `s*t`; floor divisions and remainders compare by their canonical operands)."""
    if a == b:
        return True
    if a is None or b is None:
        return False
    return canonical(a) == canonical(b)


def same_shape(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> bool:
    """Whether two shapes have the same rank and `same` dims."""
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


@functools.lru_cache(maxsize=4096)
def canonical(d: int | str) -> int | str:
    """A dim in one written form, for comparing (not for printing): its polynomial in the names and in the floor
    divisions and remainders (each of canonical operands), terms by their factors, the constant last; an int if
    that is all it is."""
    if isinstance(d, int):
        return d
    poly = _poly(ast.parse(d, mode="eval").body)
    terms = [(m, c) for m, c in sorted(poly.items(), key=lambda mc: (not mc[0], mc[0])) if c]
    if not terms:
        return 0
    if len(terms) == 1 and not terms[0][0]:
        return terms[0][1]
    text = ""
    for monomial, c in terms:
        factors = ([] if abs(c) == 1 and monomial else [str(abs(c))]) + list(monomial)
        text += ("-" if c < 0 else "+" if text else "") + "*".join(factors)
    return text


def _poly(node: ast.AST) -> dict[tuple[str, ...], int]:
    """An expression as {sorted factors: coefficient}; a floor division or remainder is one factor."""
    if isinstance(node, ast.Constant):
        return {(): int(node.value)}
    if isinstance(node, ast.Name):
        return {(node.id,): 1}
    if isinstance(node, ast.UnaryOp):
        return {m: -c for m, c in _poly(node.operand).items()}
    assert isinstance(node, ast.BinOp)
    if isinstance(node.op, ast.FloorDiv | ast.Mod):
        left, right = (canonical(ast.unparse(x)) for x in (node.left, node.right))
        return {(f"(({left}){'//' if isinstance(node.op, ast.FloorDiv) else '%'}({right}))",): 1}
    a, b = _poly(node.left), _poly(node.right)
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node.op, ast.Mult):
        for (ma, ca), (mb, cb) in itertools.product(a.items(), b.items()):
            m = tuple(sorted(ma + mb))
            out[m] = out.get(m, 0) + ca * cb
        return out
    sign = 1 if isinstance(node.op, ast.Add) else -1
    for m, c in a.items():
        out[m] = out.get(m, 0) + c
    for m, c in b.items():
        out[m] = out.get(m, 0) + sign * c
    return out


def broadcast(a: Dim, b: Dim) -> Dim:
    """NumPy broadcast of two dims; raises ValueError when they cannot broadcast."""
    if a == 1:
        return b
    if b == 1:
        return a
    if a is None:
        return b
    if b is None:
        return a
    if same(a, b):
        return a
    raise ValueError(f"dims {format_dim(a)} and {format_dim(b)} do not broadcast")


def broadcast_shapes(*shapes: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """NumPy broadcast of several shapes; raises ValueError naming the offending dims."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = [1] * rank
    for s in shapes:
        padded = (1,) * (rank - len(s)) + tuple(s)
        out = [broadcast(x, y) for x, y in zip(out, padded, strict=True)]
    return tuple(out)
