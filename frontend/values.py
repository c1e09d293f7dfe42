"""What names and expressions stand for while lowering: tensors, literals, dims, models, masks, errors."""

from __future__ import annotations

from dataclasses import dataclass

from sparsa.frontend import ast as A
from sparsa.ir.diagnostics import Location, SparsaError
from sparsa.ir.dims import Dim, format_dim


@dataclass(frozen=True)
class Lit:
    """A Python scalar not yet tied to a tensor: `2`, `0.5`, `true`, a `const`, a loop variable."""

    value: int | float | bool

    @property
    def kind(self) -> str:
        return "bool" if isinstance(self.value, bool) else ("int" if isinstance(self.value, int) else "float")


@dataclass(frozen=True)
class DimRef:
    """A named size of the model (`T`, `S`): usable in shapes and `iota`, not as a tensor value."""

    name: str
    dim: Dim


@dataclass(frozen=True)
class ModelRef:
    """A model named in an expression; `index` is the instance (`Layer[2]`), 0 when called bare."""

    model: A.Model
    index: int = 0


@dataclass(frozen=True)
class FnRef:
    """A `mask` or `score` function, possibly applied to its data (`doc_causal(doc=ids)`)."""

    fn: A.MaskDef
    data: tuple = ()


@dataclass(frozen=True)
class LambdaRef:
    """An inline `|q, k| ...` function, lowered where it is used."""

    node: A.Lambda


def show_dim(d: Dim) -> str:
    return format_dim(d).strip("{}")


class FrontendError(SparsaError):
    """A positioned error in a `.sp` program."""


class CompileErrors(SparsaError):
    """Every error found in a program, in source order; str() prints them all."""

    def __init__(self, errors: list[SparsaError]):
        errors = sorted(errors, key=lambda e: (e.loc.line, e.loc.col) if e.loc else (0, 0))
        super().__init__(errors[0].message, errors[0].loc, errors[0].source)
        self.errors = errors

    def __str__(self) -> str:
        tail = f"\n{len(self.errors)} errors" if len(self.errors) > 1 else ""
        return "\n".join(str(e) for e in self.errors) + tail


class Poisoned(Exception):
    """A statement used a name whose definition already failed: stop quietly (the first error is reported)."""


def location(file: str, pos: A.Pos) -> Location:
    return Location(file, pos.line, pos.col)
