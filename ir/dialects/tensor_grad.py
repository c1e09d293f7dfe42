"""`tensor` dialect, reverse-mode part: `tensor.pullback`, the cotangents of some values given one of a result they
feed. An importer writes it where a framework asks for a block's gradient by itself (PyTorch's backward graph
calling a folded MoE block's backward); `expand-pullbacks` replaces it by the ops' vector-Jacobian rules, as
`differentiate` builds a model's backward."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparsa.ir.core import Operand, Operation, Result
from sparsa.ir.traits import Composite
from sparsa.ir.types import TensorType, is_float


class PullbackOp(Composite, Operation):
    """grads[i] = (d of / d wrt[i])^T cotangent: the cotangent of each `wrt` value through the ops of the function
    between it and `of` (zero where none of them reads it)."""

    NAME = "tensor.pullback"
    LOWERED_BY = "expand-pullbacks"
    of = Operand()
    cotangent = Operand()
    wrt = Operand(variadic=True)
    grads = Result(variadic=True)

    def infer(self) -> list[TensorType]:
        if self.cotangent.type != self.of.type:
            raise self.error(f"the cotangent {self.cotangent.type} must have the type of the result {self.of.type}")
        if not is_float(self.of.type.dtype):
            raise self.error(f"needs a float result, got {self.of.type}")
        for v in self.wrt:
            if not is_float(v.type.dtype):
                raise self.error(f"takes cotangents of float values only, got {v.type}")
        return [v.type for v in self.wrt]

    def reference(self, ctx: Any, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """The ops `expand-pullbacks` puts in its place, run on the values the function has computed so far."""
        from sparsa.ir.autodiff import pullback_ops
        from sparsa.ir.core import Block, Region
        from sparsa.ir.dialects.func import YieldOp

        ops, grads = pullback_ops(self)
        block = Block()
        for op in ops:
            block.append(op)
        block.append(YieldOp.build(grads))
        return tuple(ctx.run_region(Region([block]), []))
