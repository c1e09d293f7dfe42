"""`differentiate`: add the reverse-mode function of a module's model (its last function).

    func.func @M(%x) -> (%y)                    func.func @M_vjp(%x, %dy) -> (%dx, %dw, ...) {residuals = "recompute"}
                                                  <the forward ops of @M, again>
                                                  <each op's vjp rule, last op first, cotangents summed>

The backward function takes the model's inputs and one cotangent per result, runs the forward again (its
residuals are recomputed, not saved: the choice is the function's `residuals` attribute), then each op's
vector-Jacobian rule (`vjp` on the op class, ir/autodiff.py) in reverse order. It returns the gradient of every
float input, then of every float weight, in `grad_targets` order; a value nothing flows to gets zeros. An op
without a rule is an error naming it and its line.
"""

from __future__ import annotations

from sparsa.ir.autodiff import Grad, grad_targets
from sparsa.ir.clone import clone_op
from sparsa.ir.core import Block, Module, Operation, Region, Value
from sparsa.ir.dialects.func import FuncOp, ReturnOp
from sparsa.ir.types import TensorType
from sparsa.passes.base import Pass


class Differentiate(Pass):
    """Add `@<model>_vjp`: the model's forward again, then its ops' vector-Jacobian rules in reverse."""

    NAME = "differentiate"

    def run(self, module: Module) -> None:
        f = module.funcs[-1]
        if f.attributes.get("residuals") is not None:
            return  # already a backward function
        module.funcs.append(self.backward(f))

    def backward(self, f: Operation) -> Operation:
        block = f.regions[0].block
        outs = block.terminator.operands
        new = Block([a.type for a in block.args] + [v.type for v in outs],
                    [a.name_hint for a in block.args] + [f"d_{v.name_hint or i}" for i, v in enumerate(outs)])
        mapping: dict[int, Value] = {id(a): b for a, b in zip(block.args, new.args, strict=False)}
        forward = []
        for op in block.ops[:-1]:
            copy = clone_op(op, mapping)
            new.append(copy)
            forward.append(copy)
        g = Grad(new)
        for v, d in zip(outs, new.args[len(block.args):], strict=True):
            g.flow(mapping.get(id(v), v), d)
        g.reverse(forward)
        self.stats["ops differentiated"] += sum(1 for op in forward if hasattr(op, "vjp"))
        results = []
        for _, _, v in grad_targets(f):
            mine = mapping.get(id(v), v)
            results.append(g.grads.get(id(mine)) or g.full(0.0, TensorType(v.type.dtype, v.type.shape)))
        new.append(ReturnOp.build(results))
        return FuncOp([], [], {"sym_name": f"{f.attributes['sym_name']}_vjp",
                               "result_types": [r.type for r in results], "residuals": "recompute"},
                      [Region([new])], f.loc)
