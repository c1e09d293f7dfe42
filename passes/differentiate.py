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

from typing import Any

from sparsa.ir.analysis import binders, sizes_of
from sparsa.ir.autodiff import pullback_ops, vjp_function
from sparsa.ir.clone import clone_op
from sparsa.ir.core import Block, Module, Operation, Region, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects.func import FuncOp, ReturnOp
from sparsa.ir.dims import symbols
from sparsa.ir.traits import Elementwise, View
from sparsa.ir.types import TensorType, numpy_dtype
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

    def residuals() -> None:
        needed.clear()
        seen.clear()
        for op in bwd_ops:
            for inner in op.walk():
                for v in inner.operands:
                    need(v)

    residuals()
    cheap |= recomputed(needed, fwd_ops, produced, cheap, outputs)
    residuals()
    cot = block.args[n_in:]
    # the sizes the backward's types are made of: an input whose shape binds one that no residual's binds is a
    # residual too (dX of x[:, K:] is zeros of K rows, K being the rows of an input the backward reads nothing of)
    sizes = {s for op in bwd_ops for inner in op.walk() for d in sizes_of(inner) for s in symbols(d)}
    by_rank = sorted(block.args[:n_in], key=lambda a: a.type.rank)
    for i in binders([a.type.shape for a in by_rank], [v.type.shape for v in (*needed, *cot)], sizes):
        need(by_rank[i])
    name = vjp.attributes["sym_name"].removesuffix("_vjp")
    fwd_block = Block([a.type for a in block.args[:n_in]], [a.name_hint for a in block.args[:n_in]])
    mapping: dict[int, Value] = {id(a): b for a, b in zip(block.args[:n_in], fwd_block.args, strict=True)}
    for op in fwd_ops:
        fwd_block.append(clone_op(op, mapping))
    fwd_results = [mapping[id(v)] if id(v) in mapping else v for v in outputs + needed]
    fwd_block.append(ReturnOp.build(fwd_results))
    fwd = FuncOp([], [], {"sym_name": f"{name}_fwd", "result_types": [v.type for v in fwd_results],
                          "residuals": "saved"}, [Region([fwd_block])], vjp.loc)
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


def recomputed(needed: list[Value], fwd_ops: list[Operation], produced: dict[int, Operation], cheap: set[int],
               outputs: list[Value]) -> set[int]:
    """The elementwise forward ops the backward runs again instead of reading their results as residuals, as
    AOTAutograd's partitioner recomputes pointwise ops: a residual made by an elementwise op whose forward uses
    are all elementwise (fused away in the forward, so saving it is a write of its own), when the residuals it
    is made from (through more such ops) are saved anyway or no larger. GPT-OSS's clamped, gated activation
    saves its two pre-activations, not each of the eight steps between them and its output."""
    top, results = {id(op) for op in fwd_ops}, {id(v) for v in outputs}
    forward = {id(inner) for op in fwd_ops for inner in op.walk()}  # and the ops in their regions

    def fused(v: Value) -> bool:  # made by an elementwise op and read in the forward only by such ops
        op = produced.get(id(v))
        return op is not None and id(op) not in cheap and isinstance(op, Elementwise) and id(v) not in results and all(
            isinstance(u.op, Elementwise) and id(u.op) in top for u in v.uses if id(u.op) in forward)

    saved = {id(v): v for v in needed}
    chosen: set[int] = set()

    def again(op: Operation) -> bool:  # made again in the backward already
        return id(op) in cheap or id(op) in chosen

    for v in needed:
        if not fused(v):
            continue
        ops, sources = _made_from(v, saved, produced, again, fused)
        new = [u for k, u in sources.items() if k not in saved]
        if sum(_bytes(u) for u in new) <= _bytes(v):
            chosen |= set(ops)
            del saved[id(v)]
            saved.update({id(u): u for u in new})
    return chosen


def _made_from(v: Value, saved: dict[int, Value], produced: dict[int, Operation], again: Any,
               fused: Any) -> tuple[dict[int, Operation], dict[int, Value]]:
    """The ops that make v again (through ops fused(value) allows, and those again(op) makes anyway) and the
    values they read: saved ones, inputs, or values that would have to be saved."""
    ops: dict[int, Operation] = {}
    sources: dict[int, Value] = {}

    def source(u: Value) -> None:
        op = produced.get(id(u))
        if id(u) in sources or op is not None and id(op) in ops:
            return
        if u is not v and id(u) in saved or op is None:
            sources[id(u)] = u
        elif again(op) or u is v or fused(u):
            if not again(op):
                ops[id(op)] = op
            for w in op.operands:
                source(w)
        else:
            sources[id(u)] = u

    source(v)
    return ops, sources


def _bytes(v: Value) -> int:
    """A tensor's size for comparing residuals: each dim not known at compile time counted as 4096."""
    t = v.type
    n = numpy_dtype(t.dtype).itemsize if isinstance(t, TensorType) else 8
    for d in t.shape if isinstance(t, TensorType) else ():
        n *= d if isinstance(d, int) else 4096
    return n


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
