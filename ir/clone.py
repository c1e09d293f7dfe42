"""Deep copies of ops and regions, remapping values defined inside and keeping outer values."""

from __future__ import annotations

from sparsa.ir.core import Block, Operation, Region, Value


def clone_op(op: Operation, mapping: dict[int, Value]) -> Operation:
    """A copy of `op` (and its regions) whose operands are remapped through `mapping` (by value id)."""
    operands = [mapping.get(id(v), v) for v in op.operands]
    regions = [clone_region(r, mapping) for r in op.regions]
    new = type(op)(operands, [r.type for r in op.results], dict(op.attributes), regions, op.loc)
    for old, fresh in zip(op.results, new.results, strict=True):
        fresh.name_hint = old.name_hint
        mapping[id(old)] = fresh
    return new


def clone_region(region: Region, mapping: dict[int, Value] | None = None) -> Region:
    """A copy of a region; values defined outside it are shared, values inside are fresh."""
    mapping = {} if mapping is None else mapping
    blocks = []
    for b in region.blocks:
        nb = Block([a.type for a in b.args], [a.name_hint for a in b.args])
        for old, fresh in zip(b.args, nb.args, strict=True):
            mapping[id(old)] = fresh
        for op in b.ops:
            nb.append(clone_op(op, mapping))
        blocks.append(nb)
    return Region(blocks)
