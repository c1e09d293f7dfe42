"""What a traced value's type is in Sparsa's IR: its element type, and its sizes (Dynamo's SymInts) as dims,
one dim for each class of sizes Dynamo's shape environment or its guards make equal, while a graph imports
(`traced_sizes`)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dims import Dim, check_expr
from sparsa.ir.types import TensorType


class Unsupported(SparsaError):
    """A node the importer cannot lower (the partitioner keeps such nodes in PyTorch). `node` names the FX node
    it failed at, where one is known."""

    def __init__(self, message: str, node: str | None = None):
        super().__init__(message)
        self.node = node


def torch_dtype(dtype: Any) -> str:
    import torch

    table = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
             torch.int64: "i64", torch.int32: "i32", torch.bool: "i1", torch.int8: "i8"}
    if dtype not in table:
        raise Unsupported(f"element type {dtype}")
    return table[dtype]


# While a graph is imported: the symbolic sizes met so far, each class of sizes Dynamo's shape environment
# proves equal written as its first member (a graph's inputs come first, so their sizes are the names).
_SIZES: contextvars.ContextVar[list | None] = contextvars.ContextVar("sparsa_import_sizes", default=None)
# While a graph is imported: an input's size that no input binds and the run time cannot solve for (a strided
# convolution's `(s//4)` rows, made by an op left to PyTorch), by its text, and the plain name it has instead.
_NAMED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("sparsa_import_named", default=None)


def _same_size(d: Any) -> Any:
    """d's expression, or the first one met in this import that the shape environment proves equal to it
    (under the graph's guards: a chunked scan's `2*((s-1)//2)+2` is `s` when s is even, as Dynamo guards). Where
    none is, the expression with the sizes the guards solve for written as they make them (`_guarded_solved`: a
    chunked scan's `2*(L//128)` chunk pairs, L//128 guarded 1, are 2)."""
    import sympy

    expr, env = d.node.expr, d.node.shape_env
    met = _SIZES.get()
    if met is None or isinstance(expr, sympy.Integer):
        return expr
    equal = _guarded_equal(env)
    if isinstance(equal.get(expr), sympy.Integer):  # a size the guards fix (Eq(s//16, 1)): that number
        return equal[expr]
    fixed = _guarded_solved(env)
    if expr.free_symbols and all(fixed.get(s) is not None for s in expr.free_symbols):
        return expr.xreplace(fixed)  # (of names the guards leave one value: a number, wherever it is met)
    other = _met_equal(expr, met, env, equal)
    if other is not None:
        return other
    solved = expr.xreplace(fixed)
    if solved != expr and not isinstance(solved, sympy.Integer):
        other = _met_equal(solved, met, env, equal)
        if other is not None:
            return other
    if not isinstance(solved, sympy.Integer):
        met.append(solved)
    return solved


def _met_equal(expr: Any, met: list, env: Any, equal: dict) -> Any:
    """The first size met that the guards' classes or the shape environment make equal to expr; None if none."""
    import sympy

    for other in met:
        if other == expr or equal.get(other, other) == equal.get(expr, expr):
            return other
        try:
            same = env._maybe_evaluate_static(sympy.Eq(expr, other))
        except Exception:  # noqa: BLE001 - an expression the environment cannot decide: not known equal
            same = None
        if same is not None and bool(same):
            return other
    return None


_PER_GUARDS: dict[Any, tuple[int, int, dict]] = {}


def _per_guards(build: Any) -> Any:
    """build(env), kept while the environment and its guards do not change (one environment at a time: an import
    does not outlive its graph's)."""

    @functools.wraps(build)
    def kept(env: Any) -> dict:
        hit = _PER_GUARDS.get(build)
        if hit is not None and hit[:2] == (id(env), len(env.guards)):
            return hit[2]
        value = build(env)
        _PER_GUARDS[build] = (id(env), len(env.guards), value)
        return value
    return kept


@_per_guards
def _guarded_equal(env: Any) -> dict:
    """Each size an equality guard of Dynamo's names -> one representative of its class (the guards' Eq(a, b),
    chained; a number where the class has one): sizes the guards make equal that the environment does not
    simplify (Mamba's scan under dynamic shapes guards `Eq((s-1)//2, 2*((s//2-1)//2)+1)` and `Eq(s//8, 1)`)."""
    import sympy

    parent: dict = {}

    def root(x: Any) -> Any:
        while parent.get(x, x) is not x and parent.get(x, x) != x:
            x = parent[x]
        return x

    for g in env.guards:
        e = g.expr
        if isinstance(e, sympy.Eq) and all(isinstance(a, sympy.Expr) for a in e.args):
            a, b = root(e.args[0]), root(e.args[1])
            if a != b:  # a number, where the class has one, is its representative
                a, b = (b, a) if isinstance(b, sympy.Number) else (a, b)
                parent[b] = a
    classes = {x: root(x) for x in parent}
    classes.update({r: r for r in set(classes.values())})
    return classes


@_per_guards
def _guarded_solved(env: Any) -> dict:
    """The floor divisions and remainders that the guards fix, each -> its number or the expression of names it is:
    a size in a class of `_guarded_equal` that has a number, where it is such a term, or a sum with one such term
    (Mamba2's padded length `L + (c - L % c) % c` guarded to be c, one chunk: its padding is `c - L`, so that the
    padded rows less the padding are L, as PyTorch's sizes say). A name that a guard's equality, linear in it
    alone, fixes is its number too (HF's `x[:, -logits_to_keep:]` under `dynamic=True`: Dynamo makes the 0 a
    name, s, and its view of the logits guards `Eq(32*L, 32*s + 32*L)`: the slice's `s + L` rows are L)."""
    import sympy

    classes: dict = {}
    for member, rep in _guarded_equal(env).items():
        classes.setdefault(rep, []).append(member)
    solved: dict = _guarded_names(env)
    grew = True
    while grew:
        grew = False
        for rep, members in classes.items():
            value = next((v for m in [rep, *members] if isinstance(v := m.xreplace(solved), sympy.Integer)), None)
            if value is None:
                continue
            for m in members:
                term = m.xreplace(solved)
                if isinstance(term, sympy.Integer):
                    continue
                terms = [t for t in sympy.Add.make_args(term) if _unsolved(t.as_coeff_Mul()[1], solved)]
                rest = term - terms[0] if len(terms) == 1 else None
                coeff, atom = terms[0].as_coeff_Mul() if terms else (0, None)
                if rest is not None and abs(coeff) == 1 and not rest.has(atom):  # (not in a product beside it)
                    solved[atom] = (value - rest) * coeff
                    grew = True
    solved.update(_pinned_names(env, solved))
    return solved


def _guarded_names(env: Any) -> dict:
    """Each name an equality guard fixes, being linear in it and in no other name -> its number."""
    import sympy

    fixed: dict = {}
    for g in env.guards:
        e = g.expr
        if not isinstance(e, sympy.Eq) or not all(isinstance(a, sympy.Expr) for a in e.args):
            continue
        diff = sympy.expand(e.args[0] - e.args[1])
        names = diff.free_symbols
        if len(names) != 1 or not all(isinstance(a, sympy.Symbol) for a in names):
            continue
        (name,) = names
        if diff.is_polynomial(name) and sympy.degree(diff, name) == 1:
            coeff, rest = sympy.Poly(diff, name).all_coeffs()
            if isinstance(value := -rest / coeff, sympy.Integer):
                fixed[name] = value
    return fixed


def _pinned_names(env: Any, solved: dict) -> dict:
    """Each name that the guards leave one value -> that value: a floor division of it solved for bounds it to a
    range (`Eq(L//8, 1)`: 8 <= L < 16), and one value in it meets every guard of that name alone (Mamba's parallel
    scan at L = 12 takes log2(L) steps, each a view Dynamo guards: L//8 is 1, (L - 1)//2 is 5, L is even)."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv

    pinned: dict = {}
    for atom, value in list(solved.items()):
        if not (isinstance(atom, FloorDiv) and isinstance(value, sympy.Integer) and len(atom.free_symbols) == 1):
            continue
        base, div = atom.args
        (name,) = atom.free_symbols
        shift = base - name
        if name in pinned or not isinstance(div, sympy.Integer) or not 0 < div <= 4096 or shift.free_symbols:
            continue
        alone = [g.expr for g in env.guards if g.expr.free_symbols == {name}]
        fits = [n for n in range(int(div * value - shift), int(div * value - shift + div))
                if all(g.xreplace({name: n}) == sympy.true for g in alone)]
        if len(fits) == 1:
            pinned[name] = sympy.Integer(fits[0])
    return pinned


def _unsolved(atom: Any, solved: dict) -> bool:
    """Whether a term's factor is a floor division or remainder not yet solved for (not a name: the names bind)."""
    import sympy

    return isinstance(atom, sympy.Function) and atom not in solved


def written(d: Any) -> Dim | None:
    """A size as the dim language writes it (an int, or + - * // % over names); None where it cannot."""
    try:
        return as_dim(d)
    except Unsupported:
        return None


def as_dim(d: Any) -> Dim:
    """An int, or a SymInt / sympy expression as a symbolic dim expression."""
    if isinstance(d, int):
        return d
    e = _same_size(d) if hasattr(d, "node") else d
    if getattr(e, "is_Integer", False):  # (a size the guards fix)
        return int(e)
    text = _dim_text(e).replace(" ", "")
    text = (_NAMED.get() or {}).get(text, text)
    try:
        check_expr(text)
    except ValueError:
        raise Unsupported(f"symbolic size {text}") from None
    return text


_PRINTER: list = []


def _dim_text(e: Any) -> str:
    """A size's text in the dim language: sympy's and PyTorch's remainders (`Mod(a, b)`, `PythonMod(a, b)`, of a
    positive divisor: Python's %) written with `%` (Mamba2 pads to whole chunks by `(c - s % c) % c`)."""
    if not type(e).__module__.startswith(("sympy", "torch")):
        return str(e)
    if not _PRINTER:
        from sympy.printing.str import StrPrinter

        class DimPrinter(StrPrinter):
            def _print_Mod(self, expr: Any) -> str:
                a, b = expr.args
                return f"(({self._print(a)})%({self._print(b)}))"

            _print_PythonMod = _print_Mod

        _PRINTER.append(DimPrinter())
    return _PRINTER[0].doprint(e)


def traced_at(v: Any) -> int | None:
    """An int, or the value a SymInt was traced at; None for anything else."""
    if isinstance(v, int) or v is None:
        return v
    hint = getattr(getattr(v, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def size_carried(val: Any) -> bool:
    """Whether a graph input is a size (a SymInt of one symbol, never negative) that comes in carried by the shape
    of an empty tensor, [s, 0], so that it binds its symbol as an input's shape does (a view to (B, L, D) where
    only B*L is some tensor's dim)."""
    import sympy

    if type(val).__name__ != "SymInt" or not isinstance(val.node.expr, sympy.Symbol):
        return False
    low = getattr(val.node.shape_env.var_to_range.get(val.node.expr), "lower", None)
    return low is not None and low >= 0


def tensor_type(val: Any) -> TensorType:
    return TensorType(torch_dtype(val.dtype), tuple(as_dim(d) for d in val.shape))


@contextlib.contextmanager
def traced_sizes(gm: Any) -> Iterator[None]:
    """While `gm` imports: its inputs' sizes that are plain symbols come first (an equal expression met later is
    written as the name, which binds from the inputs), and those the run time cannot solve for get names."""
    import sympy

    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    sizes = [d for v in vals for d in getattr(v, "shape", ())]
    names = [d.node.expr for d in sizes if hasattr(d, "node") and isinstance(d.node.expr, sympy.Symbol)]
    names += [v.node.expr for v in vals if size_carried(v)]
    token = _SIZES.set(list(dict.fromkeys(names)))
    named = _NAMED.set(_unsolvable(sizes, set(names)))
    try:
        yield
    finally:
        _NAMED.reset(named)
        _SIZES.reset(token)


def _unsolvable(sizes: list, names: set) -> dict[str, str]:
    """The inputs' sizes that are neither a plain name nor linear in the one name they leave unbound (the forms
    the run time binds from a shape: `s`, `2*s + 1`), as a fresh name each (`_n0`), by their text. A floor
    division's value does not give its operand back; as a name of its own, it binds from the shape it is."""
    import sympy

    out: dict[str, str] = {}
    for d in sizes:
        expr = _same_size(d) if hasattr(d, "node") else None
        if not isinstance(expr, sympy.Expr) or isinstance(expr, sympy.Symbol | sympy.Integer) or \
                expr.free_symbols <= names:
            continue
        free = sorted(expr.free_symbols - names, key=str)
        linear = len(free) == 1 and expr.is_polynomial(*free) and sympy.Poly(expr, *free).total_degree() <= 1
        text = _dim_text(expr).replace(" ", "")
        if not linear and text not in out:
            out[text] = f"_n{len(out)}"
    return out
