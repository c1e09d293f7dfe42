"""`differentiate`: add the reverse mode of a module's model (its last function).

    func.func @M(%x) -> (%y)
    func.func @M_fwd(%x) -> (%y, %r1, %r2, ...) attributes {residuals = "saved"}     (residuals=saved, default)
    func.func @M_bwd(%r1, %r2, ..., %dy) -> (%dx, %dw, ...) attributes {residuals = "saved"}
    func.func @M_vjp(%x, %dy) -> (%dx, %dw, ...) attributes {residuals = "recompute"}  (residuals=recompute)

The backward applies each op's vector-Jacobian rule (`vjp` on the op class, ir/autodiff.py) in reverse order to
the cotangents of the results. It returns the gradient of every float input, then of every float weight, in
`grad_targets` order; a value nothing flows to gets zeros. With saved residuals the forward also returns the
values the backward reads (weights, constants and what only they feed are made again instead: they are
weight-only, run once per weight load); with recompute one function runs the forward again. The choice is each
function's `residuals` attribute. An op without a rule is an error naming it and its line.
"""

from __future__ import annotations

from sparsa.ir.autodiff import pullback_ops, vjp_function
from sparsa.ir.clone import clone_op
from sparsa.ir.core import Block, Module, Operation, Region, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects.func import FuncOp, ReturnOp
from sparsa.ir.traits import View
from sparsa.passes.base import Option, Pass


class Differentiate(Pass):
    """Add the model's reverse mode: `@<model>_fwd` and `@<model>_bwd` (residuals saved), or `@<model>_vjp`."""

    NAME = "differentiate"
    residuals = Option(str, "saved", "saved: a forward that also returns what the backward reads, and a backward "
                       "taking it; recompute: one function that runs the forward again")

    def run(self, module: Module) -> None:
        f = module.funcs[-1]
        if f.attributes.get("residuals") is not None:
            return  # already a backward function
        if self.residuals not in ("saved", "recompute"):
            raise SparsaError(f"differentiate: residuals is 'saved' or 'recompute', got '{self.residuals}'")
        vjp, n_forward, outputs = self.backward(f)
        module.funcs += split(vjp, n_forward, outputs) if self.residuals == "saved" else [vjp]

    def backward(self, f: Operation) -> tuple[Operation, int, list[Value]]:
        """`@<model>_vjp`, how many of its ops are the forward's, and the model's outputs in it (`vjp_function`)."""
        return vjp_function(f, self.stats)


def split(vjp: Operation, n_forward: int, outputs: list[Value]) -> list[Operation]:
    """`@M_fwd` (the inputs in; the outputs and the residuals out) and `@M_bwd` (the residuals and one cotangent
    per output in; the gradients out) from `@M_vjp`. A residual is a forward value the backward reads, except what
    it makes again for nothing: weights (declared again), constants, and what only they feed (run once per weight
    load, as every weight-only value is), and views (slices, transposes, reshapes) of inputs and of those: the
    backward takes the input and views it again, where the consumer reads through the view (a weight given as an
    input, transposed and packed as it is read) instead of the forward writing the view out as a residual."""
    block = vjp.regions[0].block
    n_in = len(block.args) - len(outputs)
    fwd_ops, bwd_ops = block.ops[:n_forward], block.ops[n_forward:]
    produced = {id(r): op for op in fwd_ops for r in op.results}
    inputs = {id(a) for a in block.args[:n_in]}
    cheap: set[int] = set()  # ops the backward makes again: params, constants, what only they feed, and views

    def made_again(v: Value) -> bool:
        return id(v) in produced and id(produced[id(v)]) in cheap

    for op in fwd_ops:
        if (not op.operands and not op.regions) or (op.operands and not op.regions and all(
                made_again(v) for v in op.operands)) or (isinstance(op, View) and all(
                made_again(v) or id(v) in inputs for v in op.operands)):
            cheap.add(id(op))
    needed: list = []
    seen: set[int] = set()

    def need(v: Value) -> None:
        if id(v) in seen or (id(v) not in produced and id(v) not in inputs):
            return
        seen.add(id(v))
        if id(v) in produced and id(produced[id(v)]) in cheap:
            for u in produced[id(v)].operands:
                need(u)
            return
        needed.append(v)

    for op in bwd_ops:
        for inner in op.walk():
            for v in inner.operands:
                need(v)
    name = vjp.attributes["sym_name"].removesuffix("_vjp")
    fwd_block = Block([a.type for a in block.args[:n_in]], [a.name_hint for a in block.args[:n_in]])
    mapping: dict[int, Value] = {id(a): b for a, b in zip(block.args[:n_in], fwd_block.args, strict=True)}
    for op in fwd_ops:
        fwd_block.append(clone_op(op, mapping))
    fwd_results = [mapping[id(v)] if id(v) in mapping else v for v in outputs + needed]
    fwd_block.append(ReturnOp.build(fwd_results))
    fwd = FuncOp([], [], {"sym_name": f"{name}_fwd", "result_types": [v.type for v in fwd_results],
                          "residuals": "saved"}, [Region([fwd_block])], vjp.loc)
    cot = block.args[n_in:]
    bwd_block = Block([v.type for v in needed] + [a.type for a in cot],
                      [v.name_hint or f"r{i}" for i, v in enumerate(needed)] + [a.name_hint for a in cot])
    mapping = {id(v): b for v, b in zip([*needed, *cot], bwd_block.args, strict=True)}
    for op in fwd_ops:  # the weights and what only they and constants feed, where the backward reads them
        if id(op) in cheap and any(id(r) in seen for r in op.results):
            bwd_block.append(clone_op(op, mapping))
    for op in bwd_ops:
        bwd_block.append(clone_op(op, mapping))
    bwd = FuncOp([], [], {"sym_name": f"{name}_bwd", "result_types": list(vjp.attributes["result_types"]),
                          "residuals": "saved", "grads": vjp.attributes["grads"]}, [Region([bwd_block])], vjp.loc)
    return [fwd, bwd]


class ExpandPullbacks(Pass):
    """Replace each `tensor.pullback` by the vector-Jacobian rules of the ops between its `wrt` values and its
    result, run after a copy of those ops (the forward again, in its training form), as `differentiate` does."""

    NAME = "expand-pullbacks"

    def run(self, module: Module) -> None:
        for f in module.funcs:
            block = f.regions[0].block
            for op in [op for op in block.ops if op.NAME == "tensor.pullback"]:
                self.expand(block, op)
                self.stats["pullbacks expanded"] += 1

    def expand(self, block: Block, pullback: Operation) -> None:
        replace_by(pullback, *pullback_ops(pullback, self.stats))


class ExpandScanGrads(Pass):
    """Replace each `scan.fused_grad` by the unfused ops it stands for (`expansion`: the states stored), for a
    target without a kernel for it."""

    NAME = "expand-scan-grads"

    def run(self, module: Module) -> None:
        for f in module.funcs:
            block = f.regions[0].block
            for op in [op for op in block.ops if op.NAME == "scan.fused_grad"]:
                expand_scan_grad(op)
                self.stats["scan backwards expanded"] += 1


def expand_scan_grad(op: Operation) -> None:
    """Put `scan.fused_grad` op's expansion in its place."""
    replace_by(op, *op.expansion())


def replace_by(op: Operation, ops: list[Operation], values: list[Value]) -> None:
    """`ops` (in no block) put where `op` is, its results replaced by `values`, op erased."""
    block = op.parent
    at = block.ops.index(op)
    for new in ops:
        block.insert(at, new)
        at += 1
    for r, d in zip(op.results, values, strict=True):
        r.replace_all_uses_with(d)
    op.erase()
