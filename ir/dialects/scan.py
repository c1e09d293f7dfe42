"""`scan` dialect: first-order linear recurrences h[t] = a[t] * h[t-1] + b[t]."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.core import Attr, Operand, Operation, Result
from sparsa.ir.dialects.tensor import broadcast_result, same_dtype
from sparsa.ir.dialects.tensor_shape import normalize_axis
from sparsa.ir.dims import broadcast_shapes
from sparsa.ir.types import TensorType, is_float


class ScanOp(Operation):
    """h[t] = a[t] * h[t-1] + b[t] along `axis` (h[-1] = h0, or 0), elementwise over the other axes."""

    NAME = "scan.scan"
    a = Operand()
    b = Operand()
    h0 = Operand(optional=True)
    axis = Attr(A.INT)
    result = Result()

    def infer(self) -> list[TensorType]:
        dt = same_dtype(self, self.a.type, self.b.type)
        if not is_float(dt):
            raise self.error(f"needs float operands, got {dt}")
        out = broadcast_result(self, dt, self.a.type, self.b.type)
        axis = normalize_axis(self, self.axis, out.rank)
        if self.h0 is not None:
            state = out.shape[:axis] + out.shape[axis + 1 :]
            try:
                ok = broadcast_shapes(self.h0.type.shape, state) == state
            except ValueError:
                ok = False
            if not ok or self.h0.type.dtype != dt:
                raise self.error(f"h0 {self.h0.type} must broadcast to the state shape {TensorType(dt, state)}")
        return [out]

    def reference(self, ctx: Any, a: np.ndarray, b: np.ndarray, h0: np.ndarray | None = None) -> np.ndarray:
        a, b = np.broadcast_arrays(a.astype(np.float64), b.astype(np.float64))
        axis = self.axis % a.ndim
        a, b = np.moveaxis(a, axis, 0), np.moveaxis(b, axis, 0)
        out = np.empty(a.shape, dtype=np.float64)
        h = np.zeros(a.shape[1:]) if h0 is None else np.broadcast_to(h0.astype(np.float64), a.shape[1:])
        for t in range(a.shape[0]):
            h = a[t] * h + b[t]
            out[t] = h
        return np.moveaxis(out, 0, axis)
