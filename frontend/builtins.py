"""Calls: models (inlined, weights under dotted names), masks, and the language's builtin functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sparsa.frontend import ast as A
from sparsa.frontend.values import DimRef, FnRef, Lit, ModelRef, show_dim
from sparsa.ir import dialects as D
from sparsa.ir.core import OP_REGISTRY, Value
from sparsa.ir.dims import Dim
from sparsa.ir.types import LANGUAGE_DTYPES, TensorType, is_float, show_type

if TYPE_CHECKING:
    from sparsa.frontend.lower import Lowerer, Scope

REQUIRED = object()


class Args:
    """A call's arguments bound to a builtin's parameter names (positional or keyword)."""

    def __init__(self, lw: Lowerer, node: A.Call, name: str, params: list[tuple[str, Any]], scope: Scope):
        self.lw, self.node, self.name, self.scope = lw, node, name, scope
        self.nodes: dict[str, A.Node] = {}
        names = [p for p, _ in params]
        positional = [a for a in node.args if a.name is None]
        if any(a.name is None for a in node.args[len(positional):]):
            raise lw.error(node.pos, "positional arguments must come before keyword arguments")
        if len(positional) > len(params):
            raise lw.error(positional[len(params)].pos, f"{name}() takes at most {len(params)} arguments "
                                                        f"({', '.join(names)}), got {len(positional)}")
        for a, p in zip(positional, names, strict=False):
            self.nodes[p] = a.value
        for a in node.args[len(positional):]:
            if a.name not in names:
                raise lw.error(a.pos, f"{name}() has no argument '{a.name}' (it takes: {', '.join(names)})")
            if a.name in self.nodes:
                raise lw.error(a.pos, f"{name}() got argument '{a.name}' twice")
            self.nodes[a.name] = a.value
        self.defaults = dict(params)
        for p, default in params:
            if default is REQUIRED and p not in self.nodes:
                raise lw.error(node.pos, f"{name}() needs argument '{p}'")

    def given(self, p: str) -> bool:
        return p in self.nodes and not isinstance(self.nodes[p], A.NoneLit)

    def pos(self, p: str) -> A.Pos:
        return self.nodes[p].pos if p in self.nodes else self.node.pos

    def value(self, p: str) -> Any:
        return self.lw.expr(self.nodes[p], self.scope) if p in self.nodes else Lit(self.defaults[p])

    def tensor(self, p: str) -> Value:
        v = self.value(p)
        if isinstance(v, Lit | DimRef):
            return self.lw.as_tensor(v, None, self.pos(p))
        if not isinstance(v, Value):
            raise self.lw.error(self.pos(p), f"{self.name}(): '{p}' must be a tensor")
        return v

    def float_tensor(self, p: str) -> Value:
        v = self.tensor(p)
        if v.type.dtype == "i1":
            raise self.lw.error(self.pos(p), f"{self.name}() needs a numeric tensor, got {show_type(v.type)}")
        return v if is_float(v.type.dtype) else self.lw.cast(v, "f32", self.pos(p))

    def int(self, p: str) -> int:
        if p not in self.nodes:
            return self.defaults[p]
        return self.lw.int_value(self.nodes[p], self.scope)

    def number(self, p: str) -> float:
        v = self.value(p)
        if not isinstance(v, Lit) or v.kind == "bool":
            raise self.lw.error(self.pos(p), f"{self.name}(): '{p}' must be a number known at compile time")
        return float(v.value)

    def bool(self, p: str) -> bool:
        v = self.value(p)
        if not isinstance(v, Lit) or v.kind != "bool":
            raise self.lw.error(self.pos(p), f"{self.name}(): '{p}' must be true or false")
        return v.value

    def ints(self, p: str) -> list[int]:
        node = self.nodes.get(p)
        if node is None:
            d = self.defaults[p]
            return list(d) if isinstance(d, tuple | list) else [d]
        if isinstance(node, A.ListLit):
            return [self.lw.int_value(i, self.scope) for i in node.items]
        return [self.lw.int_value(node, self.scope)]

    def dims(self, p: str) -> list[Dim]:
        node = self.nodes[p]
        if not isinstance(node, A.ListLit):
            raise self.lw.error(node.pos, f"{self.name}(): '{p}' must be a list like [B, S, 64]")
        return [_dim_value(self.lw, i, self.scope) for i in node.items]

    def dtype(self, p: str) -> str:
        node = self.nodes.get(p)
        if node is None:
            return self.defaults[p]
        if not isinstance(node, A.Name) or node.id not in LANGUAGE_DTYPES:
            raise self.lw.error(node.pos, f"{self.name}(): '{p}' must be an element type "
                                          f"({', '.join(LANGUAGE_DTYPES)})")
        return LANGUAGE_DTYPES[node.id]


def _dim_value(lw: Lowerer, node: A.Node, scope: Scope) -> Dim:
    v = lw.expr(node, scope) if not isinstance(node, A.BinOp) else None
    if isinstance(v, DimRef):
        return v.dim
    if isinstance(v, Lit) and v.kind == "int":
        return v.value
    if isinstance(v, Value):
        raise lw.error(node.pos, "a shape entry must be known at compile time (an integer, a const or a size)")
    return lw.dim(node, scope, {})


def call(lw: Lowerer, node: A.Call, scope: Scope) -> Any:
    from sparsa.frontend import regions

    callee = lw.expr(node.func, scope) if not (isinstance(node.func, A.Name) and node.func.id in BUILTINS
                                               and scope.lookup(node.func.id) is None) else None
    if callee is None:
        name = node.func.id
        if node.block is not None and name != "moe":
            raise lw.error(node.block.pos, f"{name}() does not take a |...| {{ }} block")
        return BUILTINS[name](lw, node, scope)
    if isinstance(callee, ModelRef):
        return call_model(lw, node, callee, scope)
    if isinstance(callee, FnRef):
        if any(a.name is None for a in node.args):
            return regions.mask_call(lw, node, callee, scope)
        return regions.fn_with_data(lw, node, callee, scope)
    raise lw.error(node.func.pos, f"cannot call {_what(lw, callee)}")


def call_model(lw: Lowerer, node: A.Call, ref: ModelRef, scope: Scope) -> Any:
    if any(a.name is not None for a in node.args):
        raise lw.error(node.pos, f"model '{ref.model.name}' takes its inputs by position")
    args = [lw.tensor(a.value, scope, f"a tensor input for model '{ref.model.name}'") for a in node.args]
    prefix = lw.current_prefix() + f"{ref.model.name}.{ref.index}."
    results = lw.inline_model(ref.model, prefix, args, node.pos)
    if not isinstance(results, list):
        from sparsa.frontend.values import Poisoned

        raise Poisoned()
    return results[0] if len(results) == 1 else tuple(results)


def _what(lw: Lowerer, v: Any) -> str:
    from sparsa.frontend.lower import describe

    return show_type(v.type) if isinstance(v, Value) else describe(v)


# ---- builtin functions ----------------------------------------------------------------------------------
def _unary(cls: type, float_only: bool) -> Callable:
    def lower(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
        a = Args(lw, node, node.func.id, [("x", REQUIRED)], scope)
        x = a.float_tensor("x") if float_only else a.tensor("x")
        if x.type.dtype == "i1":
            raise lw.error(a.pos("x"), f"{node.func.id}() needs a numeric tensor, got {show_type(x.type)}")
        return lw.emit(cls, node.pos, x)
    return lower


def _reduction(cls: type, name: str) -> Callable:
    def lower(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
        a = Args(lw, node, name, [("x", REQUIRED), ("axis", -1), ("keepdim", False)], scope)
        x = a.float_tensor("x") if name in ("mean", "logsumexp") else a.tensor("x")
        axes = a.ints("axis")
        _check_axes(lw, a, x, axes)
        return lw.emit(cls, node.pos, x, axes=tuple(axes), keepdim=a.bool("keepdim"))
    return lower


def _check_axes(lw: Lowerer, a: Args, x: Value, axes: list[int]) -> None:
    for ax in axes:
        if not -x.type.rank <= ax < x.type.rank:
            raise lw.error(a.pos("axis"), f"{a.name}(): axis {ax} is out of range for {show_type(x.type)}")


def _min_max(reduce_cls: type, elementwise_cls: type, name: str) -> Callable:
    def lower(lw: Lowerer, node: A.Call, scope: Scope) -> Any:
        positional = [a for a in node.args if a.name is None]
        if len(positional) == 2:
            a = Args(lw, node, name, [("a", REQUIRED), ("b", REQUIRED)], scope)
            x, y = a.value("a"), a.value("b")
            if isinstance(x, Lit) and isinstance(y, Lit):
                return Lit(max(x.value, y.value) if name == "max" else min(x.value, y.value))
            x, y = lw.unify_dtypes(x, y, node.pos)
            lw.check_broadcast(x.type, y.type, node.pos)
            return lw.emit(elementwise_cls, node.pos, x, y)
        return _reduction(reduce_cls, name)(lw, node, scope)
    return lower


def b_argmax(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "argmax", [("x", REQUIRED), ("axis", -1), ("keepdim", False)], scope)
    x = a.tensor("x")
    axis = a.int("axis")
    _check_axes(lw, a, x, [axis])
    return lw.emit(D.tensor_reduce.ArgmaxOp, node.pos, x, axis=axis, keepdim=a.bool("keepdim"))


def _along_axis(cls: type, name: str) -> Callable:
    def lower(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
        a = Args(lw, node, name, [("x", REQUIRED), ("axis", -1)], scope)
        x = a.float_tensor("x") if name == "softmax" else a.tensor("x")
        axis = a.int("axis")
        _check_axes(lw, a, x, [axis])
        return lw.emit(cls, node.pos, x, axis=axis)
    return lower


def b_layernorm(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "layernorm", [("x", REQUIRED), ("w", REQUIRED), ("b", REQUIRED), ("eps", 1e-5)], scope)
    x, w, b = a.float_tensor("x"), a.float_tensor("w"), a.float_tensor("b")
    _check_norm_weight(lw, a, x, w, "w")
    _check_norm_weight(lw, a, x, b, "b")
    return lw.emit(D.tensor_reduce.LayerNormOp, node.pos, x, w, b, eps=a.number("eps"))


def b_rmsnorm(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "rmsnorm", [("x", REQUIRED), ("w", REQUIRED), ("eps", 1e-6)], scope)
    x, w = a.float_tensor("x"), a.float_tensor("w")
    _check_norm_weight(lw, a, x, w, "w")
    return lw.emit(D.tensor_reduce.RmsNormOp, node.pos, x, w, eps=a.number("eps"))


def _check_norm_weight(lw: Lowerer, a: Args, x: Value, w: Value, p: str) -> None:
    if x.type.rank == 0 or w.type.rank != 1 or w.type.shape[0] != x.type.shape[-1] or w.type.dtype != x.type.dtype:
        last = show_dim(x.type.shape[-1]) if x.type.rank else "?"
        raise lw.error(a.pos(p), f"{a.name}(): '{p}' must be {x.type.dtype}[{last}] (the last dim of "
                                 f"{show_type(x.type)}), got {show_type(w.type)}")


def b_topk(lw: Lowerer, node: A.Call, scope: Scope) -> tuple[Value, Value]:
    a = Args(lw, node, "topk", [("x", REQUIRED), ("k", REQUIRED)], scope)
    x, k = a.tensor("x"), a.int("k")
    if x.type.rank == 0 or x.type.dtype == "i1":
        raise lw.error(a.pos("x"), f"topk() needs a numeric tensor of rank >= 1, got {show_type(x.type)}")
    last = x.type.shape[-1]
    if k < 1 or (isinstance(last, int) and k > last):
        raise lw.error(a.pos("k"), f"topk(): k = {k} is out of range; expected 1 <= k <= {show_dim(last)} "
                                   f"(the last dim of {show_type(x.type)})")
    return lw.emit(D.tensor_reduce.TopkOp, node.pos, x, k=k)


def b_where(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "where", [("cond", REQUIRED), ("a", REQUIRED), ("b", REQUIRED)], scope)
    c = a.value("cond")
    if not (isinstance(c, Value) and c.type.dtype == "i1"):
        raise lw.error(a.pos("cond"), f"where(): the condition must be a boolean tensor, got {_what(lw, c)}")
    x, y = a.value("a"), a.value("b")
    if isinstance(x, Lit) and isinstance(y, Lit):  # where(c, 0.0, -inf): the literals' common type
        kinds = {x.kind, y.kind}
        dtype = "i1" if kinds == {"bool"} else "f32" if "float" in kinds else "i64"
        x = lw.as_tensor(x, dtype, a.pos("a"))
    x, y = lw.unify_dtypes(x, y, node.pos)
    lw.check_broadcast(c.type, x.type, node.pos)
    lw.check_broadcast(c.type, y.type, node.pos)
    lw.check_broadcast(x.type, y.type, node.pos)
    return lw.emit(D.tensor.WhereOp, node.pos, c, x, y)


def b_transpose(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "transpose", [("x", REQUIRED), ("perm", REQUIRED)], scope)
    x, perm = a.tensor("x"), a.ints("perm")
    if sorted(p % max(x.type.rank, 1) for p in perm) != list(range(x.type.rank)):
        raise lw.error(a.pos("perm"), f"transpose(): {perm} is not a permutation of the {x.type.rank} axes of "
                                      f"{show_type(x.type)}")
    return lw.emit(D.tensor_shape.TransposeOp, node.pos, x, perm=tuple(p % x.type.rank for p in perm))


def b_reshape(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "reshape", [("x", REQUIRED), ("shape", REQUIRED)], scope)
    x, shape = a.tensor("x"), a.dims("shape")
    if shape.count(-1) > 1:
        raise lw.error(a.pos("shape"), "reshape(): at most one -1 in the shape")
    return lw.emit(D.tensor_shape.ReshapeOp, node.pos, x, shape=tuple(shape))


def b_concat(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "concat", [("xs", REQUIRED), ("axis", 0)], scope)
    items = a.nodes["xs"]
    if not isinstance(items, A.ListLit) or not items.items:
        raise lw.error(a.pos("xs"), "concat() takes a non-empty list of tensors: concat([a, b], axis=-1)")
    xs = [lw.tensor(i, scope) for i in items.items]
    dtypes = {x.type.dtype for x in xs}
    if len(dtypes) > 1:
        raise lw.error(a.pos("xs"), f"concat(): tensors of different element types {', '.join(sorted(dtypes))}")
    return lw.emit(D.tensor_shape.ConcatOp, node.pos, xs, axis=a.int("axis"))


def b_split(lw: Lowerer, node: A.Call, scope: Scope) -> tuple[Value, ...]:
    a = Args(lw, node, "split", [("x", REQUIRED), ("sizes", REQUIRED), ("axis", 0)], scope)
    x, sizes, axis = a.tensor("x"), a.ints("sizes"), a.int("axis")
    _check_axes(lw, a, x, [axis])
    d = x.type.shape[axis]
    if isinstance(d, int) and sum(sizes) != d:
        raise lw.error(a.pos("sizes"), f"split(): sizes {sizes} add up to {sum(sizes)}, but axis {axis} of "
                                       f"{show_type(x.type)} is {d}")
    out = lw.emit(D.tensor_shape.SplitOp, node.pos, x, sizes=tuple(sizes), axis=axis)
    return out if isinstance(out, tuple) else (out,)


def b_iota(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "iota", [("n", REQUIRED)], scope)
    n = _dim_value(lw, a.nodes["n"], scope)
    return lw.emit(D.tensor.IotaOp, node.pos, result_types=[TensorType("i64", (n,))])


def b_cast(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
    a = Args(lw, node, "cast", [("x", REQUIRED), ("dtype", REQUIRED)], scope)
    return lw.cast(a.tensor("x"), a.dtype("dtype"), node.pos)


def _fill(name: str, value: Any) -> Callable:
    def lower(lw: Lowerer, node: A.Call, scope: Scope) -> Value:
        params = [("shape", REQUIRED)] + ([("value", REQUIRED)] if value is None else []) + [("dtype", "f32")]
        a = Args(lw, node, name, params, scope)
        shape, dtype = a.dims("shape"), a.dtype("dtype")
        v = a.value("value").value if value is None else value
        if dtype == "i1":
            v = bool(v)
        elif dtype in ("i32", "i64"):
            v = int(v)
        else:
            v = float(v)
        return lw.emit(D.tensor.ConstantOp, node.pos, value=v, result_types=[TensorType(dtype, tuple(shape))])
    return lower


def _region_builtin(name: str) -> Callable:
    def lower(lw: Lowerer, node: A.Call, scope: Scope) -> Any:
        from sparsa.frontend import regions

        return getattr(regions, f"lower_{name}")(lw, node, scope)
    return lower


T, TS, TR = D.tensor, D.tensor_shape, D.tensor_reduce
BUILTINS: dict[str, Callable] = {
    # every unary op that names its .sp function (Elementwise.BUILTIN)
    **{c.BUILTIN: _unary(c, c.FLOAT_ONLY) for c in OP_REGISTRY.values() if issubclass(c, T.UnaryOp) and c.BUILTIN},
    "sum": _reduction(TR.SumOp, "sum"), "mean": _reduction(TR.MeanOp, "mean"),
    "logsumexp": _reduction(TR.LogSumExpOp, "logsumexp"),
    "max": _min_max(TR.MaxOp, T.MaximumOp, "max"), "min": _min_max(TR.MinOp, T.MinimumOp, "min"),
    "argmax": b_argmax, "softmax": _along_axis(TR.SoftmaxOp, "softmax"), "cumsum": _along_axis(TR.CumsumOp, "cumsum"),
    "layernorm": b_layernorm, "rmsnorm": b_rmsnorm, "topk": b_topk, "where": b_where,
    "transpose": b_transpose, "reshape": b_reshape, "concat": b_concat, "split": b_split, "iota": b_iota,
    "cast": b_cast, "ones": _fill("ones", 1), "zeros": _fill("zeros", 0), "full": _fill("full", None),
    "moe": _region_builtin("moe"), "attention": _region_builtin("attention"), "scan": _region_builtin("scan"),
}
