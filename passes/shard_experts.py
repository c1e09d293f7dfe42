"""`shard-experts`: split every dispatched MoE over the ranks of a process group (expert parallel).

Experts are split into `ranks` contiguous, equal blocks; each rank keeps its block of every expert weight. A
dispatch and the grouped matmuls it feeds (what `fuse-moe-dispatch` made) become, on each rank:

    rows, local, sends, receives = moe.exchange_plan(idx)     # global capacity; each token once per rank
    xr = moe.all_to_all(x[rows], sends, receives)             # the tokens this rank's experts need
    lr = moe.all_to_all(local, sends, receives)               # and, per slot, which local expert (-1: none)
    gr = moe.all_to_all(gates[rows], sends, receives)
    perm, offsets = moe.dispatch(lr) {drop_negative}          # the local experts' segments
    h  = moe.grouped_matmul(xr, perm, offsets, W1_r, ...)     # this rank's weight blocks
    p  = moe.grouped_matmul_combine(h, perm, offsets, W2_r, gr)   # gated sum per received token
    y  = moe.combine_rows(moe.all_to_all(p, receives, sends), rows, gates)   # summed on the token's own rank

A token with two experts on one rank travels there once and comes back once, as one row each way. With
`own_first`, the rows a rank sends itself go through its experts straight from `x[rows]`
(`moe.rank_rows {own = true}`), apart from the rows other ranks send (`{own = false}` of what arrives), so
`overlap-exchanges` can run them while the exchange is in flight; `moe.insert_own_rows` puts the two partial
results back in rank order before they go home.
"""

from __future__ import annotations

from sparsa.ir.clone import clone_region
from sparsa.ir.core import Operation, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.func import ParamOp
from sparsa.ir.dialects.moe import DispatchOp, GroupedMatmulCombineOp, GroupedMatmulOp
from sparsa.ir.dialects.moe_exchange import (
    AllToAllOp,
    CombineRowsOp,
    ExchangePlanOp,
    InsertOwnRowsOp,
    LocalExpertsOp,
    RankRowsOp,
)
from sparsa.passes.base import Option
from sparsa.passes.rewrite import PatternPass, RewritePattern, Rewriter


class ShardDispatch(RewritePattern):
    """A dispatch and its grouped matmuls become the exchange, this rank's experts and the combine back home."""

    ROOT = DispatchOp

    def __init__(self, ranks: int, own_first: bool):
        self.ranks = ranks
        self.own_first = own_first
        self.shards: dict[int, Value] = {}  # id of a full weight -> this rank's block of it

    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        if op.drop_negative:
            return False  # a rank-local dispatch (this pass made it)
        users = _grouped_users(op)
        R, E = self.ranks, op.num_experts
        if E % R:
            raise SparsaError(f"expert parallel: {E} experts do not split into equal blocks over {R} ranks "
                              f"(use a world size that divides {E})", op.loc)
        final = users[-1]
        x = users[0].rows
        plan = _before(rewriter, op, ExchangePlanOp.build(op.experts, num_experts=E, ranks=R, capacity=op.capacity,
                                                          loc=op.loc))
        rows, local, sends, receives = plan.results
        for v, hint in zip(plan.results, ("rows", "local", "sends", "receives"), strict=True):
            v.name_hint = hint

        def exchange(v: Value) -> Value:
            return _before(rewriter, op, AllToAllOp.build(v, sends, receives, loc=op.loc)).result

        xs = _before(rewriter, op, S.GatherOp.build(x, [rows], loc=op.loc)).result
        gs = _before(rewriter, op, S.GatherOp.build(final.gates, [rows], loc=op.loc)).result
        xr, lr, gr = exchange(xs), exchange(local), exchange(gs)
        if self.own_first and R > 1:
            # this rank's own tokens need no exchange: their experts run while the others' rows are in flight
            def block(v: Value, counts: Value, own: bool) -> Value:
                return _before(rewriter, final, RankRowsOp.build(v, counts, own=own, loc=op.loc)).result

            mine = self.experts(op, users, rewriter, block(xs, sends, True), block(local, sends, True),
                                block(gs, sends, True))
            theirs = self.experts(op, users, rewriter, block(xr, receives, False), block(lr, receives, False),
                                  block(gr, receives, False))
            partial = _before(rewriter, final, InsertOwnRowsOp.build(theirs, mine, receives, loc=final.loc)).result
        else:
            partial = self.experts(op, users, rewriter, xr, lr, gr)
        back = AllToAllOp.build(partial, receives, sends, loc=final.loc)
        rewriter.insert_before(final, back)
        y = CombineRowsOp.build(back.result, rows, final.gates, loc=final.loc)
        rewriter.insert_before(final, y)
        rewriter.replace_op(final, [y.result])
        for g in reversed(users[:-1]):
            rewriter.erase_op(g)
        rewriter.erase_op(op)
        return True

    def experts(self, op: Operation, users: list[Operation], rewriter: Rewriter, x: Value, ids: Value,
                gates: Value) -> Value:
        """This rank's experts on received rows x (local expert ids per slot, -1 for none; their gates): a
        dispatch, the grouped matmuls on the weight blocks, the gated sum per row."""
        final = users[-1]
        dispatch = _before(rewriter, final, DispatchOp.build(ids, num_experts=op.num_experts // self.ranks,
                                                             block=op.block, drop_negative=True, loc=op.loc))
        perm, offsets = dispatch.results
        mapping = {id(users[0].rows): x}
        for g in users:
            src = x if g.gather else mapping[id(g.rows)]
            if isinstance(g, GroupedMatmulCombineOp):
                new = GroupedMatmulCombineOp.build(src, perm, offsets, self.shard(g.weight, g, rewriter), gates,
                                                   regions=[clone_region(g.epilogue)], topk=g.topk, gather=g.gather,
                                                   loc=g.loc)
            else:
                new = GroupedMatmulOp.build(src, perm, offsets, [self.shard(w, g, rewriter) for w in g.weights],
                                            regions=[clone_region(g.epilogue)], topk=g.topk, gather=g.gather,
                                            loc=g.loc)
            rewriter.insert_before(final, new)
            mapping[id(g.result)] = new.result
        return mapping[id(final.result)]

    def shard(self, w: Value, user: Operation, rewriter: Rewriter) -> Value:
        """This rank's block of expert weight w ([E, K, N]): a param becomes a sharded param (each rank loads only
        its block), views of one are rebuilt on the block, anything else is cut at run time."""
        if id(w) in self.shards:
            return self.shards[id(w)]
        owner = w.defining_op
        if isinstance(owner, ParamOp) and owner.shards is None:
            others = [u.op for u in w.uses if not _feeds_experts(u.op)]
            if others:
                raise SparsaError(f"expert parallel: weight '{owner.name}' is also read outside the experts "
                                  f"('{others[0].NAME}'), so it cannot be split over the ranks", others[0].loc)
            t = w.type
            new = ParamOp.build(name=owner.name, shards=self.ranks,
                                result_types=[type(t)(t.dtype, (t.shape[0] // self.ranks,) + t.shape[1:])],
                                loc=owner.loc)
            rewriter.insert_before(owner, new)
            block = new.result
            block.name_hint = w.name_hint
        elif isinstance(owner, S.TransposeOp) and owner.perm[0] == 0:
            block = _before(rewriter, user, S.TransposeOp.build(self.shard(owner.x, user, rewriter), perm=owner.perm,
                                                                loc=owner.loc)).result
        elif isinstance(owner, S.SliceOp) and owner.starts[0] == 0 and owner.steps[0] == 1 \
                and owner.stops[0] in (None, owner.x.type.shape[0]):
            block = _before(rewriter, user, S.SliceOp.build(self.shard(owner.x, user, rewriter),
                                                            starts=owner.starts, stops=[None, *owner.stops[1:]],
                                                            steps=owner.steps, loc=owner.loc)).result
        else:
            block = _before(rewriter, user, LocalExpertsOp.build(w, ranks=self.ranks, loc=user.loc)).result
        self.shards[id(w)] = block
        return block


def _before(rewriter: Rewriter, anchor: Operation, op: Operation) -> Operation:
    return rewriter.insert_before(anchor, op)


def _feeds_experts(op: Operation) -> bool:
    """Whether op is an expert weight's use: a grouped matmul, or a view on the way to one."""
    if isinstance(op, GroupedMatmulOp | GroupedMatmulCombineOp):
        return True
    return isinstance(op, S.TransposeOp | S.SliceOp) and all(_feeds_experts(u.op) for u in op.result.uses)


def _grouped_users(op: DispatchOp) -> list[Operation]:
    """The grouped matmuls reading the dispatch, in program order, ending in its one combine."""
    users = {id(u.op): u.op for r in op.results for u in r.uses}
    block = op.parent
    ordered = [o for o in block.ops if id(o) in users]
    combines = [o for o in ordered if isinstance(o, GroupedMatmulCombineOp)]
    others = [o for o in ordered if not isinstance(o, GroupedMatmulOp | GroupedMatmulCombineOp)]
    if others or len(combines) != 1 or ordered[-1] is not combines[0] or not ordered[0].gather \
            or any(g.gather and g.rows is not ordered[0].rows for g in ordered):
        what = others[0].NAME if others else f"{len(combines)} combines"
        raise SparsaError(f"expert parallel: this dispatch feeds {what}, not grouped matmuls ending in one "
                          "combine, so its experts cannot be split over the ranks", op.loc)
    return ordered


class ShardExperts(PatternPass):
    """Split MoE experts over the ranks of a process group: exchange tokens, run this rank's experts, combine."""

    NAME = "shard-experts"
    ranks = Option(int, 1, "ranks of the process group the experts are split over")
    # Off by default: on 2 ranks of one core each (this project's CPU runs), it cut the time blocked in waits from
    # 15.7 to 2.4 ms of a 175 ms call but not the call (the exchange had no spare core to run on), and at 32
    # tokens per rank the second dispatch and grouped GEMMs cost 2 ms more per call (12.3 -> 14.6 ms).
    own_first = Option(bool, False, "run this rank's own tokens through its experts apart, without waiting for "
                       "the exchange (two smaller grouped GEMMs instead of one)")
    COUNTERS = {"ShardDispatch": "moe dispatches split over the ranks"}

    def patterns(self) -> list[RewritePattern]:
        return [ShardDispatch(self.ranks, self.own_first)]
