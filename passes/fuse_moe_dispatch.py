"""`fuse-moe-dispatch`: lower `moe.moe` into sparse steps, with no dense [T, E] combine and no padded copy.

    perm, offsets = moe.dispatch(idx)                  # stable sort of (token, slot) by expert, capacity,
                                                       #   segments aligned to `block`
    h1 = moe.grouped_matmul(x, perm, offsets, W1, W3)  # tokens read through perm; every matmul on h
          ({ a, b -> silu(a) * b })                    #   shares one read; elementwise work in the epilogue
    y  = moe.grouped_matmul_combine(h1, perm, offsets, W2, gates)   # last matmul + gates * row scatter-add

The expert body must be a chain of stages: matmuls of the stage input by expert weights `W[e]` (or slices
and transposes of it, `W[e][:F].T` for weights stored [E, N, K]: the same views of all experts are taken
in front of the dispatch, where the backends see them), then
elementwise ops (the epilogue) that give the next stage's input; the last stage ends in one matmul whose
epilogue gives the body's value. A body of another shape stays a `moe.moe` and runs as written.

An epilogue may read values from outside the body (a 0-d scale, a shared bias), which the grouped matmul's
epilogue reads as data (with `outside_values=false`, for a target whose kernels read no tensors but 0-d ones, a
stage reading a shared tensor is treated as one reading the vectors below). It may also read expert vectors `b[e]`
of outside [E, N] tensors (biases). Such a stage's products are grouped matmuls of their own and its epilogue runs
as tensor ops on the permuted rows, each vector read as
`b[expert of row]`; the last stage's only such epilogue is `p + b[e]`, whose sum over a token's slots,
`sum_j gates[t, j] * b[idx[t, j]]` over the slots the dispatch placed, is added after the combine:

    h  = moe.grouped_matmul(x, perm, offsets, W1)   # one per product
    a  = act(h + b1[ids[max(perm, 0)]])             # tensor ops; padding rows are never read past here
    y  = moe.grouped_matmul_combine(a, perm, offsets, W2, gates) + sum(gates[..., None] * b2[idx], 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsa.ir.clone import clone_op
from sparsa.ir.core import Block, Operation, Region, Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.func import YieldOp
from sparsa.ir.dialects.moe import DispatchOp, GroupedMatmulCombineOp, GroupedMatmulOp, MoeOp
from sparsa.ir.dims import mul
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import TensorType
from sparsa.passes.base import Option
from sparsa.passes.rewrite import PatternPass, RewritePattern, Rewriter


class NotFusable(Exception):
    """The expert body is not a chain of expert matmuls and elementwise epilogues."""


@dataclass
class Stage:
    matmuls: list[Operation]                  # matmul(stage input, W[e]) in body order
    weights: list[ExpertWeight]               # the [E, K, N] weights they index by e
    epilogue: list[Operation] = field(default_factory=list)
    output: Value | None = None
    vectors: dict[int, Value] = field(default_factory=dict)  # the expert vectors b[e] it reads: their b, by id
    outside: bool = False  # whether its epilogue reads a tensor of the enclosing function (not a 0-d one)


@dataclass
class ExpertWeight:
    """A body value that is expert e's slice of an outside [E, ...] tensor, seen through views: W[e], or
    W[e][a:b].T as weights stored [E, N, K] (PyTorch's layout) are written."""

    base: Value                                     # W, defined outside the body
    views: list[Operation]                          # slices and transposes applied to W[e], in order

    def hoist(self, before: Operation, rewriter: Rewriter) -> Value:
        """The same views of every expert at once, built before `before`: an [E, K, N] value."""
        w = self.base
        for view in self.views:
            if isinstance(view, S.SliceOp):
                new = S.SliceOp.build(w, starts=[0, *view.starts], stops=[None, *view.stops],
                                      steps=[1, *view.steps], loc=view.loc)
            else:
                new = S.TransposeOp.build(w, perm=[0, *(p + 1 for p in view.perm)], loc=view.loc)
            rewriter.insert_before(before, new)
            w = new.result
        return w


def _expert_weight(v: Value, e: Value) -> ExpertWeight | None:
    """v as W[e] of a 3-D W from outside the body (a gather by the expert number), through slices and
    transposes of it; None for any other value."""
    views: list[Operation] = []
    op = v.defining_op
    while isinstance(op, S.SliceOp | S.TransposeOp):
        views.insert(0, op)
        op = op.x.defining_op
    if isinstance(op, S.GatherOp) and len(op.indices) == 1 and op.indices[0] is e and op.x.type.rank == 3:
        return ExpertWeight(op.x, views)
    return None


def _expert_vector(v: Value, e: Value, block: Block) -> Value | None:
    """v as b[e] of a 2-D b from outside the body (an expert's bias): b; None for any other value."""
    op = v.defining_op
    if isinstance(op, S.GatherOp) and len(op.indices) == 1 and op.indices[0] is e and op.x.type.rank == 2 and \
            _outside(op.x, block):
        return op.x
    return None


def split_stages(moe: MoeOp) -> list[Stage]:
    block = moe.body.block
    e, h = block.args
    result = block.terminator.operands[0]
    vectors = {id(op.results[0]): b for op in block.ops if not op.TERMINATOR
               and (b := _expert_vector(op.results[0], e, block)) is not None}
    body = [op for op in block.ops if not op.TERMINATOR and _expert_weight(op.results[0], e) is None
            and id(op.results[0]) not in vectors]
    consts = {id(op.results[0]) for op in body if isinstance(op, T.ConstantOp) and op.results[0].type.rank == 0}
    pending = [op for op in body if id(op.results[0]) not in consts]
    stages: list[Stage] = []
    current = h
    while True:
        mms = [op for op in pending if isinstance(op, S.MatmulOp) and op.lhs is current
               and _expert_weight(op.rhs, e) is not None]
        if not mms:
            raise NotFusable()
        stage = Stage(mms, [_expert_weight(op.rhs, e) for op in mms])
        pending = [op for op in pending if op not in mms]
        available = {id(op.results[0]) for op in mms} | consts | set(vectors)
        for op in list(pending):
            if isinstance(op, Elementwise) and all(id(v) in available or _outside(v, block) for v in op.operands):
                stage.epilogue.append(op)
                stage.outside |= any(_outside(v, block) and v.type.rank > 0 for v in op.operands)
                available.add(id(op.results[0]))
                stage.vectors.update((id(v), vectors[id(v)]) for v in op.operands if id(v) in vectors)
        pending = [op for op in pending if op not in stage.epilogue]
        stages.append(stage)
        produced = [op.results[0] for op in mms + stage.epilogue]
        if any(v is result for v in produced):
            stage.output = result
            if pending:
                raise NotFusable()
            _check_internal(stage, produced, result)
            return stages
        users = {id(v) for op in pending for v in op.operands}
        outs = [v for v in produced if id(v) in users]
        if len(outs) != 1 or any(not (isinstance(op, S.MatmulOp) and op.lhs is outs[0]) for op in pending
                                 if any(v is outs[0] for v in op.operands)):
            raise NotFusable()
        stage.output = outs[0]
        _check_internal(stage, produced, outs[0])
        current = outs[0]


def _outside(v: Value, block: Block) -> bool:
    """Defined outside the expert body (a weight or any value of the enclosing function)."""
    op = v.defining_op
    return v.owner is not block if op is None else op.parent is not block


def _check_internal(stage: Stage, produced: list[Value], output: Value) -> None:
    """Values of a stage other than its output may only feed its own epilogue."""
    inside = set(map(id, stage.epilogue))
    for v in produced:
        if v is output:
            continue
        if any(id(u.op) not in inside for u in v.uses):
            raise NotFusable()


def _epilogue(stage: Stage) -> Region:
    block = Block([op.results[0].type for op in stage.matmuls])
    mapping = {id(op.results[0]): arg for op, arg in zip(stage.matmuls, block.args, strict=True)}
    for op in stage.epilogue:
        for v in op.operands:
            c = v.defining_op
            if isinstance(c, T.ConstantOp) and id(v) not in mapping:
                block.append(clone_op(c, mapping))
        block.append(clone_op(op, mapping))
    block.append(YieldOp.build([mapping[id(stage.output)]]))
    return Region([block])


def _identity(t: TensorType) -> Region:
    """An epilogue yielding its one product."""
    block = Block([t])
    block.append(YieldOp.build([block.args[0]]))
    return Region([block])


def _final_bias(stage: Stage) -> Value | None:
    """The b of a last stage whose epilogue is p + b[e] (p its matmul); None where it reads no vector. Raises
    NotFusable for any other epilogue reading one."""
    if not stage.vectors:
        return None
    (add,) = stage.epilogue if len(stage.epilogue) == 1 else (None,)
    product = stage.matmuls[0].results[0]
    if not isinstance(add, T.AddOp) or stage.output is not add.result or len(stage.vectors) != 1 or \
            {id(v) for v in add.operands} != {id(product), *stage.vectors}:
        raise NotFusable()
    return next(iter(stage.vectors.values()))


class _Rows:
    """Tensor ops the rewrite inserts before the moe: the expert of each permuted row (made once), and the
    sum over slots of the last stage's bias."""

    def __init__(self, moe: MoeOp, dispatch: DispatchOp, k: int, rewriter: Rewriter):
        self.moe, self.k, self.rewriter, self._experts, self._slots = moe, k, rewriter, None, None
        self.perm, self.offsets = dispatch.results

    def add(self, op: Operation) -> Value:
        self.rewriter.insert_before(self.moe, op)
        return op.results[0]

    def const(self, value: float, dtype: str, shape: tuple = ()) -> Value:
        return self.add(T.ConstantOp.build(value=value, result_types=[TensorType(dtype, shape)]))

    def slots(self) -> Value:
        """max(perm, 0): each permuted row's slot (t * k + j; padding rows read slot 0, and are never read after)."""
        if self._slots is None:
            self._slots = self.add(T.MaximumOp.build(self.perm, self.const(0, "i64")))
        return self._slots

    def experts(self) -> Value:
        """ids[slot]: each permuted row's expert."""
        if self._experts is None:
            ids = self.add(S.ReshapeOp.build(self.moe.idx, shape=(-1,)))
            self._experts = self.add(S.GatherOp.build(ids, [self.slots()]))
        return self._experts

    def unfused(self, stage: Stage, rows: Value, weights: list[Value], gather: bool) -> Value:
        """A stage whose epilogue reads expert vectors (or tensors from outside the body, where the target's
        grouped-matmul kernels read none): a grouped matmul per product, the epilogue as tensor ops on the
        permuted rows."""
        mapping: dict[int, Value] = {}
        for mm, w in zip(stage.matmuls, weights, strict=True):
            product = mm.results[0]
            mapping[id(product)] = self.add(GroupedMatmulOp.build(rows, self.perm, self.offsets, [w], regions=[
                _identity(product.type)], topk=self.k, gather=gather, loc=mm.loc))
        for v, b in stage.vectors.items():
            mapping[v] = self.add(S.GatherOp.build(b, [self.experts()]))
        for op in stage.epilogue:  # built again: their types are inferred (b[e] * 2 is a row of rows now)
            for v in op.operands:
                if isinstance(v.defining_op, T.ConstantOp) and id(v) not in mapping:
                    self.add(clone_op(v.defining_op, mapping))
            new = type(op).build(*(mapping.get(id(v), v) for v in op.operands), loc=op.loc, **op.attributes)
            mapping[id(op.results[0])] = self.add(new)
        return mapping[id(stage.output)]

    def bias_sum(self, b: Value, gates: Value, experts: int) -> Value:
        """sum_j gates[t, j] * b[idx[t, j]] ([T, N]) over the slots the dispatch placed: as the combine, none a
        capacity dropped or of an id past the experts (expert parallel's sentinels)."""
        idx = self.moe.idx
        tokens, dt = idx.type.shape[0], gates.type.dtype
        placed = self.add(T.CastOp.build(self.add(T.CmpOp.build(self.perm, self.const(0, "i64"), pred="ge")), to=dt))
        kept = self.add(S.ScatterAddOp.build(self.const(0.0, dt, (mul(tokens, self.k),)), placed, [self.slots()]))
        weights = self.add(T.MulOp.build(gates, self.add(S.ReshapeOp.build(kept, shape=(tokens, self.k)))))
        rows = self.add(S.GatherOp.build(b, [self.add(T.MinimumOp.build(idx, self.const(experts - 1, "i64")))]))
        scaled = self.add(T.MulOp.build(rows, self.add(S.ExpandDimsOp.build(weights, axes=(2,)))))
        return self.add(R.SumOp.build(scaled, axes=(1,)))


class FuseDispatch(RewritePattern):
    """moe.moe with a staged expert body becomes dispatch + grouped matmuls + fused combine."""

    ROOT = MoeOp

    def __init__(self, block: int, outside_values: bool = True):
        self.block, self.outside_values = block, outside_values

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        try:
            stages = split_stages(op)
        except NotFusable:
            return False
        if len(stages[-1].matmuls) != 1 or stages[-1].outside and not self.outside_values:
            return False  # the combine is fused into exactly one final matmul (reading no outside tensor, if told)
        k = op.idx.type.shape[1]
        try:
            bias = _final_bias(stages[-1])
        except NotFusable:
            return False
        if not isinstance(k, int):
            return False
        dispatch = DispatchOp.build(op.idx, num_experts=op.num_experts, block=self.block, capacity=op.capacity,
                                    loc=op.loc)
        rewriter.insert_before(op, dispatch)
        perm, offsets = dispatch.results
        made = _Rows(op, dispatch, k, rewriter)
        rows = op.x
        for i, stage in enumerate(stages):
            weights = [w.hoist(dispatch, rewriter) for w in stage.weights]
            if (stage.vectors or stage.outside and not self.outside_values) and i < len(stages) - 1:
                rows = made.unfused(stage, rows, weights, i == 0)
                continue
            region = _epilogue(stage) if bias is None or i < len(stages) - 1 else \
                _identity(stage.matmuls[0].results[0].type)
            if i == len(stages) - 1:
                new = GroupedMatmulCombineOp.build(rows, perm, offsets, weights[0], op.gates, regions=[region],
                                                   topk=k, gather=i == 0, loc=stage.matmuls[0].loc)
            else:
                new = GroupedMatmulOp.build(rows, perm, offsets, weights, regions=[region], topk=k,
                                            gather=i == 0, loc=stage.matmuls[0].loc)
            rewriter.insert_before(op, new)
            rows = new.result
        if bias is not None:
            rows = made.add(T.AddOp.build(rows, made.bias_sum(bias, op.gates, op.num_experts)))
        if rows.type != op.result.type:
            raise AssertionError(f"fused moe gives {rows.type}, the moe gave {op.result.type}")
        rewriter.replace_op(op, [rows])
        return True


class FuseMoeDispatch(PatternPass):
    """Lower moe into dispatch, grouped matmuls with fused epilogues, and a combine fused into the last matmul."""

    NAME = "fuse-moe-dispatch"
    block = Option(int, 64, "align each expert's segment to a multiple of this many rows")
    outside_values = Option(bool, True, "epilogues may read tensors from outside the expert body (a shared bias; 0-d "
                            "ones always); false: such a stage's epilogue runs as tensor ops after its grouped matmuls")
    COUNTERS = {"FuseDispatch": "moe ops lowered to grouped matmuls"}

    def patterns(self) -> list[RewritePattern]:
        return [FuseDispatch(self.block, self.outside_values)]
