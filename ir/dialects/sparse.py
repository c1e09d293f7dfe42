"""`sparse` dialect: conversion to sparse layouts (`#bsr`, `#nm`) and matmul with a sparse weight."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.core import Attr, Operand, Operation, Result
from sparsa.ir.dialects.tensor_shape import matmul_type
from sparsa.ir.types import Layout, TensorType


def layout_violation(w: np.ndarray, layout: Layout) -> str | None:
    """Why the dense 2-D array `w` does not fit `layout`, naming the first offending block or group; else None.

    A `#bsr<R x C>` weight fits when its dims are multiples of the block; every block may be
    zero or not. A `#nm<N:M>` weight `[K, N_out]` has at most N nonzeros in each group of M
    consecutive rows down every column (the reduction axis of `x @ w`).
    """
    if w.ndim != 2:
        return f"a sparse layout needs a 2-D weight, got shape {list(w.shape)}"
    rows, cols = w.shape
    if layout.kind == "bsr":
        br, bc = layout.params
        if rows % br or cols % bc:
            return f"shape {list(w.shape)} is not a multiple of the {br}x{bc} block"
        return None
    n, m = layout.params
    if rows % m:
        return f"reduction dim {rows} is not a multiple of the group size {m}"
    counts = (w.reshape(rows // m, m, cols) != 0).sum(axis=1)
    bad = np.argwhere(counts > n)
    if bad.size:
        g, c = (int(i) for i in bad[0])
        return (f"group of rows {g * m}..{g * m + m - 1} in column {c} has {int(counts[g, c])} nonzeros, "
                f"more than {n} of {m}")
    return None


class ConvertOp(Operation):
    """The same values stored in sparse layout `layout` ("bsr" or "nm") with parameters `block`."""

    NAME = "sparse.convert"
    x = Operand()
    layout = Attr(A.StrKind(("bsr", "nm")))
    block = Attr(A.INTS)
    result = Result()

    def infer(self) -> list[TensorType]:
        t = self.x.type
        if t.rank != 2 or len(self.block) != 2:
            raise self.error(f"needs a 2-D tensor and two block parameters, got {t} and {list(self.block)}")
        lay = Layout(self.layout, (self.block[0], self.block[1]))
        if self.layout == "nm" and not 0 < self.block[0] <= self.block[1]:
            raise self.error(f"#nm<{self.block[0]}:{self.block[1]}> needs 0 < N <= M")
        steps = self.block if self.layout == "bsr" else (self.block[1], 1)
        for d, s in zip(t.shape, steps, strict=True):
            if isinstance(d, int) and d % s:
                raise self.error(f"dims of {t} must be multiples of {lay}")
        return [TensorType(t.dtype, t.shape, lay)]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        why = layout_violation(x, self.result.type.layout)
        if why:
            raise ValueError(f"value does not fit {self.result.type.layout}: {why}")
        return x


class SparseMatmulOp(Operation):
    """x @ w where w carries a sparse layout; the value equals the dense product."""

    NAME = "sparse.matmul"
    x = Operand()
    w = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        if self.w.type.layout is None or self.w.type.rank != 2:
            raise self.error(f"needs a 2-D weight with a sparse layout, got {self.w.type}")
        return [matmul_type(self, self.x.type, self.w.type.without_layout())]

    def reference(self, ctx: Any, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.matmul(x, w)
