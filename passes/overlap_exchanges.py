"""`overlap-exchanges`: begin each exchange among ranks where it was, wait for it only where its rows are read,
and run the work that does not depend on it in between (expert parallel).

    %r = moe.all_to_all(%x, %s, %t)             %r0 = moe.all_to_all_start(%x, %s, %t)
    %a = <reads %r>                   ==>       %b = <independent: a shared expert, say>
    %b = <independent>                          %r = moe.all_to_all_wait(%r0)
                                                %a = <reads %r>

Each wait moves down to the first op that reads its rows (past later exchanges' starts, so those begin
sooner); then every later op whose operands are all ready before a wait (defined above it, or by other ops
moved with it) moves above it. Starts and plans never move, so every rank begins its collectives in the
same order.
"""

from __future__ import annotations

from sparsa.ir.core import Block, Module, Operation
from sparsa.ir.dialects.moe_exchange import AllToAllOp, AllToAllStartOp, AllToAllWaitOp, ExchangePlanOp
from sparsa.passes.base import Pass

COLLECTIVES = (ExchangePlanOp, AllToAllOp, AllToAllStartOp, AllToAllWaitOp)


class OverlapExchanges(Pass):
    """Split exchanges into start and wait, and move the work that does not need their rows between the two."""

    NAME = "overlap-exchanges"

    def run(self, module: Module) -> None:
        for f in module.funcs:
            block = f.regions[0].block
            for op in [o for o in block.ops if isinstance(o, AllToAllOp)]:
                self._split(block, op)
            for wait in [o for o in block.ops if isinstance(o, AllToAllWaitOp)]:
                _sink(block, wait)
            for wait in [o for o in block.ops if isinstance(o, AllToAllWaitOp)]:
                self.stats["ops run during an exchange"] += self._hoist_above(block, wait)

    def _split(self, block: Block, op: AllToAllOp) -> None:
        start = AllToAllStartOp.build(op.data, op.sends, op.receives, loc=op.loc)
        wait = AllToAllWaitOp.build(start.result, loc=op.loc)
        at = block.ops.index(op)
        block.insert(at, start)
        block.insert(at + 1, wait)
        wait.result.name_hint = op.result.name_hint
        op.result.replace_all_uses_with(wait.result)
        op.erase()
        self.stats["exchanges split into start and wait"] += 1

    def _hoist_above(self, block: Block, wait: Operation) -> int:
        """Move the ops after `wait` that do not depend on it (nor on anything after it) to just before it."""
        at = block.ops.index(wait)
        ready = {id(v) for op in block.ops[:at] for v in op.results} | {id(a) for a in block.args}
        moved: list[Operation] = []
        for op in block.ops[at + 1:]:
            if op.TERMINATOR or isinstance(op, COLLECTIVES) or not op.PURE:
                continue
            if all(id(v) in ready for v in _reads(op)):
                moved.append(op)
                ready.update(id(r) for r in op.results)
        for op in moved:
            block.ops.remove(op)
            op.parent = None
            block.insert(block.ops.index(wait), op)
        return len(moved)


def _sink(block: Block, wait: Operation) -> None:
    """Move `wait` down to just before the first op that reads its rows (past other exchanges' starts: a wait
    is this rank's alone, and the starts keep their order)."""
    users = {id(_top(u.op, block)) for u in wait.result.uses}
    first = next(op for op in block.ops if id(op) in users)
    block.ops.remove(wait)
    block.insert(block.ops.index(first), wait)


def _top(op: Operation, block: Block) -> Operation:
    """The op of `block` that holds op (op itself, or the region op it is nested in)."""
    while op.parent is not block:
        op = op.parent.parent.parent  # block -> region -> op
    return op


def _reads(op: Operation) -> list:
    """The values op reads: its operands, and the outer values its regions read."""
    inner = {id(v) for o in op.walk() for v in o.results} | {id(a) for r in op.regions for b in r.blocks
                                                                 for a in b.args}
    return [v for o in op.walk() for v in o.operands if id(v) not in inner]
