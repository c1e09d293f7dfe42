"""`tensor` dialect, linear-algebra part: the triangular solve of gated delta nets' chunked form (Qwen3-Next,
Qwen3.5, Olmo hybrid: `torch.linalg.solve_triangular` of the UT transform)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.analysis import Cost
from sparsa.ir.core import Attr, Operand, Operation, Result
from sparsa.ir.dialects.tensor import same_dtype
from sparsa.ir.dims import compatible, format_dim
from sparsa.ir.types import TensorType, is_float


class SolveTriangularOp(Operation):
    """X with A @ X = B for triangular A [..., n, n] and B [..., n, k] of the same batch dims: `upper` reads A's
    upper triangle, else its lower; `unit` takes A's diagonal as ones (the stored one is not read)."""

    NAME = "tensor.solve_triangular"
    a = Operand()
    b = Operand()
    upper = Attr(A.BOOL, default=False)
    unit = Attr(A.BOOL, default=False)
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [shapes[1]]

    def infer(self) -> list[TensorType]:
        a, b = self.a.type, self.b.type
        dt = same_dtype(self, a, b)
        if not is_float(dt):
            raise self.error(f"needs float operands, got {a} and {b}")
        if a.rank < 2 or b.rank != a.rank:
            raise self.error(f"needs A [..., n, n] and B [..., n, k] of one rank (at least 2), got {a} and {b}")
        if not compatible(a.shape[-1], a.shape[-2]):
            raise self.error(f"needs a square A, got {a}")
        if not compatible(a.shape[-1], b.shape[-2]):
            raise self.error(f"solves A of {format_dim(a.shape[-1])} rows for B of {format_dim(b.shape[-2])} rows "
                             f"({a} and {b})")
        if not all(compatible(x, y) for x, y in zip(a.shape[:-2], b.shape[:-2], strict=True)):
            raise self.error(f"needs the same batch dims in A and B (broadcast them first), got {a} and {b}")
        return [b.without_layout()]

    def reference(self, ctx: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Substitution row by row (forward for lower, backward for upper), in the operands' precision."""
        n = a.shape[-1]
        x = np.zeros_like(b)
        for i in (range(n - 1, -1, -1) if self.upper else range(n)):
            done = slice(i + 1, n) if self.upper else slice(0, i)
            row = b[..., i, :] - np.einsum("...j,...jk->...k", a[..., i, done], x[..., done, :])
            x[..., i, :] = row if self.unit else row / a[..., i, i, None]
        return x

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        n = args[0].shape[-1]
        f = float(outs[0].size * n)  # about n / 2 multiply-adds per element of X
        return Cost(f, f)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dB = A^-T dX (the transposed solve) and dA = -dB X^T on the triangle A is read on (strictly, with
        `unit`): nothing flows to the entries the solve does not read."""
        a, dx, x = xs[0], dys[0], ys[0]
        db = g.emit("tensor.solve_triangular", g.transpose_last(a), dx, upper=not self.upper, unit=self.unit)
        da = g.neg(g.emit("tensor.matmul", db, g.transpose_last(x)))
        return [g.mask(triangle(g, a.type, self.upper, self.unit), da), db]


def triangle(g: Any, t: TensorType, upper: bool, strict: bool) -> Any:
    """A boolean [n, n] of the entries on A's triangle (off the diagonal where `strict`)."""
    n = t.shape[-1]
    i = g.emit("tensor.expand_dims", g.emit("tensor.iota", result_types=[TensorType("i64", (n,))]), axes=[1])
    j = g.emit("tensor.expand_dims", g.emit("tensor.iota", result_types=[TensorType("i64", (n,))]), axes=[0])
    pred = {(False, False): "le", (False, True): "lt", (True, False): "ge", (True, True): "gt"}[(upper, strict)]
    return g.cmp(pred, j, i)
