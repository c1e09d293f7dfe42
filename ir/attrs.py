"""Attribute kinds: how a typed op field checks, prints and reads back its value."""

from __future__ import annotations

import math
from typing import Any

from sparsa.ir.dims import Dim, check_expr, format_dim
from sparsa.ir.types import ELEMENT_TYPES, TensorType


class AttrKind:
    """Checks and prints one kind of attribute value; the parser hands it a generic literal."""

    name = "any"

    def coerce(self, value: Any) -> Any:
        """Validate a parsed literal and convert it to the Python value the op stores."""
        return value

    def format(self, value: Any) -> str:
        return str(value)


def _show(value: Any) -> str:
    if isinstance(value, DimLiteral):
        return "{" + value + "}"
    return str(value) if isinstance(value, Symbol) else repr(value)


def format_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(float(x))


class IntKind(AttrKind):
    name = "integer"

    def coerce(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_show(value)}")
        return value


class FloatKind(AttrKind):
    name = "float"

    def coerce(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a float, got {_show(value)}")
        return float(value)

    def format(self, value: float) -> str:
        return format_float(value)


class BoolKind(AttrKind):
    name = "boolean"

    def coerce(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {_show(value)}")
        return value

    def format(self, value: bool) -> str:
        return "true" if value else "false"


class StrKind(AttrKind):
    name = "string"

    def __init__(self, choices: tuple[str, ...] = ()):
        self.choices = choices

    def coerce(self, value: Any) -> str:
        if not isinstance(value, str) or isinstance(value, Symbol | DimLiteral):
            raise ValueError(f"expected a string, got {_show(value)}")
        if self.choices and value not in self.choices:
            raise ValueError(f"expected one of {', '.join(map(repr, self.choices))}, got {_show(value)}")
        return value

    def format(self, value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ScalarKind(AttrKind):
    """A number or boolean (the value of a splat constant)."""

    name = "scalar"

    def coerce(self, value: Any) -> int | float | bool:
        if not isinstance(value, bool | int | float):
            raise ValueError(f"expected a number or boolean, got {_show(value)}")
        return value

    def format(self, value: int | float | bool) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value) if isinstance(value, int) else format_float(value)


class ListKind(AttrKind):
    """A list of one kind of item (integers, strings)."""

    def __init__(self, item: AttrKind, plural: str):
        self.item, self.plural = item, plural
        self.name = f"{item.name} list"

    def coerce(self, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a list of {self.plural}, got {_show(value)}")
        return tuple(self.item.coerce(v) for v in value)

    def format(self, value: tuple[Any, ...]) -> str:
        return "[" + ", ".join(self.item.format(v) for v in value) + "]"


class Symbol(str):
    """A bare word in an attribute (an element type, or a dim expression in braces)."""


class DimListKind(AttrKind):
    """A shape: integers, `{expr}` symbolic dims, `?`."""

    name = "shape"

    def coerce(self, value: Any) -> tuple[Dim, ...]:
        if not isinstance(value, list | tuple):
            raise ValueError(f"expected a shape list, got {_show(value)}")
        return tuple(_coerce_dim(v) for v in value)

    def format(self, value: tuple[Dim, ...]) -> str:
        return "[" + ", ".join(format_dim(d) for d in value) + "]"


def _coerce_dim(v: Any) -> Dim:
    if v is None or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    if isinstance(v, str) and not isinstance(v, Symbol):
        check_expr(str(v))
        return str(v)
    raise ValueError(f"expected a dim (integer, {{expr}} or ?), got {v!r}")


class DimLiteral(str):
    """A `{expr}` literal read by the parser."""


class DimKind(AttrKind):
    name = "dim"

    def coerce(self, value: Any) -> Dim:
        return _coerce_dim(value)

    def format(self, value: Dim) -> str:
        return format_dim(value)


class DTypeKind(AttrKind):
    name = "element type"

    def coerce(self, value: Any) -> str:
        if not isinstance(value, str) or isinstance(value, DimLiteral) or value not in ELEMENT_TYPES:
            raise ValueError(f"expected an element type ({', '.join(ELEMENT_TYPES)}), got {_show(value)}")
        return str(value)


class TypeListKind(AttrKind):
    name = "type list"

    def coerce(self, value: Any) -> tuple[TensorType, ...]:
        if not isinstance(value, list | tuple) or not all(isinstance(t, TensorType) for t in value):
            raise ValueError(f"expected a list of tensor types, got {_show(value)}")
        return tuple(value)

    def format(self, value: tuple[TensorType, ...]) -> str:
        return "[" + ", ".join(str(t) for t in value) + "]"


INT = IntKind()
FLOAT = FloatKind()
BOOL = BoolKind()
STR = StrKind()
SCALAR = ScalarKind()
INTS = ListKind(IntKind(), "integers")
STRS = ListKind(StrKind(), "strings")
DIMS = DimListKind()
DIM = DimKind()
DTYPE = DTypeKind()
TYPES = TypeListKind()
