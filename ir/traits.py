"""Op traits: marker classes an op class inherits, read with `isinstance` by passes and backends alike.

What several places need to know about an op is said once, on its class: a pass that fuses elementwise
chains, a backend that splits work by rows and the region builder all ask `isinstance(op, Elementwise)`
instead of keeping lists of op classes of their own.
"""

from __future__ import annotations


class Trait:
    """Base of the op traits (mixins without state; a trait may give its ops a default method)."""


class Elementwise(Trait):
    """Each result element reads only the operands' elements at the same (broadcast) index, so the op has
    a scalar form: it may be inlined into mask, score and scan regions, fused with its neighbours, and
    split by rows. A backend lowers it by its scalar rule alone.

    `BUILTIN` is its `.sp` function (`exp(x)`), `ATEN` the ATen overloads the torch importer maps to it; the
    frontends read both, so a new elementwise op needs no entry of its own there."""

    BUILTIN = ""
    ATEN: tuple[str, ...] = ()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The operands' shapes broadcast together."""
        import numpy as np

        return [np.broadcast_shapes(*shapes)]


class Generator(Trait):
    """Each result element depends on its own index alone (splat constants, iota): fused like an
    elementwise op, with no operand to read."""


class View(Trait):
    """Selects or rearranges elements without computing any (transpose, reshape, slice, ...): a view of
    its operand where the backend has strided tensors."""


class Reduction(Trait):
    """Combines the elements along some axes of its operand (sum, max, argmax, softmax's and norms' rows)."""


class Composite(Trait):
    """An op the pipeline rewrites into others before a backend sees it; `LOWERED_BY` names the passes."""

    LOWERED_BY = ""
