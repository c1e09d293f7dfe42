"""The IR verifier: structure, SSA dominance, terminators, inferred types and each op's own verify()."""

from __future__ import annotations

from sparsa.ir.core import Module, Operation, Value
from sparsa.ir.diagnostics import SparsaError, VerifyError
from sparsa.ir.dims import compatible
from sparsa.ir.types import TensorType


def types_compatible(a: TensorType, b: TensorType) -> bool:
    """Same element type, rank and layout, and dims that may be equal (`?` matches anything)."""
    return (a.dtype == b.dtype and a.rank == b.rank and a.layout == b.layout
            and all(compatible(x, y) for x, y in zip(a.shape, b.shape, strict=True)))


def verify_module(module: Module) -> None:
    """Raise VerifyError (with the op's location) for the first invariant the module breaks."""
    names = set()
    for f in module.funcs:
        if f.NAME != "func.func":
            raise f.error("only 'func.func' may appear at module level")
        if f.attributes.get("sym_name") in names:
            raise f.error(f"redefines function @{f.attributes['sym_name']}")
        names.add(f.attributes.get("sym_name"))
        verify_op(f, [set()])


def verify_op(op: Operation, visible: list[set[int]]) -> None:
    """Verify `op` and its regions; `visible` holds the ids of values defined in enclosing scopes."""
    _check_fields(op)
    for v in op.operands:
        if not any(id(v) in scope for scope in visible):
            raise op.error(f"uses a value that does not dominate it ({_describe(v)})")
    for region, field in zip(op.regions, type(op).region_fields, strict=True):
        if region.empty:
            if not field.optional:
                raise op.error(f"region '{field.name}' must not be empty")
            continue
        if len(region.blocks) != 1:
            raise op.error(f"region '{field.name}' must have exactly one block")
        block = region.block
        scope = {id(a) for a in block.args}
        inside = [scope] if op.ISOLATED else [*visible, scope]  # an isolated region sees only its own values
        for i, inner in enumerate(block.ops):
            if inner.TERMINATOR and i != len(block.ops) - 1:
                raise inner.error("is a terminator and must be the last op of its block")
            verify_op(inner, inside)
            scope.update(id(r) for r in inner.results)
        last = block.terminator
        if op.NAME != "func.func" and (last is None or last.NAME != "func.yield"):
            raise op.error(f"region '{field.name}' must end in 'func.yield'")
    try:
        inferred = op.infer()
    except SparsaError:
        raise
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise op.error(str(e)) from None
    if len(inferred) != len(op.results):
        raise op.error(f"has {len(op.results)} results but its operands give {len(inferred)}")
    for r, t in zip(op.results, inferred, strict=True):
        if not types_compatible(r.type, t):
            raise op.error(f"result type {r.type} does not match the inferred type {t}")
    op.verify()


def _check_fields(op: Operation) -> None:
    cls = type(op)
    fixed = sum(1 for f in cls.operand_fields if not (f.variadic or f.optional))
    grouped = [f for f in cls.operand_fields if f.variadic or f.optional]
    n = len(op.operands)
    if n < fixed or (not grouped and n != fixed) or (grouped and grouped[0].optional and n > fixed + 1):
        if not grouped:
            want = f"{fixed}"
        else:
            want = f"{fixed} or {fixed + 1}" if grouped[0].optional else f"at least {fixed}"
        raise op.error(f"expects {want} operands, got {n}")
    if len(op.regions) != len(cls.region_fields):
        raise op.error(f"expects {len(cls.region_fields)} regions, got {len(op.regions)}")
    variadic_results = any(f.variadic for f in cls.result_fields)
    if not variadic_results and len(op.results) != len(cls.result_fields):
        raise op.error(f"expects {len(cls.result_fields)} results, got {len(op.results)}")
    for name in op.attributes:
        if cls.attr_field(name) is None:
            raise op.error(f"has unknown attribute '{name}'")
    for f in cls.attr_fields:
        if f.required and f.name not in op.attributes:
            raise op.error(f"needs attribute '{f.name}'")
        if f.name in op.attributes and op.attributes[f.name] is not None:
            try:
                f.kind.coerce(op.attributes[f.name])
            except ValueError as e:
                raise op.error(f"attribute '{f.name}': {e}") from None


def _describe(v: Value) -> str:
    owner = v.defining_op
    return f"result {v.index} of '{owner.NAME}'" if owner else f"block argument {v.index}"


__all__ = ["VerifyError", "types_compatible", "verify_module", "verify_op"]
