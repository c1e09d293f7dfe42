"""Analyses of a function that the runtime and every backend share (not interpretation, not a pass):
which ops read only weights, and binding a call's shapes to a signature's symbolic dims."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sparsa.ir import attrs as A
from sparsa.ir.core import Operation
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dims import Dim, evaluate, format_dim, is_symbol, symbols
from sparsa.ir.types import TensorType


@dataclass
class Cost:
    """What one executed op cost: FLOPs a dense computation of it would take, FLOPs it did, a note on the
    kernel it chose, bytes it read and wrote (None: its operands' and results' sizes), and for `explain` its
    block map or tokens per expert."""

    dense: float
    done: float
    note: str = ""
    bytes: float | None = None
    block_map: Any = None
    tokens_per_expert: list[int] | None = None


class RuntimeShapeError(SparsaError):
    """An input or weight whose shape or dtype does not fit the function's signature."""


class Sizes:
    """A call's sizes by name, as the ops' rules read them outside an interpreter (`dim`, `shape_of`, as the
    reference interpreter gives them): a native host's plan, a launcher's checks."""

    def __init__(self, dims: dict[str, int]):
        self.dims = dims

    def dim(self, d: Dim) -> int:
        return evaluate(d, self.dims)

    def shape_of(self, t: TensorType) -> tuple[int, ...]:
        return tuple(evaluate(d, self.dims) for d in t.shape)


def weight_only_ops(func: Operation, constant_args: frozenset[int] = frozenset()) -> set[int]:
    """Ids of the function's top-level ops that read only weights (params, packing), or function arguments
    the caller promises are the same on every call (`constant_args`, by index: a torch model's parameters), and
    whose sizes are not the call's (a position buffer's first L columns, L symbolic, are made per call)."""
    values: set[int] = {id(a) for i, a in enumerate(func.regions[0].block.args) if i in constant_args}
    ops: set[int] = set()
    for op in func.regions[0].block.ops:
        if op.NAME == "func.param" or (op.operands and not op.regions and not op.TERMINATOR
                                       and all(id(v) in values for v in op.operands)
                                       and not any(isinstance(d, str) for d in sizes_of(op))):
            ops.add(id(op))
            values.update(id(r) for r in op.results)
    return ops


def bind_names(pairs: Iterable[tuple[TensorType, tuple[int, ...]]], dims: dict[str, int]) -> None:
    """Bind the plain symbolic dims of all inputs first (bind_shape checks each input after): an expression in an
    earlier input's shape is then evaluated, not solved for a symbol a later input binds (a solve finds no value
    where the expression is not linear in it, and may divide by zero: `((s+p)//8)*((s+p)//((s+p)//8))`)."""
    for t, shape in pairs:
        if len(shape) == t.rank:
            for d, n in zip(t.shape, shape, strict=True):
                if is_symbol(d):
                    dims.setdefault(d, n)


def bind_shape(t: TensorType, shape: tuple[int, ...], dims: dict[str, int], what: str) -> None:
    """Check a shape against type `t`, binding its symbolic dims in `dims` (consistently across calls)."""
    if len(shape) != t.rank:
        raise RuntimeShapeError(f"{what} must have rank {t.rank} ({t}), got shape {list(shape)}")
    for axis, (d, n) in enumerate(zip(t.shape, shape, strict=True)):
        if isinstance(d, int) and d != n:
            raise RuntimeShapeError(f"{what} must have shape {t}, got {list(shape)} (dim {axis} is {n}, "
                                    f"expected {d})")
        if is_symbol(d):
            bound = dims.setdefault(d, n)
            if bound != n:
                raise RuntimeShapeError(f"{what}: dim {axis} is {n} but {d} = {bound} from an earlier input")
    for axis, (d, n) in enumerate(zip(t.shape, shape, strict=True)):  # expressions (2*s: a graph's T*K rows)
        if not isinstance(d, str) or is_symbol(d):
            continue
        unknown = symbols(d) - dims.keys()
        if len(unknown) == 1:
            (s,) = unknown
            value = _solve(d, s, n, dims)
            if value is None:
                raise RuntimeShapeError(f"{what}: dim {axis} is {n}, which {format_dim(d)} is for no {s}")
            dims[s] = value
        if not symbols(d) - dims.keys() and evaluate(d, dims) != n:
            raise RuntimeShapeError(f"{what}: dim {axis} is {n} but {format_dim(d)} = {evaluate(d, dims)}")


def sizes_of(op: Operation) -> Iterator[Dim]:
    """The sizes an op's result types and its dim attributes (a slice's bounds, a reshape's shape) are made of."""
    for r in op.results:
        yield from getattr(r.type, "shape", ())
    for field in type(op).attr_fields:
        value = getattr(op, field.name)
        if isinstance(field.kind, A.DimListKind) and value is not None:
            yield from value
        elif isinstance(field.kind, A.DimKind):
            yield value


def bindable(shapes: Iterable[tuple[Dim, ...]]) -> set[str]:
    """The names a call binds from inputs of these shapes, as `bind_names` and `bind_shape` do: the plain names,
    then, over and over, the one name an expression leaves unbound where it is solved for (`_solve`: a floor
    division by it, `128//s`, is not; a size made of a name no input binds cannot be computed at run time)."""
    dims = [d for shape in shapes for d in shape if isinstance(d, str)]
    known = {d for d in dims if is_symbol(d)}
    grew = True
    while grew:
        grew = False
        for d in dims:
            unknown = symbols(d) - known
            if len(unknown) == 1 and _solvable(d, *unknown, known):
                known |= unknown
                grew = True
    return known


def binders(candidates: Sequence[tuple[Dim, ...]], kept: Iterable[tuple[Dim, ...]], needed: set[str]) -> list[int]:
    """Which of `candidates` (shapes, by index, in the order given) a call must also take, beside inputs of the
    shapes `kept`, to bind every name in `needed`: each candidate that names one still unbound, until none is
    (each binding what `bindable` says it does)."""
    shapes = list(kept)
    unbound = needed - bindable(shapes)
    picked = []
    for i, shape in enumerate(candidates):
        if unbound & set(shape):
            picked.append(i)
            shapes.append(shape)
            unbound = needed - bindable(shapes)
    return picked


def _solvable(d: str, s: str, known: set[str]) -> bool:
    """Whether `_solve` can solve d for s (others at a probe value): its probes divide by no zero, d moves with
    s, and moves as a line (a*s + b at each probe: not a length padded to a multiple, `s + (8 - s % 8) % 8`, which
    `_solve` finds no s for)."""
    probe = dict.fromkeys(known, 3)
    try:
        b = evaluate(d, {**probe, s: 0})
        a = evaluate(d, {**probe, s: 1}) - b
        return a != 0 and all(evaluate(d, {**probe, s: x}) == a * x + b for x in (2, 3, 5, 8, 13))
    except ZeroDivisionError:
        return False


def _solve(d: str, s: str, n: int, dims: dict[str, int]) -> int | None:
    """The value of s making dim expression d equal n, where d is linear in s (a*s + b), else None."""
    b = evaluate(d, {**dims, s: 0})
    a = evaluate(d, {**dims, s: 1}) - b
    if a == 0 or (n - b) % a or (n - b) // a < 0:
        return None
    value = (n - b) // a
    return value if evaluate(d, {**dims, s: value}) == n else None


def check_int_range(lo: int, hi: int, dtype: str, what: str) -> None:
    """RuntimeShapeError when integers in [lo, hi] (an input's) do not fit integer type `dtype` (narrowing would
    wrap them silently)."""
    bits = {"i8": 8, "i32": 32, "i64": 64}.get(dtype)
    if bits is None:
        return
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if lo < low or hi > high:
        raise RuntimeShapeError(f"{what} has values in [{lo}, {hi}], outside {dtype}'s range [{low}, {high}]")
