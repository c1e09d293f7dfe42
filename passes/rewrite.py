"""Rewrite patterns rooted at one op class, a rewriter that keeps use lists right, and a greedy worklist driver
that says when it does not converge."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

from sparsa.ir.core import Module, Operation, Value
from sparsa.passes.base import Pass


class Rewriter:
    """The only way patterns edit IR: insert, move, replace and erase ops, set operands and attributes. Each edit
    tells the driver (`notify`) which ops to look at again."""

    def __init__(self, notify: Callable[[Operation], None] | None = None):
        self.notify = notify or (lambda op: None)

    def _users(self, values: Sequence[Value]) -> None:
        for v in values:
            for use in list(v.uses):
                self.notify(use.op)

    def _producers(self, op: Operation) -> None:
        for v in op.operands:
            if v.defining_op is not None:
                self.notify(v.defining_op)

    def insert_before(self, anchor: Operation, op: Operation) -> Operation:
        """Insert `op` right before `anchor` in its block, inheriting its location if it has none."""
        block = anchor.parent
        assert block is not None, "anchor is detached"
        if op.loc is None:
            op.loc = anchor.loc
        block.insert(block.ops.index(anchor), op)
        for inner in op.walk():
            self.notify(inner)
        return op

    def move_before(self, op: Operation, anchor: Operation) -> None:
        """Move `op` (with its uses) from its block to right before `anchor`."""
        op.parent.ops.remove(op)
        op.parent = None
        anchor.parent.insert(anchor.parent.ops.index(anchor), op)
        self.notify(op)
        self.notify(anchor)

    def replace_op(self, op: Operation, values: Sequence[Value]) -> None:
        """Make every use of op's results use `values` instead, then erase op."""
        users = [u.op for r in op.results for u in r.uses]
        for old, new in zip(op.results, values, strict=True):
            old.replace_all_uses_with(new)
        for user in users:
            self.notify(user)
        self.erase_op(op)

    def erase_op(self, op: Operation) -> None:
        """Erase `op` (its results unused); what produced its operands may be dead now."""
        self._producers(op)
        op.erase()

    def set_operand(self, op: Operation, index: int, value: Value) -> None:
        """Make operand `index` of `op` read `value`."""
        old = op.operands[index].defining_op
        op.set_operand(index, value)
        self.notify(op)
        if old is not None:
            self.notify(old)

    def append_operand(self, op: Operation, value: Value, field: str | None = None) -> None:
        """Add `value` as op's last operand, or as the one of its optional operand `field` (empty until now),
        wherever that field sits among the op's operands."""
        at = len(op.operands) if field is None else op.operand_segment(field)[0]
        for v in {id(v): v for v in op.operands[at:]}.values():
            for u in v.uses:
                if u.op is op and u.index >= at:
                    u.index += 1
        op.operands.insert(at, value)
        op._add_use(value, at)
        self.notify(op)

    def set_attr(self, op: Operation, name: str, value: object) -> None:
        op.attributes[name] = value
        self.notify(op)


class RewritePattern(ABC):
    """A local rewrite: ROOT is the op class it looks at; returns True when it changed the IR."""

    ROOT: ClassVar[type[Operation] | tuple[type[Operation], ...]] = Operation

    @abstractmethod
    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        """Check guards first; rewrite only when every guard holds."""


def is_trivially_dead(op: Operation) -> bool:
    """A pure, non-terminator op none of whose results is used."""
    return op.PURE and not op.TERMINATOR and op.NAME != "func.func" and all(not r.uses for r in op.results)


class _Worklist:
    """Ops to visit in order, each queued at most once."""

    def __init__(self, ops: Iterable[Operation]):
        self.ops: deque[Operation] = deque(ops)
        self.queued = {id(o) for o in self.ops}

    def push(self, op: Operation) -> None:
        if id(op) not in self.queued:
            self.queued.add(id(op))
            self.ops.append(op)

    def pop(self) -> Operation:
        op = self.ops.popleft()
        self.queued.discard(id(op))
        return op

    def __bool__(self) -> bool:
        return bool(self.ops)


def apply_patterns_greedily(module: Module, patterns: Sequence[RewritePattern], stats: Counter[str],
                            max_iterations: int = 10, name: str = "patterns") -> bool:
    """Apply `patterns` and remove dead ops to a fixpoint, with a worklist: every op once, then the ops an edit
    touched (new ops, users of replaced values, producers of erased ones). An iteration starts from every op
    again and must change nothing for the fixpoint to hold; after `max_iterations`, or a rewrite budget spent
    within one, the pass `name` warns that it did not converge (and counts it) instead of looping on."""
    changed_any = False
    for _ in range(max_iterations):
        work = _Worklist(o for f in module.funcs for o in f.walk())
        rewriter = Rewriter(work.push)
        changed = False
        budget = 64 * (len(work.ops) + 1)  # rewrites in one iteration: patterns that undo each other stop here
        while work and budget:
            budget -= 1
            op = work.pop()
            if op.parent is None and op.NAME != "func.func":
                continue  # erased, or not yet in a block
            if is_trivially_dead(op):
                rewriter.erase_op(op)
                stats["dead ops erased"] += 1
                changed = True
                continue
            for p in patterns:
                if isinstance(op, p.ROOT) and p.match_and_rewrite(op, rewriter):
                    stats[type(p).__name__] += 1
                    changed = True
                    if op.parent is not None:  # still there: it (and what reads it) may match again
                        work.push(op)
                        rewriter._users(op.results)
                    break
        changed_any |= changed
        if not changed:
            return changed_any
        if not budget:
            break
    stats["did not converge"] += 1
    warnings.warn(f"{name}: the rewrite patterns did not reach a fixpoint in {max_iterations} iterations; the IR "
                  "is valid but may not be fully rewritten", RuntimeWarning, stacklevel=2)
    return changed_any


class PatternPass(Pass):
    """A pass that applies its patterns greedily; COUNTERS renames pattern counters for the statistics."""

    COUNTERS: ClassVar[dict[str, str]] = {}

    def patterns(self) -> list[RewritePattern]:
        """The patterns to apply (built per run, so they can read the pass's options)."""
        return []

    def run(self, module: Module) -> None:
        apply_patterns_greedily(module, self.patterns(), self.stats, name=self.NAME)
        for pattern, counter in self.COUNTERS.items():
            if pattern in self.stats:
                self.stats[counter] = self.stats.pop(pattern)
