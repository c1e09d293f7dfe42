"""`cse`: common-subexpression elimination of pure ops, scoped by region nesting."""

from __future__ import annotations

from typing import Any

from sparsa.ir.core import Block, Module, Operation
from sparsa.passes.base import Pass


def _frozen(v: Any) -> Any:
    """An attribute's value with its lists as tuples (a builder may give either)."""
    return tuple(_frozen(x) for x in v) if isinstance(v, list | tuple) else v


def _key(op: Operation) -> tuple[Any, ...]:
    attrs = tuple(sorted((k, repr(_frozen(v))) for k, v in op.attributes.items()))
    return (op.NAME, tuple(id(v) for v in op.operands), attrs, tuple(r.type for r in op.results))


class CSE(Pass):
    """Replace a pure op by an identical earlier one (same name, operands, attributes, result types)."""

    NAME = "cse"

    def run(self, module: Module) -> None:
        for f in module.funcs:
            self._block(f.regions[0].block, [{}])

    def _block(self, block: Block, scopes: list[dict[tuple[Any, ...], Operation]]) -> None:
        scopes.append({})
        for op in list(block.ops):
            for r in op.regions:
                for b in r.blocks:  # (an isolated region shares nothing with the values around it)
                    self._block(b, [{}] if op.ISOLATED else scopes)
            if not op.PURE or op.TERMINATOR or op.regions:
                continue
            key = _key(op)
            earlier = next((s[key] for s in reversed(scopes) if key in s), None)
            if earlier is None:
                scopes[-1][key] = op
                continue
            for old, new in zip(op.results, earlier.results, strict=True):
                old.replace_all_uses_with(new)
            op.erase()
            self.stats["ops eliminated"] += 1
        scopes.pop()
