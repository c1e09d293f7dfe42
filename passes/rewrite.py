"""Rewrite patterns rooted at one op class, a rewriter that keeps use lists right, and a greedy driver."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from typing import ClassVar

from sparsa.ir.core import Module, Operation, Value
from sparsa.passes.base import Pass


class Rewriter:
    """The only way patterns edit IR: insert, replace and erase ops."""

    def insert_before(self, anchor: Operation, op: Operation) -> Operation:
        """Insert `op` right before `anchor` in its block, inheriting its location if it has none."""
        block = anchor.parent
        assert block is not None, "anchor is detached"
        if op.loc is None:
            op.loc = anchor.loc
        return block.insert(block.ops.index(anchor), op)

    def replace_op(self, op: Operation, values: Sequence[Value]) -> None:
        """Make every use of op's results use `values` instead, then erase op."""
        for old, new in zip(op.results, values, strict=True):
            old.replace_all_uses_with(new)
        self.erase_op(op)

    def erase_op(self, op: Operation) -> None:
        op.erase()

    def move_before(self, op: Operation, anchor: Operation) -> None:
        """Move `op` (with its uses) from its block to right before `anchor`."""
        op.parent.ops.remove(op)
        op.parent = None
        anchor.parent.insert(anchor.parent.ops.index(anchor), op)

    def set_operand(self, op: Operation, index: int, value: Value) -> None:
        """Make operand `index` of `op` read `value`."""
        op.set_operand(index, value)

    def append_operand(self, op: Operation, value: Value) -> None:
        """Add `value` as op's last operand (an optional operand group's)."""
        op.operands.append(value)
        op._add_use(value, len(op.operands) - 1)

    def set_attr(self, op: Operation, name: str, value: object) -> None:
        op.attributes[name] = value


class RewritePattern(ABC):
    """A local rewrite: ROOT is the op class it looks at; returns True when it changed the IR."""

    ROOT: ClassVar[type[Operation] | tuple[type[Operation], ...]] = Operation

    @abstractmethod
    def match_and_rewrite(self, op: Operation, rewriter: Rewriter) -> bool:
        """Check guards first; rewrite only when every guard holds."""


def is_trivially_dead(op: Operation) -> bool:
    """A pure, non-terminator op none of whose results is used."""
    return op.PURE and not op.TERMINATOR and op.NAME != "func.func" and all(not r.uses for r in op.results)


def apply_patterns_greedily(module: Module, patterns: Sequence[RewritePattern], stats: Counter[str],
                            max_iterations: int = 10) -> bool:
    """Apply `patterns` and remove dead ops until nothing changes (or `max_iterations` sweeps)."""
    rewriter = Rewriter()
    changed_any = False
    for _ in range(max_iterations):
        changed = False
        for op in [o for f in module.funcs for o in f.walk()]:
            if op.parent is None:
                continue  # erased earlier in this sweep
            if is_trivially_dead(op):
                rewriter.erase_op(op)
                stats["dead ops erased"] += 1
                changed = True
                continue
            for p in patterns:
                if isinstance(op, p.ROOT) and p.match_and_rewrite(op, rewriter):
                    stats[type(p).__name__] += 1
                    changed = True
                    break
        changed_any |= changed
        if not changed:
            break
    return changed_any


class PatternPass(Pass):
    """A pass that applies its patterns greedily; COUNTERS renames pattern counters for the statistics."""

    COUNTERS: ClassVar[dict[str, str]] = {}

    def patterns(self) -> list[RewritePattern]:
        """The patterns to apply (built per run, so they can read the pass's options)."""
        return []

    def run(self, module: Module) -> None:
        apply_patterns_greedily(module, self.patterns(), self.stats)
        for pattern, counter in self.COUNTERS.items():
            if pattern in self.stats:
                self.stats[counter] = self.stats.pop(pattern)
