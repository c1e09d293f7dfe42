"""Imports ATen-level FX graphs (what AOTAutograd hands a torch.compile backend) into Sparsa's IR.

`SUPPORTED` lists the ATen ops the importer lowers; `import_graph` turns a graph made only of those into
one `func.func` whose arguments are the graph's tensor inputs. Dynamo's symbolic sizes (SymInts) become
symbolic dims, bound again from the input shapes at every call.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

from sparsa.frontend.torch_complex import PARTS, Complex, from_real, to_real
from sparsa.frontend.torch_complex import handlers as complex_handlers
from sparsa.frontend.torch_types import (
    Unsupported,
    as_dim,
    size_carried,
    tensor_type,
    torch_dtype,
    traced_at,
    traced_sizes,
    written,
)
from sparsa.ir import dialects as D
from sparsa.ir.analysis import bindable, sizes_of
from sparsa.ir.core import OP_REGISTRY, Block, Module, Operation, Region, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects.func import FuncOp, ReturnOp, YieldOp
from sparsa.ir.dims import canonical, format_dim, same, symbols
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import TensorType, is_float, promote

T, S, R = D.tensor, D.tensor_shape, D.tensor_reduce


class Importer:
    """Lowers one FX graph node by node; `env` maps nodes to IR values, dims or tuples of values.

    `modules` gives graph inputs that are GraphModules (the mask_mod / score_mod of a flex_attention call,
    passed into a partition from the enclosing graph) by input position.
    """

    def __init__(self, gm: Any, modules: dict[int, Any] | None = None):
        self.gm = gm
        self.env: dict[Any, Any] = {}
        self.block: Block | None = None
        self.modules = modules or {}
        self.scalar_pos: set[int] = set()
        self.size_pos: set[int] = set()  # sizes carried by an empty tensor's shape, [s, 0] (`size_carried`)
        self.python_floats: set[int] = set()  # ids of the 0-d arguments that stand for a SymFloat
        self.bound: set[str] = set()  # the symbols the inputs' shapes bind
        self.bindable: set[str] | None = None  # those a call binds from them (`bindable`), once the inputs are made
        self.complex_pos: set[int] = set()
        self.complex_out: set[int] = set()

    def run(self, name: str = "graph") -> tuple[Module, list[int]]:
        """(module, positions of the graph inputs that are tensors: the function's arguments).

        After the run, `tuple_output` says whether the graph returns a tuple, `output_dtypes` its dtypes.
        """
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        # A size no input's shape binds, or one the dim language cannot write (a sliding-window cache's
        # `Max(0, s - 7)` offset), comes in as a value: a 0-d int64 argument, which the caller makes of the int it
        # is passed (`scalar_pos`). An op that needs it as a size then stays in PyTorch. A float of sizes (a SymFloat:
        # x / (L / 3)) comes in as a 0-d float32 argument, which ops read as the Python float it is. A size that is
        # one symbol no shape binds comes in as the shape of an empty tensor, [s, 0], and binds it (`size_pos`).
        vals = [n.meta.get("val") for n in placeholders]
        dims = [as_dim(d) for v in vals if _is_tensor(v) for d in v.shape]
        bound = {s for d in dims for s in symbols(d)}
        carried = {i: written(v) for i, v in enumerate(vals) if i not in self.modules and size_carried(v)}
        carried = {i: s for i, s in carried.items() if s not in dims}  # (`(s//2)` in a tensor's dims does not bind s)
        self.size_pos = set(carried)
        bound |= set(carried.values())
        self.bound = bound
        floats = {i for i, v in enumerate(vals) if type(v).__name__ == "SymFloat" and i not in self.modules}
        self.scalar_pos = floats | {i for i, v in enumerate(vals) if type(v).__name__ == "SymInt" and i not in
                                    self.modules and ((d := written(v)) is None or not symbols(d) <= bound)}
        tensor_pos = [i for i, v in enumerate(vals) if _is_tensor(v) or i in self.scalar_pos | self.size_pos]
        for i, n in enumerate(placeholders):
            val = n.meta.get("val")
            if i in self.modules:
                self.env[n] = self.modules[i]
            elif not _is_tensor(val) and not isinstance(val, int) and not hasattr(val, "node"):
                raise Unsupported(f"graph input {n.name} of type {type(val).__name__}")
        # a complex input comes in as its real view, [..., 2] (`complex_pos`)
        self.complex_pos = {i for i in tensor_pos if _is_tensor(vals[i]) and _complex_part(vals[i])}

        def arg_type(i: int) -> TensorType:
            if i in self.size_pos:
                return TensorType("i64", (carried[i], 0))
            if i in self.scalar_pos:
                return TensorType("f32" if i in floats else "i64", ())
            if i in self.complex_pos:
                return TensorType(_complex_part(vals[i]), tuple(as_dim(d) for d in vals[i].shape) + (2,))
            return tensor_type(vals[i])

        types = [arg_type(i) for i in tensor_pos]
        self.bindable = bindable(t.shape for t in types)
        self.block = Block(types, [placeholders[i].name for i in tensor_pos])
        for i, arg in zip(tensor_pos, self.block.args, strict=True):
            if i in self.size_pos:
                continue  # (the size, as the dim it binds: below)
            self.env[placeholders[i]] = from_real(self, arg) if i in self.complex_pos else arg
            if i in floats:
                self.python_floats.add(id(arg))
        for n in placeholders:
            if n not in self.env:
                self.env[n] = as_dim(n.meta["val"])
        outputs: list[Value] = []
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "get_attr":
                self.env[node] = getattr(self.gm, node.target)
                continue
            if node.op == "output":
                self.tuple_output = isinstance(node.args[0], tuple | list)
                outs = node.args[0] if self.tuple_output else (node.args[0],)
                # a complex result leaves as its real view, made complex again by the caller (`complex_out`)
                self.complex_out = {i for i, o in enumerate(outs) if isinstance(self.env[o], Complex)}
                outputs = [to_real(self, self.env[o]) if i in self.complex_out else self.tensor(self.env[o])
                           for i, o in enumerate(outs)]
                import torch

                real = {torch.complex64: torch.float32, torch.complex128: torch.float64}  # a complex one's view
                self.output_dtypes = [real.get(o.meta["val"].dtype, o.meta["val"].dtype) for o in outs]
                continue
            if node.op != "call_function":
                raise Unsupported(f"{node.op} nodes")
            handler = SUPPORTED.get(node.target)
            if handler is None:
                raise Unsupported(f"op {node.target}")
            kwargs = {k: self.arg(v) for k, v in node.kwargs.items() if k not in _PLACEMENT}
            args = [self.arg(a) for a in node.args]
            if any(isinstance(a, Complex) or isinstance(a, list) and any(isinstance(x, Complex) for x in a)
                   for a in args):
                handler = COMPLEX_RULES.get(node.target)
                if handler is None:
                    raise Unsupported(f"complex values: op {node.target}", node=node.name)
            try:
                self.env[node] = self.as_traced(node, handler(self, node, *args, **kwargs))
            except TypeError as e:  # a keyword the handler does not know changes the op: keep it in PyTorch
                raise Unsupported(f"op {node.target} with {sorted(kwargs)}: {e}", node=node.name) from None
            except SparsaError as e:  # the node it failed at, so that only that node is left to PyTorch
                if getattr(e, "node", None) is None:
                    e.node = node.name
                raise
        self.block.append(ReturnOp.build(outputs))
        func = FuncOp([], [], {"sym_name": name, "result_types": tuple(v.type for v in outputs)},
                      [Region([self.block])])
        return Module([func]), tensor_pos

    def region_from_graph(self, sub: Any, arg_types: list, arg_names: list, captured: list[Value],
                          result: str) -> Region:
        """A region computing a mask_mod / score_mod subgraph: its first inputs are the region's scalar
        arguments, the rest are `captured` tensors of the enclosing function."""
        block = Block(arg_types, arg_names)
        out = self.inline_graph(sub, block, list(block.args) + list(captured), result)
        if out.type.rank != 0:
            raise Unsupported(f"{result} that is not a scalar function")
        block.append(YieldOp.build([out]))
        return Region([block])

    def inline_graph(self, sub: Any, block: Block, inputs: list[Value], result: str) -> Value:
        """The ops of a one-output subgraph appended to `block`, its inputs bound to `inputs`; its output."""
        inner = Importer(sub)
        inner.block = block
        holders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(holders) != len(inputs):
            raise Unsupported(f"{result} with {len(holders)} inputs")
        for n, v in zip(holders, inputs, strict=True):
            inner.env[n] = v
        out = None
        for node in sub.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out = inner.tensor(inner.env[node.args[0] if not isinstance(node.args[0], tuple | list)
                                              else node.args[0][0]])
                continue
            val = node.meta.get("val")
            if node.op == "call_function" and (isinstance(val, int) and not isinstance(val, bool) or
                                               type(val).__name__ == "SymInt"):
                # size arithmetic on a captured length (`kv < S // 4`): the size, computed out here, read inside
                inner.env[node] = self.splat(as_dim(val), "i64", ())
                continue
            if node.op == "call_function" and type(val).__name__ in ("SymFloat", "float"):
                # a number read from a 0-d input (`limit.item()`, `-limit`): a 0-d value, read as the float it is
                inner.env[node] = _number(inner, node)
                inner.python_floats.add(id(inner.env[node]))
                continue
            handler = SUPPORTED.get(node.target) if node.op == "call_function" else None
            if handler is None:
                raise Unsupported(f"{result}: op {node.target}")
            kwargs = {k: inner.arg(v) for k, v in node.kwargs.items() if k not in _PLACEMENT}
            inner.env[node] = handler(inner, node, *[inner.arg(a) for a in node.args], **kwargs)
        return out

    def arg(self, a: Any) -> Any:
        import torch.fx

        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, list | tuple):
            return type(a)(self.arg(x) for x in a)
        return a

    def as_traced(self, node: Any, v: Any) -> Any:
        """v, reshaped to the sizes PyTorch traced for the node where the IR wrote them otherwise: sizes that
        Dynamo's guards make equal (a concat's `2*((s//2-1)//2)+2` parts against the `(s-1)//2+1` it traced)
        become one size, and a dim of unknown size (?) a known one. The reshape is a view, checked at each call."""
        val = node.meta.get("val")
        if not isinstance(v, Value) or not _is_tensor(val) or len(val.shape) != v.type.rank or \
                all(isinstance(d, int) for d in v.type.shape):
            return v
        dims = tuple(written(d) for d in val.shape)
        if None in dims or not {s for d in dims for s in symbols(d)} <= self.bound or \
                all(same(a, b) for a, b in zip(v.type.shape, dims, strict=True)):
            return v  # (not in sizes no input binds: a padded input's own name stands for them)
        return self.emit(S.ReshapeOp, v, shape=dims)

    def tensor(self, v: Any) -> Value:
        if not isinstance(v, Value):
            raise Unsupported(f"expected a tensor, got {type(v).__name__}")
        return v

    def emit(self, cls: type[Operation], *operands: Any, result_types: list | None = None,
             regions: list | None = None, **attrs: Any) -> Any:
        try:
            op = cls.build(*operands, result_types=result_types, regions=regions or [], **attrs)
            op.verify()
        except SparsaError as e:  # a combination Sparsa's op does not accept: leave it to PyTorch
            raise Unsupported(f"{cls.NAME}: {e.message}") from None
        if self.bindable is not None:  # a size no call can compute (JetMoe's `(s*t)//h`, h bound by no input)
            for d in sizes_of(op):
                if not symbols(d) <= self.bindable:
                    raise Unsupported(f"{cls.NAME}: a size, {format_dim(d)}, of names no input binds")
        self.block.append(op)
        return op.results[0] if len(op.results) == 1 else tuple(op.results)

    def const(self, value: Any, dtype: str) -> Value:
        return self.splat(value, dtype, ())

    def splat(self, value: Any, dtype: str, shape: tuple) -> Value:
        """A tensor of `shape` (ints or symbolic dims) holding `value` as `dtype`; a symbolic value (a SymInt:
        flex_attention's block count under dynamic shapes) is counted at run time, as a sum of that many ones."""
        dims = tuple(as_dim(d) for d in shape)
        if isinstance(value, str):
            ones = self.emit(T.ConstantOp, value=1, result_types=[TensorType("i64", (as_dim(value),))])
            n = self.cast(self.emit(R.SumOp, ones, axes=(0,)), dtype)
            return n if not dims else self.emit(S.BroadcastToOp, n, shape=dims)
        value = bool(value) if dtype == "i1" else float(value) if is_float(dtype) else int(value)
        return self.emit(T.ConstantOp, value=value, result_types=[TensorType(dtype, dims)])

    def operands(self, a: Any, b: Any) -> tuple[Value, Value]:
        """Two operands of a binary op with torch's type promotion (Python scalars take the tensor's kind)."""
        if isinstance(a, Value) and isinstance(b, Value) and not {id(a), id(b)} & self.python_floats:
            da, db = a.type.dtype, b.type.dtype
            # torch promotes a bool to the other operand's type (mask * ids); the IR mixes no bools
            dt = da if da == db or db == "i1" else db if da == "i1" else promote(da, db)
            return self.cast(a, dt), self.cast(b, dt)
        t, s = (a, b) if isinstance(a, Value) and id(a) not in self.python_floats else (b, a)
        dt = t.type.dtype
        if isinstance(s, Value):  # a float of sizes: the tensor's float type, or float32 beside an integer tensor
            dt = dt if is_float(dt) else "f32"
            return self.cast(a, dt), self.cast(b, dt)
        if isinstance(s, float) and not is_float(dt):
            dt = "f32"
            t = self.cast(t, dt)
        elif dt == "i1" and isinstance(s, int) and not isinstance(s, bool):
            dt = "i64"
            t = self.cast(t, dt)
        c = self.const(s, dt)
        return (t, c) if isinstance(a, Value) else (c, t)

    def cast(self, v: Value, dtype: str) -> Value:
        return v if v.type.dtype == dtype else self.emit(T.CastOp, v, to=dtype)


NUMBER_OPS = {operator.add: T.AddOp, operator.sub: T.SubOp, operator.mul: T.MulOp, operator.truediv: T.DivOp}


def _number(im: Importer, node: Any) -> Value:
    """A float of a subgraph computed from its 0-d inputs, as a 0-d value: the input's `.item()`, or the negation,
    sum, difference, product or quotient of such floats."""
    import torch

    args = [a if isinstance(a := im.arg(arg), Value) else im.const(float(a), "f32") for arg in node.args]
    if node.target is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], Value) and \
            args[0].type.rank == 0:
        return args[0]
    if node.target is operator.neg:
        return im.emit(T.NegOp, im.tensor(args[0]))
    if node.target in NUMBER_OPS and len(args) == 2:
        return im.emit(NUMBER_OPS[node.target], *im.operands(*args))
    raise Unsupported(f"the float {node.target}")


# Keywords that only say where a result lives, not what it is.
_PLACEMENT = frozenset({"device", "pin_memory", "layout", "memory_format", "non_blocking"})


def _complex_part(val: Any) -> str | None:
    """The real element type of a complex tensor's parts; None for any other value."""
    return PARTS.get(str(getattr(val, "dtype", "")).removeprefix("torch."))


def _is_tensor(val: Any) -> bool:
    return hasattr(val, "dtype") and hasattr(val, "shape")


def _axis(d: int, rank: int) -> int:
    return d % rank if rank else 0


# ---- handlers: one per ATen op -------------------------------------------------------------------------
def _binary(cls: type) -> Callable:
    def h(im: Importer, node: Any, a: Any, b: Any, alpha: Any = 1, rounding_mode: Any = None) -> Value:
        if alpha != 1 or rounding_mode is not None:
            raise Unsupported("alpha != 1 or a rounding mode")
        x, y = im.operands(a, b)
        if cls is T.DivOp and not is_float(x.type.dtype):
            x, y = im.cast(x, "f32"), im.cast(y, "f32")
        return im.emit(cls, x, y)
    return h


def _div_mode(im: Importer, node: Any, a: Any, b: Any, rounding_mode: str | None = None) -> Value:
    """a / b rounded as `rounding_mode` says: none (true division), "floor" (Python's //), or "trunc" (toward 0:
    the floor, plus 1 where the division leaves a remainder and a and b differ in sign; JetMoe's token of each
    routed slot, `slot.div(k, rounding_mode="trunc")`)."""
    if rounding_mode is None:
        return _binary(T.DivOp)(im, node, a, b)
    if rounding_mode not in ("floor", "trunc"):
        raise Unsupported(f"division rounding {rounding_mode!r}")
    if not isinstance(a, Value) and not isinstance(b, Value):  # (sizes: Longformer's chunk counts)
        raise Unsupported("a division of sizes with a rounding mode")
    x, y = im.operands(a, b)
    q = im.emit(T.FloorDivOp, x, y)
    if rounding_mode == "floor":
        return q
    dt = q.type.dtype
    zero = im.const(0, x.type.dtype)
    signs = [im.cast(im.emit(T.CmpOp, v, zero, pred="lt"), dt) for v in (x, y)]
    apart = im.emit(T.CmpOp, *signs, pred="ne")
    inexact = im.emit(T.CmpOp, im.emit(T.ModOp, x, y), im.const(0, dt), pred="ne")
    return im.emit(T.AddOp, q, im.cast(im.emit(T.AndOp, apart, inexact), dt))


def _cmp(pred: str) -> Callable:
    def h(im: Importer, node: Any, a: Any, b: Any) -> Value:
        x, y = im.operands(a, b)
        return im.emit(T.CmpOp, x, y, pred=pred)
    return h


def _isnan(im: Importer, node: Any, x: Value) -> Value:
    return im.emit(T.CmpOp, x, x, pred="ne")


def _sign(im: Importer, node: Any, x: Value) -> Value:
    """sign / sgn of reals: (x > 0) - (x < 0) in x's type, NaN where x is NaN (a norm's backward reads it)."""
    zero = im.const(0, x.type.dtype)
    s = im.emit(T.SubOp, im.cast(im.emit(T.CmpOp, x, zero, pred="gt"), x.type.dtype),
                im.cast(im.emit(T.CmpOp, x, zero, pred="lt"), x.type.dtype))
    return s if not is_float(x.type.dtype) else im.emit(T.WhereOp, _isnan(im, node, x), x, s)


def _unary(cls: type) -> Callable:
    def h(im: Importer, node: Any, x: Value) -> Value:
        return im.emit(cls, x)
    return h


def _bool_binary(cls: type) -> Callable:
    def h(im: Importer, node: Any, a: Any, b: Any) -> Value:
        x, y = im.operands(a, b)
        if x.type.dtype != "i1":
            raise Unsupported("bitwise ops on integers")
        return im.emit(cls, x, y)
    return h


def _clamp(im: Importer, node: Any, x: Value, lo: Any = None, hi: Any = None) -> Value:
    """maximum with the lower bound, then minimum with the upper (scalars or tensors); an infinite or absent
    bound is none. A float bound of an integer tensor (PyTorch promotes the result) is not taken."""
    y = im.tensor(x)
    for bound, cls, none in ((lo, T.MaximumOp, -math.inf), (hi, T.MinimumOp, math.inf)):
        if bound is None or (isinstance(bound, float) and bound == none):
            continue
        if isinstance(bound, float) and not is_float(y.type.dtype):
            raise Unsupported("a float bound of an integer clamp")
        y = im.emit(cls, *im.operands(y, bound))
    return y


def _gelu(im: Importer, node: Any, x: Value, approximate: str = "none") -> Value:
    approx = approximate
    return im.emit(T.GeluTanhOp if approx == "tanh" else T.GeluOp, x)


def _view(im: Importer, node: Any, x: Value, sizes: Any) -> Value:
    shape = tuple(-1 if s == -1 else (s if isinstance(s, str) else as_dim(s)) for s in sizes)
    if shape == x.type.shape:
        return x
    return im.emit(S.ReshapeOp, x, shape=shape)


def _permute(im: Importer, node: Any, x: Value, dims: Any) -> Value:
    perm = tuple(_axis(d, x.type.rank) for d in dims)
    return x if perm == tuple(range(x.type.rank)) else im.emit(S.TransposeOp, x, perm=perm)


def _transpose(im: Importer, node: Any, x: Value, d0: int, d1: int) -> Value:
    perm = list(range(x.type.rank))
    a, b = _axis(d0, x.type.rank), _axis(d1, x.type.rank)
    perm[a], perm[b] = perm[b], perm[a]
    return _permute(im, node, x, perm)


def _t(im: Importer, node: Any, x: Value) -> Value:
    return _transpose(im, node, x, 0, 1) if x.type.rank == 2 else x


def _unsqueeze(im: Importer, node: Any, x: Value, d: int) -> Value:
    return im.emit(S.ExpandDimsOp, x, axes=(_axis(d, x.type.rank + 1),))


def _squeeze(im: Importer, node: Any, x: Value, dims: Any = None) -> Value:
    dims = [dims] if isinstance(dims, int) else (list(dims) if dims is not None else
                                                  [i for i, d in enumerate(x.type.shape) if d == 1])
    dims = [_axis(d, x.type.rank) for d in dims if x.type.shape[_axis(d, x.type.rank)] == 1]
    return im.emit(S.SqueezeOp, x, axes=tuple(dims)) if dims else x


def _slice(im: Importer, node: Any, x: Value, dim: int = 0, start: Any = None, end: Any = None,
           step: int = 1) -> Value:
    d = _axis(dim, x.type.rank)
    size = x.type.shape[d]
    start = 0 if start is None else start
    if isinstance(end, int) and isinstance(size, int) and end >= size:
        end = None
    if isinstance(end, int) and end >= 2**62:
        end = None
    val = node.meta.get("val") if str(getattr(node, "target", "")) == "aten.slice.Tensor" else None  # (not a caller's)
    offset = False  # (a start made here from PyTorch's length: an offset from the axis's beginning)
    if step == 1 and val is not None and len(val.shape) == x.type.rank:
        # where PyTorch knows the length (its guards put a sliding window's x[-4096:] over the whole of a shorter
        # axis, and x[-L:] is all of it), from the end: the start it makes (0 for the whole axis), not the bound
        # the IR takes as inside
        try:
            n = as_dim(val.shape[d])
        except Unsupported:  # (a length outside the dim language: Min(4096, s) unguarded)
            n = None
        if n is None:
            pass
        elif same(n, size):
            start, end = 0, None
        elif end is None and size is not None and (isinstance(canonical(f"{size}-({n})"), int) or
                                                    not isinstance(start, int)):
            # (the last n rows from a run-time start: MPT's ALiBi `alibi[:, :, -L:]` of its 2048, L guarded below)
            start, offset = canonical(f"{size}-({n})"), True
    if start == 0 and end is None and step == 1:
        return x
    if isinstance(start, str) and not offset:  # a size: counted from the end where PyTorch traced it below 0
        given = node.args[2] if node is not None and len(node.args) > 2 else None
        at = traced_at(given.meta.get("val")) if hasattr(given, "meta") else None
        whole = traced_at(node.args[0].meta.get("val").shape[d]) if at is not None and at < 0 else None
        if at is None or at < 0 and (size is None or whole is None or whole + at < 0):
            raise Unsupported("slice with a symbolic start PyTorch traced no value for, or one before the axis")
        start = canonical(f"({size})+({start})") if at < 0 else start
    if not isinstance(start, int | str) or not (end is None or isinstance(end, int | str)):
        raise Unsupported("slice with a start or stop that is no size (a value computed at run time)")
    rank = x.type.rank
    starts, stops, steps = [0] * rank, [None] * rank, [1] * rank
    starts[d], stops[d], steps[d] = start, end, step
    return im.emit(S.SliceOp, x, starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))


def _flip(im: Importer, node: Any, x: Value, dims: Any) -> Value:
    """x reversed along `dims`: a slice of step -1 on each (cumsum's derivative flips, in Mamba2's backward)."""
    axes = {_axis(d, x.type.rank) for d in dims}
    rank = x.type.rank
    starts = tuple(-1 if d in axes else 0 for d in range(rank))
    steps = tuple(-1 if d in axes else 1 for d in range(rank))
    return im.emit(S.SliceOp, x, starts=starts, stops=(None,) * rank, steps=steps) if axes else x


def _select(im: Importer, node: Any, x: Value, dim: int, index: int) -> Value:
    d = _axis(dim, x.type.rank)
    piece = _slice(im, node, x, d, index, index + 1 if index != -1 else None, 1)
    return im.emit(S.SqueezeOp, piece, axes=(d,))


def _unbind(im: Importer, node: Any, x: Value, dim: int = 0) -> tuple:
    d = _axis(dim, x.type.rank)
    if not isinstance(x.type.shape[d], int):
        raise Unsupported("unbind along a symbolic dim")
    return tuple(_select(im, node, x, d, i) for i in range(x.type.shape[d]))


def _expand(im: Importer, node: Any, x: Value, sizes: Any) -> Value:
    shape = list(sizes)
    lead = len(shape) - x.type.rank
    shape = tuple(x.type.shape[i - lead] if s == -1 else (s if isinstance(s, str) else as_dim(s))
                  for i, s in enumerate(shape))
    return x if shape == x.type.shape else im.emit(S.BroadcastToOp, x, shape=shape)


def _cat(im: Importer, node: Any, xs: Any, dim: int = 0) -> Value:
    xs = [im.tensor(x) for x in xs]
    # torch.cat skips 1-D empty tensors beside tensors of another rank (an empty KV cache, for one)
    kept = [x for x in xs if not (x.type.rank == 1 and x.type.shape[0] == 0)] or xs[:1]
    if len(kept) == 1:
        return kept[0]
    return im.emit(S.ConcatOp, kept, axis=_axis(dim, kept[0].type.rank))


def _split(im: Importer, node: Any, x: Value, sizes: Any, dim: int = 0) -> tuple:
    d = _axis(dim, x.type.rank)
    if isinstance(sizes, int):
        total = x.type.shape[d]
        if not isinstance(total, int):
            raise Unsupported("split of a symbolic dim")
        sizes = [min(sizes, total - i) for i in range(0, total, sizes)]
    if not all(isinstance(s, int) for s in sizes):  # sizes known at run time (JetMoe's experts' counts): slices
        if not all(isinstance(s, int | str) for s in sizes):
            raise Unsupported(f"split by sizes {list(sizes)}")
        rank, at, pieces = x.type.rank, 0, []
        for s in sizes:
            starts, stops = [0] * rank, [None] * rank
            starts[d], stops[d] = at, canonical(f"({at})+({s})")
            pieces.append(im.emit(S.SliceOp, x, starts=tuple(starts), stops=tuple(stops), steps=(1,) * rank))
            at = stops[d]
        return tuple(pieces)
    out = im.emit(S.SplitOp, x, sizes=tuple(sizes), axis=d)
    return out if isinstance(out, tuple) else (out,)


def _reduce(cls: type) -> Callable:
    def h(im: Importer, node: Any, x: Value, dims: Any = None, keepdim: bool = False, dtype: Any = None) -> Value:
        if dtype is not None:
            raise Unsupported("reduction with a dtype")
        dims = list(range(x.type.rank)) if dims is None or dims == [] else (
            [dims] if isinstance(dims, int) else list(dims))
        if x.type.dtype == "i1" and cls is R.SumOp:  # torch sums booleans as int64
            x = im.cast(x, "i64")
        return im.emit(cls, x, axes=tuple(_axis(d, x.type.rank) for d in dims), keepdim=keepdim)
    return h


def _softmax(im: Importer, node: Any, x: Value, dim: int, half_to_float: bool = False) -> Value:
    if half_to_float:
        raise Unsupported("softmax with half_to_float")
    return im.emit(R.SoftmaxOp, x, axis=_axis(dim, x.type.rank))


def _argmax(im: Importer, node: Any, x: Value, dim: Any = None, keepdim: bool = False) -> Value:
    if dim is None:
        raise Unsupported("argmax over all elements")
    return im.emit(R.ArgmaxOp, x, axis=_axis(dim, x.type.rank), keepdim=keepdim)


def _topk(im: Importer, node: Any, x: Value, k: int, dim: int = -1, largest: bool = True,
          sorted: bool = True) -> tuple:
    if _axis(dim, x.type.rank) != x.type.rank - 1 or not largest:
        raise Unsupported("topk other than the largest along the last axis")
    return im.emit(R.TopkOp, x, k=k)


def _cumsum(im: Importer, node: Any, x: Value, dim: int, dtype: Any = None) -> Value:
    if dtype is not None:
        x = im.cast(x, torch_dtype(dtype))
    elif not is_float(x.type.dtype):  # torch sums bools and integers in int64
        x = im.cast(x, "i64")
    return im.emit(R.CumsumOp, x, axis=_axis(dim, x.type.rank))


def _mm(im: Importer, node: Any, a: Value, b: Value) -> Value:
    return im.emit(S.MatmulOp, *im.operands(a, b))


def _addmm(im: Importer, node: Any, bias: Value, a: Value, b: Value, beta: Any = 1, alpha: Any = 1) -> Value:
    """addmm and baddbmm: beta * bias + alpha * (a @ b); with beta 0 the bias is not read (PyTorch's rule: its
    NaNs do not propagate). BLOOM adds its ALiBi bias to the scores this way."""
    if not all(isinstance(s, (int, float)) for s in (alpha, beta)):
        raise Unsupported("addmm with a symbolic alpha or beta")
    prod = _mm(im, node, a, b)
    if alpha != 1:
        prod = im.emit(T.MulOp, *im.operands(prod, alpha))
    if beta == 0:
        return prod
    return im.emit(T.AddOp, *im.operands(prod, bias if beta == 1 else im.emit(T.MulOp, *im.operands(bias, beta))))


def _where(im: Importer, node: Any, c: Value, a: Any, b: Any) -> Value:
    if not isinstance(a, Value) and not isinstance(b, Value):
        raise Unsupported("where of two scalars")
    x, y = im.operands(a, b)
    return im.emit(T.WhereOp, c, x, y)


def _pow(im: Importer, node: Any, x: Value, e: Any) -> Value:
    return im.emit(T.PowOp, *im.operands(x, e))


def _arange(im: Importer, node: Any, end: Any, dtype: Any = None) -> Value:
    dtype = torch_dtype(dtype) if dtype is not None else "i64"
    if dtype not in ("i32", "i64"):
        raise Unsupported("arange of a non-integer type")
    return im.emit(T.IotaOp, result_types=[TensorType(dtype, (as_dim(end),))])


def _arange_start(im: Importer, node: Any, start: Any, end: Any, step: Any = 1, dtype: Any = None) -> Value:
    """start, start + step, ... below end (above, for a negative step): iota * step + start, as torch's length
    ceil((end - start) / step); in the dtype torch infers (int64 for int bounds, else float32) or the one asked."""
    if not all(isinstance(a, int | float) for a in (start, end, step)) or step == 0:
        raise Unsupported("arange with a symbolic bound or step")
    want = torch_dtype(dtype) if dtype is not None else \
        "i64" if all(isinstance(a, int) for a in (start, end, step)) else "f32"
    n = max(0, math.ceil((end - start) / step))
    i = _arange(im, node, n)
    if want in ("i32", "i64") and all(isinstance(a, int) for a in (start, step)):
        i = i if want == "i64" else im.cast(i, want)
        i = i if step == 1 else im.emit(T.MulOp, i, im.const(step, want))
        return i if start == 0 else im.emit(T.AddOp, i, im.const(start, want))
    if want not in ("f32", "f64"):
        raise Unsupported(f"arange of {want} with a fractional bound or step")
    x = im.emit(T.AddOp, im.emit(T.MulOp, im.cast(i, "f64"), im.const(float(step), "f64")),
                im.const(float(start), "f64"))
    return im.cast(x, want)


def _scalar_tensor(im: Importer, node: Any, value: Any, dtype: Any = None) -> Value:
    return im.const(value, torch_dtype(dtype) if dtype is not None else "f32")


def _full(im: Importer, node: Any, sizes: Any, value: Any, dtype: Any = None) -> Value:
    return im.splat(value, torch_dtype(dtype) if dtype is not None else "f32", tuple(sizes))


def _to_copy(im: Importer, node: Any, x: Value, dtype: Any = None) -> Value:
    return im.cast(x, torch_dtype(dtype)) if dtype is not None else x


def _identity(im: Importer, node: Any, x: Value) -> Value:
    return x


def _embedding(im: Importer, node: Any, weight: Value, idx: Value, padding_idx: int = -1,
               scale_grad_by_freq: bool = False, sparse: bool = False) -> Value:
    return im.emit(S.GatherOp, weight, [idx])


def _layer_norm(im: Importer, node: Any, x: Value, shape: Any, w: Any, b: Any, eps: float) -> tuple:
    """native_layer_norm: the fused op; where its mean and 1/std are read (a training graph saves them for the
    backward) those too, as the layer norm rule computes them. Without a weight or a bias (OLMo's, or
    `elementwise_affine=False`, `bias=False`) it scales by ones and adds zeros."""
    if len(shape) != 1:
        raise Unsupported("layer norm over several axes")
    w, b = _affine(im, x, w, b)
    out = im.emit(R.LayerNormOp, x, w, b, eps=float(eps))
    if not any(len(u.users) for u in list(node.users) if u.args[1] != 0):
        return (out, None, None)
    from sparsa.ir.autodiff import Grad

    return (out, *R.layer_norm_stats(Grad(im.block), x, float(eps)))


def _affine(im: Importer, x: Value, w: Any, b: Any) -> tuple[Value, Value]:
    """A layer norm's weight and bias, ones and zeros over x's last axis where the module has none."""
    width = (x.type.shape[-1],)
    return (im.splat(1.0, x.type.dtype, width) if w is None else w,
            im.splat(0.0, x.type.dtype, width) if b is None else b)


def _getitem(im: Importer, node: Any, xs: Any, i: int) -> Any:
    if not isinstance(xs, tuple) or xs[i] is None:
        raise Unsupported("getitem of a non-tuple")
    return xs[i]


# The ATen ops of `_ops` whose value at an element reads that element of each operand only: what a MoE block's
# expert activation may use to fold (frontend/torch_moe.py).
POINTWISE = frozenset({
    *(name for c in OP_REGISTRY.values() if issubclass(c, Elementwise) for name in c.ATEN),
    "rsub.Scalar", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "reciprocal.default", "expm1.default",
    *(f"{cmp}.{kind}" for cmp in ("eq", "ne", "lt", "le", "gt", "ge") for kind in ("Tensor", "Scalar")),
    "bitwise_and.Tensor", "bitwise_or.Tensor", "gelu.default", "where.self", "clamp.default", "clamp.Tensor",
    "clamp_min.default", "clamp_max.default", "clone.default", "alias.default"})

_ops: dict[str, Callable] = {
    # every elementwise op that names its ATen overloads (Elementwise.ATEN): one operand or two
    **{name: (_binary(c) if issubclass(c, T.BinaryOp) else _unary(c)) for c in OP_REGISTRY.values()
       if issubclass(c, Elementwise) for name in c.ATEN},
    "rsub.Scalar": lambda im, n, a, b, alpha=1: _binary(T.SubOp)(im, n, b, a, alpha),
    "div.Tensor_mode": _div_mode, "div.Scalar_mode": _div_mode,
    "pow.Tensor_Scalar": _pow, "pow.Tensor_Tensor": _pow, "pow.Scalar": _pow,
    "reciprocal.default": lambda im, n, x: im.emit(T.DivOp, *im.operands(1.0, x)),
    # exp(x) - 1, as MLIR's math-to-llvm lowers math.expm1 (an absolute error of an ulp of 1 near 0)
    "expm1.default": lambda im, n, x: im.emit(T.SubOp, im.emit(T.ExpOp, x), im.const(1.0, x.type.dtype)),
    "eq.Tensor": _cmp("eq"), "eq.Scalar": _cmp("eq"), "ne.Tensor": _cmp("ne"), "ne.Scalar": _cmp("ne"),
    "lt.Tensor": _cmp("lt"), "lt.Scalar": _cmp("lt"), "le.Tensor": _cmp("le"), "le.Scalar": _cmp("le"),
    "gt.Tensor": _cmp("gt"), "gt.Scalar": _cmp("gt"), "ge.Tensor": _cmp("ge"), "ge.Scalar": _cmp("ge"),
    "isnan.default": _isnan, "sign.default": _sign, "sgn.default": _sign,
    "bitwise_and.Tensor": _bool_binary(T.AndOp), "bitwise_or.Tensor": _bool_binary(T.OrOp),
    "gelu.default": _gelu, "where.self": _where, "clamp.default": _clamp, "clamp.Tensor": _clamp,
    "clamp_min.default": _clamp, "clamp_max.default": lambda im, n, x, hi: _clamp(im, n, x, None, hi),
    "view.default": _view, "_unsafe_view.default": _view, "reshape.default": _view,
    "permute.default": _permute, "transpose.int": _transpose, "t.default": _t,
    "unsqueeze.default": _unsqueeze, "squeeze.dim": _squeeze, "squeeze.dims": _squeeze, "squeeze.default": _squeeze,
    "slice.Tensor": _slice, "select.int": _select, "unbind.int": _unbind, "expand.default": _expand,
    "flip.default": _flip, "cat.default": _cat, "split_with_sizes.default": _split, "split.Tensor": _split,
    "sum.dim_IntList": _reduce(R.SumOp), "mean.dim": _reduce(R.MeanOp), "sum.default": _reduce(R.SumOp),
    "mean.default": _reduce(R.MeanOp), "amax.default": _reduce(R.MaxOp),
    "amin.default": _reduce(R.MinOp), "logsumexp.default": _reduce(R.LogSumExpOp), "argmax.default": _argmax,
    "_softmax.default": _softmax, "topk.default": _topk, "cumsum.default": _cumsum,
    "mm.default": _mm, "bmm.default": _mm, "matmul.default": _mm, "addmm.default": _addmm, "baddbmm.default": _addmm,
    "arange.default": _arange, "arange.start": _arange_start,
    "arange.start_step": _arange_start, "scalar_tensor.default": _scalar_tensor,
    "full.default": _full,
    "_to_copy.default": _to_copy, "clone.default": _identity, "alias.default": _identity,
    "detach.default": _identity, "lift_fresh_copy.default": _identity,
    "embedding.default": _embedding, "native_layer_norm.default": _layer_norm,
}


def _build_table() -> dict[Any, Callable]:
    import torch

    from sparsa.frontend.torch_attention import OPS as ATTENTION
    from sparsa.frontend.torch_attention import flex_attention
    from sparsa.frontend.torch_derivatives import OPS as DERIVATIVES
    from sparsa.frontend.torch_indexing import OPS as INDEXING
    from sparsa.frontend.torch_linalg import OPS as LINALG
    from sparsa.frontend.torch_losses import OPS as LOSSES
    from sparsa.frontend.torch_masks import OPS
    from sparsa.frontend.torch_moe import IMPORTS as MOE
    from sparsa.frontend.torch_padding import OPS as PADDING
    from sparsa.frontend.torch_scan import linear_scan, linear_scan_backward
    from sparsa.frontend.torch_ssm import OPS as SSM
    from sparsa.frontend.torch_ssm import _linear_scan, _linear_scan_backward

    table: dict[Any, Callable] = {operator.getitem: _getitem, **MOE, linear_scan._opoverload: _linear_scan,
                                  linear_scan_backward._opoverload: _linear_scan_backward}
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        table[flex] = flex_attention
    # a float attribute Dynamo made an input (dynamic=True: a 0-d float64 tensor) reaches ATen cast this way
    table[torch.ops.prims.convert_element_type.default] = _to_copy
    makers, rules = complex_handlers(_ops)
    handlers = {**_ops, **OPS, **ATTENTION, **DERIVATIVES, **INDEXING, **LINALG, **LOSSES, **PADDING, **SSM, **makers}
    for name, handler in handlers.items():
        op = _aten(name)
        if op is not None:
            table[op] = handler
    COMPLEX_RULES.update({_aten(name): rule for name, rule in rules.items() if _aten(name) is not None})
    return table


def _aten(name: str) -> Any:
    import torch

    packet, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, packet, None), overload, None)


# The rules of ops with a complex operand (frontend/torch_complex.py), by ATen op; filled with the table.
COMPLEX_RULES: dict[Any, Callable] = {}


class _Table(dict):
    """The handler table, built on first use (importing torch only when the torch backend is used)."""

    def _ensure(self) -> None:
        if not self:
            self.update(_build_table())

    def get(self, key: Any, default: Any = None) -> Any:
        self._ensure()
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._ensure()
        return super().__contains__(key)


SUPPORTED = _Table()


def import_graph(gm: Any, name: str = "graph", modules: dict[int, Any] | None = None) -> Importer:
    """Import an ATen FX graph made of SUPPORTED ops (raises Unsupported otherwise); the importer holds
    `module`, `tensor_pos` (which graph inputs are the function's arguments) and the output structure."""
    im = Importer(gm, modules)
    with traced_sizes(gm):
        im.module, im.tensor_pos = im.run(name)
    return im
