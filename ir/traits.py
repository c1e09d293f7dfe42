"""Op traits: marker classes an op class inherits, read with `isinstance` by passes and backends alike.

What several places need to know about an op is said once, on its class: a pass that fuses elementwise
chains, a backend that splits work by rows and the region builder all ask `isinstance(op, Elementwise)`
instead of keeping lists of op classes of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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

    def result_shapes(self, ctx: Any, operands: Sequence[Any]) -> list[tuple[int, ...]]:
        """Operation's, with `check_unknown_dims` on them."""
        shapes = super().result_shapes(ctx, operands)
        self.check_unknown_dims([tuple(a.shape) for a in operands], tuple(shapes[0]))
        return shapes

    def check_unknown_dims(self, operands: list[tuple[int, ...]], result: tuple[int, ...]) -> None:
        """Raise RuntimeShapeError where an operand dim of unknown size (`?`) is not the result's at run time: only
        a dim typed 1 broadcasts (as in MLIR's linalg, a kernel reads any other dim as the result's), so a `?`
        that is 1 at run time against a larger dim would be read past its end."""
        for i, (v, shape) in enumerate(zip(self.operands, operands, strict=True)):
            lead = len(result) - len(shape)
            if len(shape) != v.type.rank or lead < 0:  # (a host's stand-in of another layout: not this check's)
                continue
            for axis, (d, n) in enumerate(zip(v.type.shape, shape, strict=True)):
                if d is None and n != result[lead + axis]:
                    unknown_dim(self, i, axis, n, f"{result[lead + axis]} in the result")


def unknown_dim(op: Any, i: int, axis: int, n: int, against: str,
                why: str = "a dim of unknown size does not broadcast (only one typed 1 does)") -> None:
    """Raise the RuntimeShapeError of operand i's dim `axis`, typed `?`, that is n at run time `against` another."""
    from sparsa.ir.analysis import RuntimeShapeError

    raise RuntimeShapeError(f"'{op.NAME}': operand {i} ({op.operands[i].type}) has {n} at dim {axis}, whose size was "
                            f"unknown at compile time (?), against {against}; {why}", op.loc)


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
