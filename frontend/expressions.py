"""Lowering of operators, comparisons, indexing and attributes (`x.T`)."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from sparsa.frontend import ast as A
from sparsa.frontend.values import DimRef, Lit, ModelRef, show_dim
from sparsa.ir import dialects as D
from sparsa.ir.core import Value
from sparsa.ir.dims import compatible, format_dim
from sparsa.ir.types import is_float, is_int, show_type

if TYPE_CHECKING:
    from sparsa.frontend.lower import Lowerer, Scope

_ARITH = {"+": D.tensor.AddOp, "-": D.tensor.SubOp, "*": D.tensor.MulOp, "/": D.tensor.DivOp,
          "//": D.tensor.FloorDivOp, "%": D.tensor.ModOp, "**": D.tensor.PowOp}
_PY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
       "%": operator.mod, "**": operator.pow}
_CMP = {"==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}
_PY_CMP = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
           ">=": operator.ge}


def _static(v: Any) -> Any:
    """A DimRef with a static size reads as an integer literal."""
    if isinstance(v, DimRef) and isinstance(v.dim, int):
        return Lit(v.dim)
    return v


def binop(lw: Lowerer, node: A.BinOp, scope: Scope) -> Any:
    if node.op in ("and", "or"):
        return logical(lw, node, scope)
    a, b = _static(lw.expr(node.lhs, scope)), _static(lw.expr(node.rhs, scope))
    if node.op == "@":
        return matmul(lw, node, a, b)
    if isinstance(a, Lit) and isinstance(b, Lit):
        if "bool" in (a.kind, b.kind):
            raise lw.error(node.pos, f"'{node.op}' does not apply to booleans")
        try:
            return Lit(_PY[node.op](a.value, b.value))
        except ZeroDivisionError:
            raise lw.error(node.pos, "division by zero") from None
    x, y = lw.unify_dtypes(a, b, node.pos)
    if x.type.dtype == "i1":
        raise lw.error(node.pos, f"'{node.op}' does not apply to booleans ({show_type(x.type)})")
    if node.op == "/" and not is_float(x.type.dtype):
        x, y = lw.cast(x, "f32", node.pos), lw.cast(y, "f32", node.pos)
    lw.check_broadcast(x.type, y.type, node.pos)
    return lw.emit(_ARITH[node.op], node.pos, x, y)


def matmul(lw: Lowerer, node: A.BinOp, a: Any, b: Any) -> Value:
    for v, side in ((a, node.lhs), (b, node.rhs)):
        if not isinstance(v, Value) or v.type.rank == 0:
            raise lw.error(side.pos, f"'@' needs tensors of rank >= 1, got {_describe(v)}")
    if a.type.dtype != b.type.dtype:
        if "i1" in (a.type.dtype, b.type.dtype):
            raise lw.error(node.pos, "'@' does not apply to booleans")
        a, b = lw.unify_dtypes(a, b, node.pos)
    ka = a.type.shape[-1]
    kb = b.type.shape[-2] if b.type.rank > 1 else b.type.shape[0]
    if not compatible(ka, kb):
        raise lw.error(node.pos, f"matmul of {show_type(a.type)} and {show_type(b.type)}: the inner dims "
                                 f"{show_dim(ka)} and {show_dim(kb)} differ")
    if b.type.layout is not None:
        return lw.emit(D.sparse.SparseMatmulOp, node.pos, a, b)
    if a.type.layout is not None:
        raise lw.error(node.lhs.pos, "a sparse weight must be the right operand of '@' (x @ w)")
    return lw.emit(D.tensor_shape.MatmulOp, node.pos, a, b)


def logical(lw: Lowerer, node: A.BinOp, scope: Scope) -> Any:
    a, b = lw.expr(node.lhs, scope), lw.expr(node.rhs, scope)
    for v, side in ((a, node.lhs), (b, node.rhs)):
        ok = (isinstance(v, Lit) and v.kind == "bool") or (isinstance(v, Value) and v.type.dtype == "i1")
        if not ok:
            raise lw.error(side.pos, f"'{node.op}' needs booleans, got {_describe(v)}")
    if isinstance(a, Lit) and isinstance(b, Lit):
        return Lit(a.value and b.value if node.op == "and" else a.value or b.value)
    x, y = lw.as_tensor(a, "i1", node.pos), lw.as_tensor(b, "i1", node.pos)
    lw.check_broadcast(x.type, y.type, node.pos)
    return lw.emit(D.tensor.AndOp if node.op == "and" else D.tensor.OrOp, node.pos, x, y)


def compare(lw: Lowerer, node: A.Compare, scope: Scope) -> Any:
    a, b = _static(lw.expr(node.lhs, scope)), _static(lw.expr(node.rhs, scope))
    if isinstance(a, Lit) and isinstance(b, Lit):
        return Lit(_PY_CMP[node.op](a.value, b.value))
    x, y = lw.unify_dtypes(a, b, node.pos)
    if x.type.dtype == "i1" and node.op not in ("==", "!="):
        raise lw.error(node.pos, f"booleans compare only with == or !=, not {node.op}")
    lw.check_broadcast(x.type, y.type, node.pos)
    return lw.emit(D.tensor.CmpOp, node.pos, x, y, pred=_CMP[node.op])


def unary(lw: Lowerer, node: A.Unary, scope: Scope) -> Any:
    v = _static(lw.expr(node.x, scope))
    if node.op == "not":
        if isinstance(v, Lit) and v.kind == "bool":
            return Lit(not v.value)
        if not isinstance(v, Value) or v.type.dtype != "i1":
            raise lw.error(node.pos, f"'not' needs a boolean, got {_describe(v)}")
        return lw.emit(D.tensor.NotOp, node.pos, v)
    if isinstance(v, Lit):
        if v.kind == "bool":
            raise lw.error(node.pos, f"unary '{node.op}' does not apply to booleans")
        return Lit(-v.value if node.op == "-" else v.value)
    if not isinstance(v, Value) or v.type.dtype == "i1":
        raise lw.error(node.pos, f"unary '{node.op}' needs a number or numeric tensor, got {_describe(v)}")
    return lw.emit(D.tensor.NegOp, node.pos, v) if node.op == "-" else v


def attribute(lw: Lowerer, node: A.Attribute, scope: Scope) -> Value:
    v = lw.expr(node.base, scope)
    if node.name != "T":
        raise lw.error(node.pos, f"unknown attribute '.{node.name}' (only .T, the transpose of the last two axes)")
    if not isinstance(v, Value) or v.type.rank < 2:
        raise lw.error(node.pos, f".T needs a tensor of rank >= 2, got {_describe(v)}")
    perm = list(range(v.type.rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return lw.emit(D.tensor_shape.TransposeOp, node.pos, v, perm=tuple(perm))


def index(lw: Lowerer, node: A.Index, scope: Scope) -> Any:
    base = lw.expr(node.base, scope)
    if isinstance(base, ModelRef):
        if len(node.items) != 1:
            raise lw.error(node.pos, f"an instance of model '{base.model.name}' takes one index")
        i = lw.int_value(node.items[0], scope)
        if i < 0:
            raise lw.error(node.items[0].pos, f"instance index must be >= 0, got {i}")
        return ModelRef(base.model, i)
    if not isinstance(base, Value):
        raise lw.error(node.base.pos, f"cannot index {_describe(base)}")
    items = list(node.items)
    # Leading integer tensors (and compile-time ints) gather; the rest is basic NumPy indexing.
    lead: list[Value] = []
    while items and not isinstance(items[0], A.Slice | A.EllipsisLit | A.NoneLit):
        v = _static(lw.expr(items[0], scope))
        if isinstance(v, Lit) and v.kind == "int":
            break
        if not isinstance(v, Value) or not is_int(v.type.dtype):
            raise lw.error(items[0].pos, f"an index must be an integer, a slice, None or '...', got {_describe(v)}")
        if v is lw.expert_arg:
            lw.expert_counts.append((base.type.shape[len(lead)], items[0].pos))
        lead.append(v)
        items.pop(0)
    if lead:
        if len(lead) > base.type.rank:
            raise lw.error(node.pos, f"too many indices for {show_type(base.type)}")
        base = lw.emit(D.tensor_shape.GatherOp, node.pos, base, lead)
    # The gather's leading axes come from the (broadcast) index tensors; basic indexing skips them.
    skip = max((v.type.rank for v in lead), default=0)
    return basic_index(lw, node, scope, base, items, skip) if items else base


def basic_index(lw: Lowerer, node: A.Index, scope: Scope, base: Value, items: list[A.Node], skip: int) -> Value:
    """Slices, integers, None and '...' over the axes after the first `skip`."""
    rank = base.type.rank
    n_real = sum(1 for i in items if not isinstance(i, A.NoneLit | A.EllipsisLit))
    if sum(1 for i in items if isinstance(i, A.EllipsisLit)) > 1:
        raise lw.error(node.pos, "at most one '...' in an index")
    if n_real > rank - skip:
        raise lw.error(node.pos, f"too many indices ({n_real}) for {show_type(base.type)}")
    expanded: list[A.Node | None] = []
    for it in items:
        if isinstance(it, A.EllipsisLit):
            expanded.extend([None] * (rank - skip - n_real))
        else:
            expanded.append(it)
    expanded.extend([None] * (rank - skip - sum(1 for i in expanded if not isinstance(i, A.NoneLit))))
    slices: list[tuple[int, Any, int]] = [(0, None, 1)] * skip
    squeeze: list[int] = []
    new_axes: list[int] = []
    axis, out_axis = skip, skip
    for it in expanded:
        if isinstance(it, A.NoneLit):
            new_axes.append(out_axis)
            out_axis += 1
            continue
        d = base.type.shape[axis]
        if it is None:
            slices.append((0, None, 1))
        elif isinstance(it, A.Slice):
            step = lw.int_value(it.step, scope) if it.step else 1
            if step == 0:
                raise lw.error(it.pos, "slice step cannot be zero")
            start = _slice_stop(lw, it.start, scope) if it.start else (0 if step > 0 else -1)
            if not isinstance(start, int) and step != 1:
                raise lw.error(it.start.pos, f"a slice starting at a size ({format_dim(start)}) takes step 1")
            stop = _slice_stop(lw, it.stop, scope) if it.stop else None
            if step < -1 and it.start is None and not isinstance(d, int):
                raise lw.error(it.pos, "a step below -1 over a symbolic dim needs an explicit start")
            slices.append((start, stop, step))
        else:
            i = lw.int_value(it, scope)
            if isinstance(d, int) and not -d <= i < d:
                raise lw.error(it.pos, f"index {i} is out of range for dim {axis} of size {d} in "
                                       f"{show_type(base.type)}")
            slices.append((i, i + 1 if i != -1 else None, 1))
            squeeze.append(axis)
            axis += 1
            continue
        axis += 1
        out_axis += 1
    v = base
    if any(s != (0, None, 1) for s in slices):
        starts, stops, steps = (tuple(col) for col in zip(*slices, strict=True))
        v = lw.emit(D.tensor_shape.SliceOp, node.pos, v, starts=starts, stops=stops, steps=steps)
    if squeeze:
        v = lw.emit(D.tensor_shape.SqueezeOp, node.pos, v, axes=tuple(squeeze))
    if new_axes:
        v = lw.emit(D.tensor_shape.ExpandDimsOp, node.pos, v, axes=tuple(new_axes))
    return v


def _slice_stop(lw: Lowerer, node: A.Node, scope: Scope) -> Any:
    v = lw.expr(node, scope)
    if isinstance(v, DimRef):
        return v.dim
    if isinstance(v, Lit) and v.kind == "int":
        return v.value
    raise lw.error(node.pos, "a slice bound must be an integer or a size")


def _describe(v: Any) -> str:
    from sparsa.frontend.lower import describe

    return show_type(v.type) if isinstance(v, Value) else describe(v)
