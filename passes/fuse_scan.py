"""`fuse-scan`: fuse a `scan` with the elementwise ops that make its full-size inputs and the reduction
that consumes its result, so the [B, L, D, N] state is never materialized.

    a = exp(delta[..., None] * A); b = (delta * u)[..., None] * B[:, :, None, :]
    h = scan(a, b, axis=1); y = sum(h * C[:, :, None, :], axis=-1)
        ->  y = scan.fused(delta[..., None], A, u[..., None], B[:, :, None, :], C[:, :, None, :])
              ({producer: step t of the inputs -> (a_t, b_t)}, {consumer: (h_t, C_t) -> y_t})

`fuse-scan-epilogue` then moves the elementwise op that reads a fused scan's result into its consumer, after the
sum, with the elementwise ops of its other operands that nothing else reads (Mamba's `+ D * u`): no pass over
[B, L, D] of their own. It runs after `differentiate` in `m.vjp`'s pipeline (a scan's backward is built from
the consumer without it).

Producers are absorbed while they are elementwise, of the state's rank and size (or 1 along some dims) and used
only by the scan's inputs; what they read becomes an input. An input made by `expand_dims(f(x, y))`, f elementwise
of operands of its rank and used only there, is first written `f(expand_dims(x), expand_dims(y))`, so f joins the
producer too (Mamba's delta * u: once a step in the scan, not a pass over [B, L, D] of its own). The consumer
must be `sum(h * X, axes)` over axes other than the scan axis. Scans with an initial state, or whose result is
used otherwise, stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

from sparsa.ir.clone import clone_op, clone_region
from sparsa.ir.core import Block, Operation, Region, Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.func import YieldOp
from sparsa.ir.dialects.scan import FusedScanOp, LinearAttentionOp, ScanOp, result_dims, step_type
from sparsa.ir.dims import compatible
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import TensorType
from sparsa.passes.base import Option
from sparsa.passes.rewrite import PatternPass, RewritePattern, Rewriter


def _broadcasts_to(t: TensorType, state: TensorType) -> bool:
    """t has the state's rank and each dim the state's or 1."""
    return t.rank == state.rank and all(a == 1 or compatible(a, b) for a, b in zip(t.shape, state.shape, strict=True))


def leaves(ops: list[Operation], outputs: list[Value]) -> list[Value]:
    """What `ops` (and `outputs`) read that none of them makes, each once, in order."""
    produced = {id(r) for op in ops for r in op.results}
    seen: dict[int, Value] = {}
    for op in ops:
        for v in op.operands:
            if id(v) not in produced:
                seen.setdefault(id(v), v)
    for v in outputs:
        if id(v) not in produced:
            seen.setdefault(id(v), v)
    return list(seen.values())


def elementwise_cone(reader: Operation, start: list[Value], fits: Callable[[Value], bool]) -> list[Operation]:
    """The elementwise ops whose value `fits` and that only `reader` (or others of them) reads, found back from
    `start`, in program order."""
    cone: dict[int, Operation] = {}
    members = {id(reader)}
    work = list(start)
    while work:
        v = work.pop()
        op = v.defining_op
        if (op is None or id(op) in cone or not isinstance(op, Elementwise) or len(op.results) != 1 or not fits(v)
                or any(id(u.op) not in members for u in v.uses)):
            continue
        cone[id(op)] = op
        members.add(id(op))
        work.extend(op.operands)
    return [o for o in reader.parent.ops if id(o) in cone]


def _padded(t: TensorType, rank: int) -> TensorType:
    """t with leading 1s up to `rank` (numpy broadcasting's view of it)."""
    return t.with_shape((1,) * (rank - t.rank) + tuple(t.shape))


class FuseScan(RewritePattern):
    """scan with elementwise state-sized producers and a sum(h * X) consumer becomes scan.fused."""

    ROOT = ScanOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        state = op.result.type
        if op.h0 is not None or op.transpose or len(op.result.uses) != 1:
            return False
        mul = op.result.uses[0].op
        if not isinstance(mul, T.MulOp) or len(mul.result.uses) != 1 or mul.result.type != state:
            return False
        other = mul.rhs if mul.lhs is op.result else mul.lhs
        red = mul.result.uses[0].op
        axis = op.axis % state.rank
        if not isinstance(red, R.SumOp) or axis in {a % state.rank for a in red.axes}:
            return False
        self.sink_expand_dims(op, state, rewriter)
        cone = self.producer_cone(op, state)
        inputs = leaves(cone, [op.a, op.b])
        producer = self.region(cone, inputs, [op.a, op.b], axis, state.rank)
        consumer = self.consumer(mul, red, op.result, other, axis, state.rank)
        reduced_before = sum(1 for a in red.axes if a % state.rank < axis)
        out_axis = axis if red.keepdim else axis - reduced_before
        fused = FusedScanOp.build(inputs + [other], regions=[producer, consumer], axis=axis,
                                  num_producer_inputs=len(inputs), out_axis=out_axis, state=state.shape, loc=op.loc)
        if fused.result.type != red.result.type:
            return False
        rewriter.insert_before(red, fused)
        rewriter.replace_op(red, [fused.result])
        return True

    def sink_expand_dims(self, scan: Operation, state: TensorType, rewriter: Rewriter) -> None:
        """Each `expand_dims(f(x, ...))` the producer cone reaches, f elementwise with operands of its rank and no
        other use, becomes `f(expand_dims(x), ...)` (an expand_dims of x already before it reused)."""
        work, seen = [scan.a, scan.b], set()
        while work:
            v = work.pop()
            op = v.defining_op
            if op is None or id(op) in seen:
                continue
            seen.add(id(op))
            if isinstance(op, Elementwise) and _broadcasts_to(v.type, state):
                work.extend(op.operands)
                continue
            inner = op.x.defining_op if isinstance(op, S.ExpandDimsOp) else None
            if not isinstance(inner, Elementwise) or len(inner.results) != 1 or len(op.x.uses) != 1 or any(
                    o.type.rank != op.x.type.rank for o in inner.operands):
                continue
            block = op.parent
            before = block.ops[:block.ops.index(op)]
            expanded = []
            for x in inner.operands:
                same = next((o for o in before if isinstance(o, S.ExpandDimsOp) and o.x is x and
                             tuple(o.axes) == tuple(op.axes)), None)
                if same is None:
                    same = rewriter.insert_before(op, S.ExpandDimsOp.build(x, axes=op.axes, loc=op.loc))
                expanded.append(same.result)
            new = rewriter.insert_before(op, type(inner).build(*expanded, loc=inner.loc, **dict(inner.attributes)))
            rewriter.replace_op(op, [new.results[0]])
            rewriter.erase_op(inner)
            work.append(new.results[0])

    def producer_cone(self, scan: Operation, state: TensorType) -> list[Operation]:
        """Elementwise ops broadcasting to the state that only feed the scan's a and b (in program order)."""
        return elementwise_cone(scan, [scan.a, scan.b], lambda v: _broadcasts_to(v.type, state))

    def region(self, cone: list[Operation], inputs: list[Value], outputs: list[Value], axis: int,
               rank: int) -> Region:
        block = Block([step_type(v.type, axis, rank) for v in inputs])
        mapping = {id(v): arg for v, arg in zip(inputs, block.args, strict=True)}
        for op in cone:
            new = type(op).build(*[mapping[id(v)] for v in op.operands], loc=op.loc, **dict(op.attributes))
            block.append(new)
            mapping[id(op.results[0])] = new.results[0]
        block.append(YieldOp.build([mapping[id(v)] for v in outputs]))
        return Region([block])

    def consumer(self, mul: Operation, red: Operation, h: Value, other: Value, axis: int, rank: int) -> Region:
        state_step = step_type(h.type, axis, rank)
        block = Block([state_step, step_type(other.type, axis, rank)], ["h", None])
        hv, ov = block.args
        product = T.MulOp.build(hv, ov, loc=mul.loc) if mul.lhs is h else T.MulOp.build(ov, hv, loc=mul.loc)
        block.append(product)
        total = R.SumOp.build(product.result, axes=red.axes, keepdim=red.keepdim, loc=red.loc)
        block.append(total)
        block.append(YieldOp.build([total.result]))
        return Region([block])


def _squeezed(v: Value, axes: tuple[int, ...]) -> Value | None:
    """x if v = expand_dims(x, axes) (axes counted in v's rank)."""
    op = v.defining_op
    if isinstance(op, S.ExpandDimsOp) and tuple(sorted(a % v.type.rank for a in op.axes)) == axes:
        return op.x
    return None


class ChunkLinearAttention(RewritePattern):
    """A matrix-state scan, h = scan(a[..., None, None], k[..., :, None] * v[..., None, :]) read as
    sum(h * q[..., :, None], axis=-2), becomes scan.linear_attention (chunked; states never stored)."""

    ROOT = ScanOp

    def __init__(self, chunk: int):
        self.chunk = chunk

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        state = op.result.type
        n = state.rank
        if n < 3 or op.h0 is not None or op.axis % n != n - 3 or len(op.result.uses) != 1:
            return False
        mul = op.result.uses[0].op
        red = mul.result.uses[0].op if isinstance(mul, T.MulOp) and len(mul.result.uses) == 1 else None
        if not isinstance(red, R.SumOp) or red.keepdim or tuple(a % n for a in red.axes) != (n - 2,):
            return False
        q = _squeezed(mul.rhs if mul.lhs is op.result else mul.lhs, (n - 1,))
        a = _squeezed(op.a, (n - 2, n - 1))
        outer = op.b.defining_op
        if q is None or a is None or not isinstance(outer, T.MulOp):
            return False
        k, v = _squeezed(outer.lhs, (n - 1,)), _squeezed(outer.rhs, (n - 2,))
        if k is None or v is None:
            return False
        new = LinearAttentionOp.build(q, k, v, a, chunk=self.chunk, loc=op.loc)
        if new.result.type != red.result.type:
            return False
        rewriter.insert_before(red, new)
        rewriter.replace_op(red, [new.result])
        return True


class TransposeIntoScan(RewritePattern):
    """transpose(scan(a, b), perm) read by nothing else: the scan in the transposed frame, its elementwise producers
    built again there (what they read transposed: the small broadcast inputs, not the state), so fuse-scan finds its
    consumer next to it. (A scan is elementwise across its other axes: it commutes with permuting them.)"""

    ROOT = ScanOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        if op.h0 is not None or op.transpose or len(op.result.uses) != 1:
            return False
        use = op.result.uses[0].op
        if not isinstance(use, S.TransposeOp):
            return False
        state, perm = op.result.type, list(use.perm)
        members = {id(op)}
        made: dict[int, Value] = {}

        def permuted(v: Value) -> Value:
            """v (broadcasting to the state) in the transposed frame."""
            if id(v) in made:
                return made[id(v)]
            src = v.defining_op
            if (isinstance(src, Elementwise) and len(src.results) == 1 and _broadcasts_to(v.type, state)
                    and all(id(u.op) in members for u in v.uses)):
                members.add(id(src))
                new = rewriter.insert_before(op, type(src).build(*[permuted(x) for x in src.operands], loc=src.loc,
                                                                 **dict(src.attributes)))
                out = new.results[0]
            elif v.type.rank == 0:
                out = v
            else:
                full = v if v.type.rank == state.rank else rewriter.insert_before(op, S.ExpandDimsOp.build(
                    v, axes=list(range(state.rank - v.type.rank)), loc=op.loc)).result
                out = rewriter.insert_before(op, S.TransposeOp.build(full, perm=perm, loc=use.loc)).result
            made[id(v)] = out
            return out

        a, b = permuted(op.a), permuted(op.b)
        new = rewriter.insert_before(use, ScanOp.build(a, b, axis=perm.index(op.axis % state.rank), loc=op.loc))
        rewriter.replace_op(use, [new.result])
        return True


class FuseScanPass(PatternPass):
    """Fuse each scan with its elementwise producers and its sum(h * X) consumer into scan.fused."""

    NAME = "fuse-scan"
    chunk = Option(int, 64, "steps per chunk of a matrix-state (linear attention) scan")
    COUNTERS = {"FuseScan": "scans fused", "ChunkLinearAttention": "matrix-state scans chunked",
                "TransposeIntoScan": "scans made in their readers' frame"}

    def patterns(self) -> list[RewritePattern]:
        return [ChunkLinearAttention(self.chunk), FuseScan(), TransposeIntoScan()]


class FuseScanEpilogue(RewritePattern):
    """y = scan.fused(...) read only by one elementwise op E of y's type: E, and the elementwise ops of its other
    operands that only it reads, join the consumer after its sum. Each value they read becomes an input with
    the summed dims as size-1 axes (so a step of it is taken as the state's is), squeezed again in the region."""

    ROOT = FusedScanOp

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        y = op.result
        if len(y.uses) != 1:
            return False
        use = y.uses[0].op
        if not isinstance(use, Elementwise) or len(use.results) != 1 or use.results[0].type != y.type:
            return False
        kept = result_dims(op, y.type)
        if kept is None:
            return False
        cone = elementwise_cone(use, [v for v in use.operands if v is not y], lambda v: v.type.rank <= y.type.rank)
        # scalar constants are made again in the region; what else the ops read becomes an input
        outside = [v for v in leaves([*cone, use], []) if v is not y]
        consts = [v for v in outside if isinstance(v.defining_op, T.ConstantOp) and not v.type.rank]
        read = [v for v in outside if all(v is not c for c in consts)]
        if any(v.type.rank > y.type.rank or not _broadcasts_to(_padded(v.type, y.type.rank), y.type) for v in read):
            return False
        rank = len(op.state)
        expanded, squeezes = [], []
        for v in read:
            first = kept[y.type.rank - v.type.rank] if v.type.rank else rank
            axes = [d - first for d in range(first, rank) if d not in kept]
            expanded.append(S.ExpandDimsOp.build(v, axes=axes, loc=use.loc) if axes else None)
            squeezes.append(axes)
        inputs = [*op.inputs, *(e.result if e is not None else v for e, v in zip(expanded, read, strict=True))]
        old = op.consumer.block
        block = Block([a.type for a in old.args] + [step_type(v.type, op.axis, rank) for v in inputs[len(op.inputs):]],
                      [a.name_hint for a in old.args] + [None] * len(read))
        mapping = {id(a): b for a, b in zip(old.args, block.args, strict=False)}
        for o in old.ops[:-1]:
            block.append(clone_op(o, mapping))
        mapping[id(y)] = mapping.get(id(old.terminator.operands[0]), old.terminator.operands[0])
        for v in consts:
            mapping[id(v)] = block.append(clone_op(v.defining_op, {})).results[0]
        for v, arg, axes in zip(read, block.args[len(old.args):], squeezes, strict=True):
            mapping[id(v)] = block.append(S.SqueezeOp.build(arg, axes=axes, loc=use.loc)).result if axes else arg
        for o in [*cone, use]:
            new = block.append(type(o).build(*[mapping[id(v)] for v in o.operands], loc=o.loc, **dict(o.attributes)))
            mapping[id(o.results[0])] = new.results[0]
        block.append(YieldOp.build([mapping[id(use.results[0])]]))
        fused = FusedScanOp.build(inputs, regions=[clone_region(op.producer), Region([block])], axis=op.axis,
                                  num_producer_inputs=op.num_producer_inputs, out_axis=op.out_axis, state=op.state,
                                  loc=op.loc)
        if fused.result.type != use.results[0].type:
            return False
        for e in expanded:
            if e is not None:
                rewriter.insert_before(use, e)
        rewriter.insert_before(use, fused)
        rewriter.replace_op(use, [fused.result])
        return True


class FuseScanEpiloguePass(PatternPass):
    """Move the elementwise op reading a fused scan's result (and its other operands' elementwise ops) into the
    scan's consumer, after its sum."""

    NAME = "fuse-scan-epilogue"
    COUNTERS = {"FuseScanEpilogue": "scan epilogues fused"}

    def patterns(self) -> list[RewritePattern]:
        return [FuseScanEpilogue()]
