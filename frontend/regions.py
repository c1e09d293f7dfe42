"""The sparse constructs with regions: `moe` (expert bodies, row-wise check), `attention` (mask and
score functions lowered symbolically into regions), and `scan`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from sparsa.frontend import ast as A
from sparsa.frontend.builtins import REQUIRED, Args
from sparsa.frontend.values import FnRef, LambdaRef, Lit, show_dim
from sparsa.ir import dialects as D
from sparsa.ir.core import Block, Operation, Region, Value
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import TensorType, is_float, is_int, scalar, show_type

if TYPE_CHECKING:
    from sparsa.frontend.lower import Lowerer, Scope

INDEX = scalar("i64")


def in_region(lw: Lowerer, block: Block, fn: Any) -> Any:
    """Lower `fn()` with `block` as the insertion point."""
    saved = lw.block
    lw.block = block
    try:
        return fn()
    finally:
        lw.block = saved


# ---- moe ------------------------------------------------------------------------------------------------
def lower_moe(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    from sparsa.frontend.lower import Scope

    a = Args(lw, node, "moe", [("x", REQUIRED), ("idx", REQUIRED), ("gates", REQUIRED), ("capacity", None),
                               ("num_experts", None)], scope)
    x, idx, gates = a.tensor("x"), a.tensor("idx"), a.tensor("gates")
    if x.type.rank != 2 or not is_float(x.type.dtype):
        raise lw.error(a.pos("x"), f"moe(): x must be float tokens [T, D], got {show_type(x.type)}")
    if idx.type.rank != 2 or not is_int(idx.type.dtype):
        raise lw.error(a.pos("idx"), f"moe(): idx must be integer expert ids [T, K], got {show_type(idx.type)}")
    if gates.type.rank != 2 or not is_float(gates.type.dtype):
        raise lw.error(a.pos("gates"), f"moe(): gates must be float weights [T, K], got {show_type(gates.type)}")
    if idx.type.shape != gates.type.shape and None not in idx.type.shape + gates.type.shape:
        raise lw.error(node.pos, f"moe(): idx {show_type(idx.type)} and gates {show_type(gates.type)} must have "
                                 f"the same shape [T, K]")
    if idx.type.shape[0] != x.type.shape[0]:
        raise lw.error(node.pos, f"moe(): x {show_type(x.type)} and idx {show_type(idx.type)} disagree on the "
                                 f"number of tokens ({show_dim(x.type.shape[0])} vs {show_dim(idx.type.shape[0])})")
    capacity = a.number("capacity") if a.given("capacity") else None
    if capacity is not None and capacity <= 0:
        raise lw.error(a.pos("capacity"), f"moe(): capacity must be positive, got {capacity}")
    lam = node.block
    if lam is None or len(lam.params) != 2:
        raise lw.error(node.pos, "moe() needs an expert body: moe(x, idx, gates) |e, h| { ... }")
    block = Block([INDEX, TensorType(x.type.dtype, (None, x.type.shape[1]))], lam.params)
    inner = Scope(scope)
    inner.names[lam.params[0]], inner.names[lam.params[1]] = block.args
    saved = (lw.expert_arg, lw.expert_counts)
    lw.expert_arg, lw.expert_counts = block.args[0], []
    try:
        result = in_region(lw, block, lambda: lambda_value(lw, lam, inner))
        counts = lw.expert_counts
    finally:
        lw.expert_arg, lw.expert_counts = saved
    if not isinstance(result, Value):
        raise lw.error(lam.pos, f"the expert body must give a tensor of rows, got {_describe(lw, result)}")
    num = a.int("num_experts") if a.given("num_experts") else _num_experts(lw, counts, lam)
    check_row_wise(lw, block, result, lam)
    block.append(D.func.YieldOp.build([result], loc=result.defining_op.loc if result.defining_op else None))
    return lw.emit(D.moe.MoeOp, node.pos, x, idx, gates, regions=[Region([block])], num_experts=num,
                   capacity=capacity)


def _num_experts(lw: Lowerer, counts: list[tuple[Any, A.Pos]], lam: A.Lambda) -> int:
    sizes = {d for d, _ in counts}
    if not sizes:
        raise lw.error(lam.pos, f"cannot tell the number of experts: index a weight by '{lam.params[0]}' "
                                f"(w[{lam.params[0]}]) or pass num_experts=")
    if len(sizes) > 1 or not isinstance(next(iter(sizes)), int):
        shown = ", ".join(show_dim(d) for d in sizes)
        raise lw.error(counts[-1][1], f"weights indexed by the expert number disagree on the number of experts "
                                      f"({shown})")
    return next(iter(sizes))


def lambda_value(lw: Lowerer, lam: A.Lambda, scope: Scope) -> Any:
    """Lower a lambda's body: an expression, or a block of assignments ending in an expression."""
    if not isinstance(lam.body, A.Block):
        return lw.expr(lam.body, scope)
    stmts = lam.body.stmts
    if not stmts or not isinstance(stmts[-1], A.ExprStmt | A.Return):
        raise lw.error(lam.pos, "the block must end with the expression it gives")
    for s in stmts[:-1]:
        if not isinstance(s, A.Assign):
            raise lw.error(s.pos, "only assignments may come before the final expression of a block")
        value = lw.assign_value(s, scope)
        for i, name in enumerate(s.targets):
            scope.names[name] = value[i] if len(s.targets) > 1 else value
    last = stmts[-1]
    if isinstance(last, A.Return):
        if len(last.values) != 1:
            raise lw.error(last.pos, "a block gives one value")
        return lw.expr(last.values[0], scope)
    return lw.expr(last.value, scope)


def check_row_wise(lw: Lowerer, block: Block, result: Value, lam: A.Lambda) -> None:
    """The expert body must treat rows (tokens) independently: no op may mix or reorder them."""
    rows = {id(block.args[1])}
    for op in block.ops:
        touched = [v for v in op.operands if id(v) in rows]
        if not touched:
            continue
        why = _row_violation(op, rows)
        if why:
            raise lw.error(_pos(op, lam), f"the expert body must be row-wise (each token on its own): {why}")
        rows.update(id(r) for r in op.results)
    if id(result) not in rows or result.type.rank != 2:
        raise lw.error(_pos(result.defining_op, lam), f"the expert body must give one row per token "
                                                      f"([rows, D_out]) computed from '{lam.params[1]}', got "
                                                      f"{show_type(result.type)}")


def _pos(op: Operation | None, lam: A.Lambda) -> A.Pos:
    if op is None or op.loc is None:
        return lam.pos
    return A.Pos(op.loc.line, op.loc.col)


def _row_violation(op: Operation, rows: set[int]) -> str | None:
    TS, TR = D.tensor_shape, D.tensor_reduce
    name = op.NAME.split(".")[-1]
    first = next(v for v in op.operands if id(v) in rows)
    if isinstance(op, Elementwise):
        out = op.results[0].type
        if out.rank != first.type.rank or out.shape[0] != first.type.shape[0]:
            return f"{name} broadcasts the rows into {show_type(out)}"
        return None
    if isinstance(op, TS.MatmulOp | D.sparse.SparseMatmulOp):
        if id(op.operands[0]) in rows and id(op.operands[1]) not in rows and op.operands[0].type.rank == 2 \
                and op.operands[1].type.rank == 2:
            return None
        return "a matmul must be rows @ weight, with the rows on the left"
    if isinstance(op, TR.ReduceOp):
        axes = {a % first.type.rank for a in op.axes}
        return f"{name} over axis 0 sums across tokens" if 0 in axes else None
    if isinstance(op, TR.ArgmaxOp | TR.AxisFloatOp | TR.CumsumOp):
        return f"{name} along axis 0 mixes tokens" if op.axis % first.type.rank == 0 else None
    if isinstance(op, TR.TopkOp | TR.LayerNormOp | TR.RmsNormOp):
        return f"{name} over the last axis of a 1-D row tensor mixes tokens" if first.type.rank < 2 else None
    if isinstance(op, TS.TransposeOp):
        return "transpose moves the token axis" if op.perm[0] != 0 else None
    if isinstance(op, TS.SliceOp):
        return "slicing the token axis drops tokens" if (op.starts[0], op.stops[0], op.steps[0]) != (0, None, 1) \
            else None
    if isinstance(op, TS.ExpandDimsOp | TS.SqueezeOp):
        return f"{name} moves the token axis" if 0 in {a % op.results[0].type.rank for a in op.axes} else None
    if isinstance(op, TS.ConcatOp | TS.SplitOp):
        ok = op.axis % first.type.rank != 0 and all(id(v) in rows for v in op.operands)
        return None if ok else f"{name} along the token axis (or with non-row tensors) mixes tokens"
    return f"{name} is not allowed on the rows of an expert"


# ---- attention --------------------------------------------------------------------------------------------
def lower_attention(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "attention", [("q", REQUIRED), ("k", REQUIRED), ("v", REQUIRED), ("mask", None),
                                     ("score", None), ("scale", None)], scope)
    q, k, v = a.tensor("q"), a.tensor("k"), a.tensor("v")
    for t, p in ((q, "q"), (k, "k"), (v, "v")):
        if t.type.rank != 4 or not is_float(t.type.dtype):
            raise lw.error(a.pos(p), f"attention(): {p} must be float [B, H, S, Dh], got {show_type(t.type)}")
    if not q.type.dtype == k.type.dtype == v.type.dtype:
        raise lw.error(node.pos, "attention(): q, k and v must have one element type")
    hq, hkv = q.type.shape[1], k.type.shape[1]
    if isinstance(hq, int) and isinstance(hkv, int) and hq % hkv:
        raise lw.error(node.pos, f"attention(): {hq} query heads are not a multiple of {hkv} key/value heads")
    if q.type.shape[3] != k.type.shape[3]:
        raise lw.error(node.pos, f"attention(): q {show_type(q.type)} and k {show_type(k.type)} differ in head dim")
    if a.given("scale"):
        scale = a.number("scale")
    elif isinstance(q.type.shape[3], int):
        scale = 1.0 / math.sqrt(q.type.shape[3])
    else:  # a symbolic head dim: 1/sqrt(Dh) at run time
        q, scale = D.attn.scale_by_head_dim(q, lambda cls, *ops, **kw: lw.emit(cls, node.pos, *ops, **kw)), 1.0
    mask = function_region(lw, a, "mask", scope, q.type.dtype) if a.given("mask") else Region()
    score = function_region(lw, a, "score", scope, q.type.dtype) if a.given("score") else Region()
    return lw.emit(D.attn.AttentionOp, node.pos, q, k, v, regions=[mask, score], scale=scale)


def fn_with_data(lw: Lowerer, node: A.Call, ref: FnRef, scope: Scope) -> FnRef:
    """`doc_causal(doc=ids)` outside a mask: the function with its data bound, for `mask=`."""
    fn = ref.fn
    if any(a.name is None for a in node.args):
        raise lw.error(node.pos, f"{fn.kind} '{fn.name}' is used by attention(); bind its data by name: "
                                 f"{fn.name}({', '.join(f'{d.name}=...' for d in fn.data) or ''})")
    given = {a.name: a for a in node.args}
    data = []
    for d in fn.data:
        if d.name not in given:
            raise lw.error(node.pos, f"{fn.kind} '{fn.name}' needs its data '{d.name}'")
        data.append((d.name, lw.tensor(given.pop(d.name).value, scope)))
    if given:
        extra = next(iter(given))
        raise lw.error(given[extra].pos, f"{fn.kind} '{fn.name}' has no data '{extra}'")
    return FnRef(fn, tuple(data))


def function_region(lw: Lowerer, a: Args, kind: str, scope: Scope, dtype: str) -> Region:
    """Lower `mask=` or `score=` into a region over index scalars (b, h, q, k), keeping the arithmetic symbolic."""
    value = a.value(kind)
    nidx = 4
    arg_types = ([scalar(dtype)] if kind == "score" else []) + [INDEX] * nidx
    block = Block(arg_types, (["s"] if kind == "score" else []) + ["b", "h", "q", "k"])
    if isinstance(value, FnRef):
        if value.fn.kind != kind:
            raise lw.error(a.pos(kind), f"attention(): {kind}= needs a {kind} function, got {value.fn.kind} "
                                        f"'{value.fn.name}'")
        if value.fn.data and not value.data:
            raise lw.error(a.pos(kind), f"{kind} '{value.fn.name}' needs its data: "
                                        f"{value.fn.name}({', '.join(d.name + '=...' for d in value.fn.data)})")
        result = in_region(lw, block, lambda: apply_function(lw, value, block.args, a.pos(kind)))
    elif isinstance(value, LambdaRef):
        result = in_region(lw, block, lambda: apply_lambda(lw, value.node, block.args, scope, kind))
    else:
        raise lw.error(a.pos(kind), f"attention(): {kind}= takes a {kind} name, {kind}(data=...) or |q, k| ...")
    result = finish_function(lw, block, result, kind, dtype, a.pos(kind))
    block.append(D.func.YieldOp.build([result]))
    return Region([block])


def finish_function(lw: Lowerer, block: Block, result: Any, kind: str, dtype: str, pos: A.Pos) -> Value:
    """Check the function's value (mask: boolean; score: float) and make it a scalar of the right type."""
    def make() -> Value:
        if kind == "mask":
            ok = (isinstance(result, Lit) and result.kind == "bool") or (
                isinstance(result, Value) and result.type.dtype == "i1")
            if not ok:
                raise lw.error(pos, f"a mask must be boolean, got {_describe(lw, result)}")
            return lw.as_tensor(result, "i1", pos)
        ok = (isinstance(result, Lit) and result.kind != "bool") or (
            isinstance(result, Value) and is_float(result.type.dtype))
        if not ok:
            raise lw.error(pos, f"a score must be a float expression, got {_describe(lw, result)}")
        return lw.cast(lw.as_tensor(result, dtype, pos), dtype, pos)

    value = in_region(lw, block, make)
    if value.type.rank != 0:
        raise lw.error(pos, f"a {kind} gives one value per (q, k) pair, got {show_type(value.type)}")
    return value


def _bind_indices(lw: Lowerer, params: list[str], values: list[Any], kind: str, name: str, pos: A.Pos,
                  scope: Scope) -> None:
    """Bind (q, k) or (b, h, q, k) parameters (after a score's `s`) to index values."""
    offset = 1 if kind == "score" else 0
    idx = params[offset:]
    if len(idx) not in (2, 4):
        what = "(s, q, k) or (s, b, h, q, k)" if kind == "score" else "(q, k) or (b, h, q, k)"
        raise lw.error(pos, f"{kind} '{name}' must take {what}")
    if offset:
        scope.names[params[0]] = values[0]
    chosen = values[offset:] if len(idx) == 4 else values[offset + 2:]
    for p, v in zip(idx, chosen, strict=True):
        scope.names[p] = v


def apply_function(lw: Lowerer, ref: FnRef, values: list[Any], pos: A.Pos) -> Any:
    """Inline a named mask/score applied to index values (b, h, q, k) (with `s` first for a score)."""
    from sparsa.frontend.lower import Scope

    fn = ref.fn
    scope = Scope(lw.globals)
    _bind_indices(lw, fn.params, values, fn.kind, fn.name, fn.pos, scope)
    for name, tensor in ref.data:
        scope.names[name] = tensor
    return lw.expr(fn.body, scope)


def apply_lambda(lw: Lowerer, lam: A.Lambda, values: list[Any], outer: Scope, kind: str) -> Any:
    from sparsa.frontend.lower import Scope

    scope = Scope(outer)
    _bind_indices(lw, lam.params, values, kind, "|...|", lam.pos, scope)
    return lambda_value(lw, lam, scope)


def mask_call(lw: Lowerer, node: A.Call, ref: FnRef, scope: Scope) -> Any:
    """`causal(q, k)` inside another mask: inline it on the given index expressions."""
    fn = ref.fn
    positional = [a for a in node.args if a.name is None]
    n_index = len(fn.params) - (1 if fn.kind == "score" else 0)
    if len(positional) != len(fn.params):
        raise lw.error(node.pos, f"{fn.kind} '{fn.name}' takes {len(fn.params)} index arguments, got "
                                 f"{len(positional)}")
    values = [lw.expr(a.value, scope) for a in positional]
    if n_index == 2:
        values = ([values[0]] if fn.kind == "score" else []) + [None, None] + values[-2:]
    given = {a.name: lw.tensor(a.value, scope) for a in node.args if a.name is not None}
    data = []
    for d in fn.data:
        if d.name in given:
            data.append((d.name, given.pop(d.name)))
        elif scope.lookup(d.name) is not None:
            data.append((d.name, scope.lookup(d.name)))
        else:
            raise lw.error(node.pos, f"{fn.kind} '{fn.name}' needs its data '{d.name}'")
    return apply_function(lw, FnRef(fn, tuple(data)), values, node.pos)


def check_functions(lw: Lowerer) -> None:
    """Check every mask and score definition on its own (so an unused one still gets its errors)."""
    from sparsa.frontend.lower import Scope

    for ref in [v for v in lw.globals.names.values() if isinstance(v, FnRef)]:
        fn = ref.fn
        block = Block(([scalar("f32")] if fn.kind == "score" else []) + [INDEX] * 4)

        def run(fn: A.MaskDef = fn, block: Block = block) -> None:
            data = []
            for d in fn.data:
                t = lw.type_of(d.type, Scope(lw.globals), {}, bind=True)
                data.append((d.name, Block([t]).args[0]))
            result = in_region(lw, block, lambda: apply_function(lw, FnRef(fn, tuple(data)), block.args, fn.pos))
            finish_function(lw, block, result, fn.kind, "f32", fn.body.pos)

        lw.guarded(run)


# ---- scan ---------------------------------------------------------------------------------------------------
def lower_scan(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "scan", [("a", REQUIRED), ("b", REQUIRED), ("axis", REQUIRED), ("h0", None)], scope)
    x, y = lw.unify_dtypes(a.value("a"), a.value("b"), node.pos)
    if not is_float(x.type.dtype):
        x, y = lw.cast(x, "f32", node.pos), lw.cast(y, "f32", node.pos)
    lw.check_broadcast(x.type, y.type, node.pos)
    axis = a.int("axis")
    rank = max(x.type.rank, y.type.rank)
    if not -rank <= axis < rank:
        raise lw.error(a.pos("axis"), f"scan(): axis {axis} is out of range for rank {rank}")
    h0 = lw.cast(a.tensor("h0"), x.type.dtype, a.pos("h0")) if a.given("h0") else None
    return lw.emit(D.scan.ScanOp, node.pos, x, y, h0, axis=axis)


def _describe(lw: Lowerer, v: Any) -> str:
    from sparsa.frontend.lower import describe

    return show_type(v.type) if isinstance(v, Value) else describe(v)

