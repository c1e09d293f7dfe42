"""Reverse mode: what an op's vector-Jacobian rule (`vjp`, a method on its class) builds the backward ops with,
and which values a function's gradient is taken for. The `differentiate` pass drives the rules.

A rule reads `vjp(self, g, dys, xs, ys)`: `g` a `Grad` (emits ops into the backward function), `dys` the
cotangent of each result (None where nothing flows back), `xs` and `ys` the op's operands and results as the
backward function has them (it runs the forward again). It returns a cotangent per operand: a value of the
operand's type, or None where none flows (indices, masks, integers).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from sparsa.ir.core import OP_REGISTRY, Block, Operation, Value
from sparsa.ir.diagnostics import Location
from sparsa.ir.types import TensorType, is_float


class Grad:
    """Builds backward ops at the end of `block`, at the location of the op whose rule runs, and keeps the
    cotangent of every value reached so far (`grads`, summed as they flow in)."""

    def __init__(self, block: Block):
        self.block = block
        self.loc: Location | None = None
        self.grads: dict[int, Value] = {}

    def flow(self, v: Value, d: Value | None) -> None:
        """Add cotangent d to v's (a rule calls this for values its op reads without taking them as operands:
        the outer values of a region)."""
        if d is None or not differentiable(v):
            return
        if d.type.dtype != v.type.dtype:
            raise AssertionError(f"a cotangent of {d.type} for a value of {v.type}")
        self.grads[id(v)] = d if id(v) not in self.grads else self.add(self.grads[id(v)], d)

    def reverse(self, ops: Sequence[Operation]) -> None:
        """Each op's rule, last op first, from the cotangents its results have (a SparsaError for an op that
        has none to give)."""
        from sparsa.ir.diagnostics import SparsaError

        for op in reversed(list(ops)):
            dys = [self.grads.get(id(r)) for r in op.results]
            if all(d is None for d in dys) or not any(differentiable(v) for v in op.operands):
                continue
            rule = getattr(op, "vjp", None)
            if rule is None:
                raise SparsaError(f"'{op.NAME}' has no derivative yet: reverse mode covers the tensor ops, MoE "
                                  "layers, attention, scans and sparse weights (as sparse.matmul, before "
                                  "lower-sparse-weights packs them)", op.loc)
            self.loc = op.loc
            for v, d in zip(op.operands, rule(self, dys, list(op.operands), list(op.results)), strict=True):
                self.flow(v, d)

    def swap(self, op: Operation, name: str) -> Operation:
        """Replace forward op `op` by op `name` of the same operands, attributes and regions and more results (one
        that also returns what the rule reads: attention's log-sum-exp). op's results become its first ones, so
        whatever reads or maps them keeps them."""
        new = OP_REGISTRY[name](list(op.operands), (), dict(op.attributes), list(op.regions), op.loc)
        op.regions = []
        extra = new.infer()[len(op.results):]
        for r in op.results:
            r.owner = new
            new.results.append(r)
        for t in extra:
            new.results.append(Value(t, new, len(new.results)))
        for v in op.operands:
            v.uses = [u for u in v.uses if u.op is not op]
        block = op.parent
        block.ops[block.ops.index(op)] = new
        new.parent, op.parent = block, None
        return new

    def inline(self, region: Any, args: Sequence[Value]) -> tuple[list[Value], list[Operation]]:
        """A single-block region's ops run on `args` (whole tensors: an elementwise epilogue on every row at
        once): the values it yields, and the ops made. An op whose operands come out of another type (an argument
        broadcast wider) has its result types inferred again."""
        from sparsa.ir.clone import clone_op

        block = region.block
        mapping: dict[int, Value] = {id(a): v for a, v in zip(block.args, args, strict=True)}
        ops = []
        for op in block.ops:
            if op.TERMINATOR:
                return [mapping.get(id(v), v) for v in op.operands], ops
            copy = clone_op(op, mapping)
            if not op.regions and [v.type for v in copy.operands] != [v.type for v in op.operands]:
                for r, t in zip(copy.results, copy.infer(), strict=True):
                    r.type = t
            self.block.append(copy)
            ops.append(copy)
        return [], ops

    def region(self, region: Any, args: Sequence[Value], dys: Sequence[Value | None],
               inlined: tuple[list[Value], list[Operation]] | None = None) -> list[Value | None]:
        """The cotangents of a region's arguments with cotangents `dys` on the values it yields (its ops run on
        `args`, or `inlined` already); the outer values it reads get theirs through `flow`."""
        yields, ops = inlined if inlined is not None else self.inline(region, args)
        for v, d in zip(yields, dys, strict=True):
            self.flow(v, d)
        self.reverse(ops)
        return [self.grads.get(id(v)) for v in args]

    def identity(self, t: TensorType) -> Any:
        """A region that yields its one argument (an epilogue that keeps a grouped matmul's product)."""
        from sparsa.ir.core import Region

        block = Block([t])
        block.append(OP_REGISTRY["func.yield"].build([block.args[0]]))
        return Region([block])

    def emit(self, name: str, *operands: Value | Sequence[Value], result_types: Sequence[TensorType] | None = None,
             **attrs: Any) -> Value:
        op = OP_REGISTRY[name].build(*operands, result_types=result_types, loc=self.loc, **attrs)
        self.block.append(op)
        return op.results[0]

    def op(self, name: str, *operands: Value | Sequence[Value], **attrs: Any) -> Operation:
        """Like `emit`, for an op of several results: the op itself."""
        op = OP_REGISTRY[name].build(*operands, loc=self.loc, **attrs)
        self.block.append(op)
        return op

    # ---- constants ----------------------------------------------------------------------------------------
    def scalar(self, value: float, dtype: str) -> Value:
        return self.emit("tensor.constant", value=value, result_types=[TensorType(dtype, ())])

    def full(self, value: float, t: TensorType) -> Value:
        """A splat of `value` with t's shape and element type."""
        return self.emit("tensor.constant", value=value, result_types=[TensorType(t.dtype, t.shape)])

    def zeros_like(self, v: Value) -> Value:
        """Zeros of v's shape: a splat where every dim is known or named, else built on v itself (a dim known
        only at run time: rows received from other ranks)."""
        if None not in v.type.shape:
            return self.full(0.0, v.type.without_layout())
        zero = self.scalar(0.0, v.type.dtype)
        return self.where(self.cmp("eq", v, v), zero, zero)

    # ---- arithmetic ---------------------------------------------------------------------------------------
    def add(self, a: Value, b: Value) -> Value:
        return self.emit("tensor.add", a, b)

    def sub(self, a: Value, b: Value) -> Value:
        return self.emit("tensor.sub", a, b)

    def mul(self, a: Value, b: Value) -> Value:
        return self.emit("tensor.mul", a, b)

    def div(self, a: Value, b: Value) -> Value:
        return self.emit("tensor.div", a, b)

    def neg(self, a: Value) -> Value:
        return self.emit("tensor.neg", a)

    def scale(self, a: Value, c: float) -> Value:
        return self.mul(a, self.scalar(c, a.type.dtype))

    def where(self, cond: Value, a: Value, b: Value) -> Value:
        return self.emit("tensor.where", cond, a, b)

    def cmp(self, pred: str, a: Value, b: Value) -> Value:
        return self.emit("tensor.cmp", a, b, pred=pred)

    def mask(self, cond: Value, a: Value) -> Value:
        """a where cond holds, else 0."""
        return self.where(cond, a, self.scalar(0.0, a.type.dtype))

    def cast(self, a: Value, dtype: str) -> Value:
        return a if a.type.dtype == dtype else self.emit("tensor.cast", a, to=dtype)

    # ---- shapes -------------------------------------------------------------------------------------------
    def sum(self, a: Value, axes: Sequence[int], keepdim: bool = False) -> Value:
        return a if not axes else self.emit("tensor.sum", a, axes=list(axes), keepdim=keepdim)

    def broadcast_to(self, a: Value, t: TensorType) -> Value:
        return a if a.type.shape == t.shape else self.emit("tensor.broadcast_to", a, shape=list(t.shape))

    def reduce_like(self, dy: Value, x: TensorType, axes: Sequence[int], keepdim: bool) -> Value:
        """The cotangent of a reduction over `axes` of x, spread back over x (the reduced axes put back first)."""
        axes = sorted(a % x.rank for a in axes)
        if not keepdim and axes:
            dy = self.emit("tensor.expand_dims", dy, axes=axes)
        return self.broadcast_to(dy, x)

    def unbroadcast(self, g: Value, to: TensorType) -> Value:
        """g summed over the dims a broadcast added or stretched, so it has `to`'s shape."""
        t = g.type
        lead = t.rank - to.rank
        axes = list(range(lead)) + [lead + i for i, d in enumerate(to.shape) if d == 1 and t.shape[lead + i] != 1]
        g = self.sum(g, axes, keepdim=True)
        if lead:
            g = self.emit("tensor.squeeze", g, axes=list(range(lead)))
        return g

    def transpose_last(self, a: Value) -> Value:
        perm = list(range(a.type.rank))
        perm[-2], perm[-1] = perm[-1], perm[-2]
        return self.emit("tensor.transpose", a, perm=perm)


def grad_targets(func: Operation) -> list[tuple[str, str, Value]]:
    """What a function's gradient is taken for, in order: ("input", name, value) for each float input (but those at
    the positions of its `no_grad` attribute), then ("param", name, value) for each float weight, in the order
    they are declared."""
    block = func.regions[0].block
    skip = set(func.attributes.get("no_grad") or ())
    out = [("input", a.name_hint or str(a.index), a) for i, a in enumerate(block.args)
           if is_float(a.type.dtype) and i not in skip]
    out += [("param", op.attributes["name"], op.result) for op in block.ops
            if op.NAME == "func.param" and is_float(op.result.type.dtype)]
    return out


def differentiable(v: Value) -> bool:
    """Whether a cotangent flows to v: float values only (indices, masks and integers have none)."""
    return is_float(v.type.dtype)


def vjp_function(f: Operation, stats: Counter | None = None) -> tuple[Operation, int, list[Value]]:
    """`@<f>_vjp`: f's inputs and a cotangent per output in, the forward again (each op in its training form, where
    it has one), then the rules, returning the gradient of each `grad_targets(f)`; how many of its ops are the
    forward's, and the values of f's outputs in it. (`differentiate` builds a model's backward with it.)"""
    from sparsa.ir.clone import clone_op
    from sparsa.ir.core import Region
    from sparsa.ir.dialects.func import FuncOp, ReturnOp

    stats = Counter() if stats is None else stats
    block = f.regions[0].block
    outs = block.terminator.operands
    new = Block([a.type for a in block.args] + [v.type for v in outs],
                [a.name_hint for a in block.args] + [f"d_{v.name_hint or i}" for i, v in enumerate(outs)])
    mapping: dict[int, Value] = {id(a): b for a, b in zip(block.args, new.args, strict=False)}
    forward: list[Operation] = []
    g = Grad(new)
    for op in block.ops[:-1]:
        copy = clone_op(op, mapping)
        form = getattr(copy, "training_form", None)
        start = len(new.ops)
        g.loc = copy.loc
        results = form(g) if form is not None else None
        if results is None:
            new.append(copy)
            forward.append(copy)
            continue
        # the op's training form: ops that keep what its rule would otherwise compute again (a fused MoE
        # epilogue's products), so the backward reads them as residuals
        copy.drop_uses()
        stats["ops in their training form"] += 1
        forward.extend(new.ops[start:])
        for r, v in zip(op.results, results, strict=True):
            v.name_hint = r.name_hint
            mapping[id(r)] = v
    g.loc = None
    for v, d in zip(outs, new.args[len(block.args):], strict=True):
        g.flow(mapping.get(id(v), v), d)
    g.reverse(forward)
    stats["ops differentiated"] += sum(1 for op in forward if hasattr(op, "vjp"))
    results = []
    for _, _, v in grad_targets(f):
        mine = mapping.get(id(v), v)
        results.append(g.grads.get(id(mine)) or g.full(0.0, TensorType(v.type.dtype, v.type.shape)))
    new.append(ReturnOp.build(results))
    vjp = FuncOp([], [], {"sym_name": f"{f.attributes['sym_name']}_vjp",
                          "result_types": [r.type for r in results], "residuals": "recompute",
                          "grads": [name for _, name, _ in grad_targets(f)]},
                 [Region([new])], f.loc)
    return vjp, len(forward), [mapping.get(id(v), v) for v in outs]


def pullback_ops(pullback: Operation, stats: Counter | None = None) -> tuple[list[Operation], list[Value]]:
    """What a `tensor.pullback` stands for: new ops (not yet in any block) that read the values before it, and
    the cotangent of each of its `wrt` values among their results. They are the ops between the wrt values and
    its result (`of`), again, in their training forms, then those ops' rules (`vjp_function` of a function made
    of them)."""
    from sparsa.ir.clone import clone_op
    from sparsa.ir.core import Region
    from sparsa.ir.dialects.func import FuncOp, ReturnOp

    block = pullback.parent
    before = block.ops[:block.ops.index(pullback)]
    produced = {id(r): op for op in before for r in op.results}

    def reads(op: Operation) -> list[Value]:  # its operands and its regions' outer values
        return [v for inner in op.walk() for v in inner.operands if v.owner is block or id(v) in produced]

    feeding: set[int] = set()  # the ops `of` is computed from
    stack = [pullback.of]
    while stack:
        op = produced.get(id(stack.pop()))
        if op is not None and id(op) not in feeding:
            feeding.add(id(op))
            stack += reads(op)
    wrt = list({id(v): v for v in pullback.wrt}.values())
    varying = {id(v) for v in wrt}
    cone = []  # of those, the ones a wrt value reaches
    for op in before:
        if id(op) in feeding and any(id(v) in varying for v in reads(op)):
            cone.append(op)
            varying.update(id(r) for r in op.results)
    made = {id(r) for op in cone for r in op.results}
    if any(id(w) in made for w in wrt):
        from sparsa.ir.diagnostics import SparsaError

        raise SparsaError("tensor.pullback: a wrt value is computed from another one (the cotangents are of values "
                          "the ops between read, not of what they compute)", pullback.loc)
    inside = made | {id(w) for w in wrt}
    outer = [v for op in cone for v in reads(op)] + [pullback.of]  # `of` itself where no wrt value reaches it
    args = wrt + list({id(v): v for v in outer if id(v) not in inside}.values())
    fblock = Block([v.type for v in args], [v.name_hint for v in args])
    mapping: dict[int, Value] = {id(v): a for v, a in zip(args, fblock.args, strict=True)}
    for op in cone:
        fblock.append(clone_op(op, mapping))
    fblock.append(ReturnOp.build([mapping[id(pullback.of)]]))
    f = FuncOp([], [], {"sym_name": "pullback", "result_types": [pullback.of.type]}, [Region([fblock])],
               pullback.loc)
    vjp, _, _ = vjp_function(f, stats)
    vblock = vjp.regions[0].block
    mapping = {id(a): v for a, v in zip(vblock.args, [*args, pullback.cotangent], strict=True)}
    ops = [clone_op(op, mapping) for op in vblock.ops[:-1]]
    grads = [mapping.get(id(v), v) for v in vblock.terminator.operands]  # of each float arg: the wrt first
    of_wrt = {id(w): d for w, d in zip(wrt, grads, strict=False)}
    return ops, [of_wrt[id(w)] for w in pullback.wrt]
