"""Checks a `.sp` program and lowers one model to IR: scopes, statements, model inlining, expressions.

Checking and lowering are one walk: every expression is typed as it is lowered, and each IR op
carries the location of the source it came from. An error stops its statement, poisons the names
it would have bound, and the walk goes on, so one run reports every independent error.
"""

from __future__ import annotations

import difflib
import keyword
from collections.abc import Callable
from typing import Any

from sparsa.frontend import ast as A
from sparsa.frontend.values import (
    CompileErrors,
    DimRef,
    FnRef,
    FrontendError,
    LambdaRef,
    Lit,
    ModelRef,
    Poisoned,
    location,
    show_dim,
)
from sparsa.ir import dialects as D
from sparsa.ir.core import Block, Module, Operation, Region, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dims import Dim, broadcast, mul, same
from sparsa.ir.types import LANGUAGE_DTYPES, Layout, TensorType, is_float, is_int, promote, show_type

POISON = object()


class Scope:
    """Names visible in a model body, a lambda or a mask: a chain of dicts."""

    def __init__(self, parent: Scope | None = None):
        self.names: dict[str, Any] = {}
        self.parent = parent

    def lookup(self, name: str) -> Any:
        s: Scope | None = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        return None

    def all_names(self) -> set[str]:
        out: set[str] = set()
        s: Scope | None = self
        while s is not None:
            out |= set(s.names)
            s = s.parent
        return out


class Lowerer:
    """Lowers a parsed program's models into IR functions; collects errors instead of stopping at one."""

    def __init__(self, defs: list[A.Node], file: str, source: str):
        self.file = file
        self.source = source
        self.errors: list[SparsaError] = []
        self.seen_errors: set[tuple[int, int, str]] = set()
        self.globals = Scope()
        self.models: dict[str, A.Model] = {}
        self.block: Block | None = None
        self.params: dict[str, Value] = {}
        self.param_block: Block | None = None
        self.call_stack: list[str] = []
        self.prefixes: list[str] = []
        self.expert_arg: Value | None = None
        self.expert_counts: list[tuple[int, A.Pos]] = []
        self._declare(defs)

    # ---- diagnostics -------------------------------------------------------------------------------
    def error(self, pos: A.Pos, message: str) -> FrontendError:
        return FrontendError(message, location(self.file, pos), self.source)

    def report(self, err: SparsaError) -> None:
        key = (err.loc.line, err.loc.col, err.message) if err.loc else (0, 0, err.message)
        if key not in self.seen_errors:
            self.seen_errors.add(key)
            self.errors.append(err)

    def guarded(self, fn: Callable[[], Any]) -> Any:
        """Run one statement's lowering; on error, report it and return POISON."""
        try:
            return fn()
        except Poisoned:
            return POISON
        except SparsaError as e:
            self.report(e)
            return POISON

    # ---- declarations --------------------------------------------------------------------------------
    def _declare(self, defs: list[A.Node]) -> None:
        first: dict[str, A.Node] = {}
        for d in defs:
            if d.name in first:
                self.report(self.error(d.pos, f"redefinition of '{d.name}' (first defined at line "
                                              f"{first[d.name].pos.line})"))
                continue
            first[d.name] = d
            if isinstance(d, A.Const):
                value = self.guarded(lambda d=d: self.const_value(d.value))
                self.globals.names[d.name] = POISON if value is POISON else Lit(value)
            elif isinstance(d, A.MaskDef):
                self.globals.names[d.name] = FnRef(d)
            else:
                self.models[d.name] = d
                self.globals.names[d.name] = ModelRef(d)

    def const_value(self, node: A.Node) -> int | float | bool:
        """Evaluate a compile-time expression (consts, literals, arithmetic)."""
        value = self.expr(node, self.globals)
        if not isinstance(value, Lit):
            raise self.error(node.pos, "a const must be a number or boolean known at compile time")
        return value.value

    # ---- entry point -----------------------------------------------------------------------------------
    def lower_model(self, name: str) -> Operation:
        """A `func.func` for model `name` with its inputs from the signature and weights as params."""
        model = self.models[name]
        scope = Scope(self.globals)
        dims: dict[str, Dim] = {}
        arg_types = [self.type_of(a.type, scope, dims, bind=True) for a in model.args]
        block = Block(arg_types, [a.name for a in model.args])
        self.block, self.param_block, self.params = block, block, {}
        results = self.inline_model(model, "", list(block.args), model.pos, dims, scope)
        ret_types = [self.type_of(t, scope, dims) for t in model.returns]
        outs = [self.as_tensor(v, None, model.pos) for v in results] if results is not POISON else []
        block.append(D.func.ReturnOp.build(outs, loc=location(self.file, model.pos)))
        func = D.func.FuncOp([], [], {"sym_name": name, "result_types": tuple(ret_types)}, [Region([block])],
                             location(self.file, model.pos))
        return func

    # ---- types and dims --------------------------------------------------------------------------------
    def dtype(self, name: str, pos: A.Pos) -> str:
        if name not in LANGUAGE_DTYPES:
            raise self.error(pos, f"unknown element type '{name}'; expected one of {', '.join(LANGUAGE_DTYPES)}")
        return LANGUAGE_DTYPES[name]

    def type_of(self, t: A.TypeExpr, scope: Scope, dims: dict[str, Dim], bind: bool = False) -> TensorType:
        """The tensor type an annotation denotes; with `bind`, unknown names become symbolic dims."""
        dtype = self.dtype(t.dtype, t.pos)
        shape = tuple(self.dim(d, scope, dims, bind) for d in (t.dims or []))
        return TensorType(dtype, shape)

    def dim(self, node: A.Node, scope: Scope, dims: dict[str, Dim], bind: bool = False) -> Dim:
        """A dim expression: integers, consts, named sizes, and + - * // % of them."""
        if isinstance(node, A.Num) and isinstance(node.value, int):
            return node.value
        if isinstance(node, A.Name):
            if node.id in dims:
                return dims[node.id]
            found = scope.lookup(node.id)
            if isinstance(found, Lit) and isinstance(found.value, int) and not isinstance(found.value, bool):
                return found.value
            if isinstance(found, DimRef):
                return found.dim
            if found is None or isinstance(found, ModelRef | FnRef):
                if bind and keyword.iskeyword(node.id):  # (sizes are Python expressions in the IR: ir/dims.py)
                    raise self.error(node.pos, f"'{node.id}' cannot name a size: it is a reserved word")
                if bind:
                    dims[node.id] = node.id
                    scope.names.setdefault(node.id, DimRef(node.id, node.id))
                    return node.id
                raise self.error(node.pos, f"unknown size '{node.id}' (sizes come from the model's input types, "
                                           f"consts or integers)")
            raise self.error(node.pos, f"'{node.id}' is not a size")
        if isinstance(node, A.Unary) and node.op == "-":
            inner = self.dim(node.x, scope, dims, bind)
            return -inner if isinstance(inner, int) else f"-({inner})"
        if isinstance(node, A.BinOp) and node.op in ("+", "-", "*", "//", "%"):
            a, b = self.dim(node.lhs, scope, dims, bind), self.dim(node.rhs, scope, dims, bind)
            if isinstance(a, int) and isinstance(b, int):
                if node.op in ("//", "%") and b == 0:
                    raise self.error(node.pos, "division by zero in a size")
                return {"+": a + b, "-": a - b, "*": a * b, "//": a // b if b else 0, "%": a % b if b else 0}[node.op]
            if node.op == "*":
                return mul(a, b)
            return f"({show_dim(a)}){node.op}({show_dim(b)})"
        raise self.error(node.pos, "expected a size (an integer, a const or a named dim)")

    def unify(self, t: A.TypeExpr, value: Value, scope: Scope, dims: dict[str, Dim], what: str,
              at: A.Pos | None = None) -> None:
        """Check `value` against annotation `t`, binding the annotation's named dims to the value's dims.

        A mismatch is reported at `at` (a call site) when given, else at the annotation.
        """
        where = at or t.pos
        dtype = self.dtype(t.dtype, t.pos)
        got = value.type
        want_rank = len(t.dims or [])
        if got.dtype != dtype or got.rank != want_rank:
            raise self.error(where, f"{what} expects {self.annot(t)}, got {show_type(got)}")
        for i, (node, actual) in enumerate(zip(t.dims or [], got.shape, strict=True)):
            if isinstance(node, A.Name) and node.id not in dims and not isinstance(
                    scope.lookup(node.id), Lit | DimRef):
                dims[node.id] = actual
                scope.names[node.id] = DimRef(node.id, actual)
                continue
            want = self.dim(node, scope, dims)
            if want is not None and actual is not None and not same(want, actual):
                raise self.error(where, f"{what} expects {self.annot(t)}, got {show_type(got)} "
                                        f"(dim {i}: {show_dim(want)} vs {show_dim(actual)})")

    def annot(self, t: A.TypeExpr) -> str:
        if t.dims is None:
            return t.dtype
        return f"{t.dtype}[{', '.join(_text(d) for d in t.dims)}]"

    def current_prefix(self) -> str:
        """Dotted weight-name prefix of the model being lowered (`Layer.1.`), empty at the top."""
        return self.prefixes[-1] if self.prefixes else ""

    # ---- models ----------------------------------------------------------------------------------------
    def inline_model(self, model: A.Model, prefix: str, args: list[Value], pos: A.Pos,
                     dims: dict[str, Dim] | None = None, scope: Scope | None = None) -> Any:
        """Lower `model`'s body with `args` bound to its inputs and its weights named under `prefix`."""
        if model.name in self.call_stack:
            raise self.error(pos, f"model '{model.name}' calls itself (through {' -> '.join(self.call_stack)})")
        if len(args) != len(model.args):
            raise self.error(pos, f"model '{model.name}' takes {len(model.args)} inputs, got {len(args)}")
        scope = scope or Scope(self.globals)
        dims = {} if dims is None else dims
        for a, v in zip(model.args, args, strict=True):
            if a.name not in scope.names or scope.names[a.name] is not v:
                self.unify(a.type, v, scope, dims, f"input '{a.name}' of model '{model.name}' (line {a.pos.line})",
                           at=pos)
            scope.names[a.name] = v
        self.call_stack.append(model.name)
        self.prefixes.append(prefix)
        try:
            results = self.body(model, prefix, scope, dims)
        finally:
            self.call_stack.pop()
            self.prefixes.pop()
        if results is POISON:
            return POISON
        if len(results) != len(model.returns):
            raise self.error(model.pos, f"model '{model.name}' declares {len(model.returns)} results but returns "
                                        f"{len(results)}")
        for t, v in zip(model.returns, results, strict=True):
            if isinstance(v, Value):
                self.unify(t, v, scope, dims, f"the result of model '{model.name}'")
        return results

    def body(self, model: A.Model, prefix: str, scope: Scope, dims: dict[str, Dim]) -> Any:
        returned: Any = None
        for stmt in model.body.stmts:
            if returned is not None:
                self.report(self.error(stmt.pos, "statement after 'return' is never run"))
                break
            if isinstance(stmt, A.Return):
                returned = self.guarded(lambda s=stmt: [self.as_tensor(self.expr(v, scope), None, v.pos)
                                                        for v in s.values])
            else:
                self.statement(stmt, scope, prefix, dims)
        if returned is None:
            self.report(self.error(model.pos, f"model '{model.name}' has no 'return'"))
            return POISON
        return returned

    def statement(self, stmt: A.Node, scope: Scope, prefix: str, dims: dict[str, Dim]) -> None:
        if isinstance(stmt, A.Param):
            value = self.guarded(lambda: self.param(stmt, scope, prefix, dims))
            scope.names[stmt.name] = value
        elif isinstance(stmt, A.Assign):
            value = self.guarded(lambda: self.assign_value(stmt, scope))
            for i, name in enumerate(stmt.targets):
                scope.names[name] = POISON if value is POISON else (value[i] if len(stmt.targets) > 1 else value)
        elif isinstance(stmt, A.For):
            bounds = self.guarded(lambda: (self.int_value(stmt.lo, scope), self.int_value(stmt.hi, scope)))
            if bounds is POISON:
                return
            for i in range(*bounds):
                scope.names[stmt.var] = Lit(i)
                for s in stmt.body.stmts:
                    if isinstance(s, A.Return):
                        self.report(self.error(s.pos, "'return' inside a 'for' loop is not allowed"))
                        continue
                    self.statement(s, scope, prefix, dims)
        elif isinstance(stmt, A.ExprStmt):
            self.report(self.error(stmt.pos, "this expression's value is not used (assign it, or return it)"))

    def assign_value(self, stmt: A.Assign, scope: Scope) -> Any:
        value = self.expr(stmt.value, scope)
        n = len(stmt.targets)
        if n > 1:
            if not isinstance(value, tuple):
                raise self.error(stmt.pos, f"cannot unpack one value into {n} names")
            if len(value) != n:
                raise self.error(stmt.pos, f"cannot unpack {len(value)} values into {n} names")
        elif isinstance(value, tuple):
            raise self.error(stmt.pos, f"this expression gives {len(value)} values; unpack them: "
                                       f"{', '.join(['a', 'b', 'c', 'd'][:len(value)])} = ...")
        return value

    def param(self, stmt: A.Param, scope: Scope, prefix: str, dims: dict[str, Dim]) -> Value:
        name = prefix + stmt.name
        t = self.type_of(stmt.type, scope, dims)
        layout = self.layout(stmt.layout, scope, dims, t) if stmt.layout else None
        if name in self.params:
            have = self.params[name]
            if have.type.without_layout() != t:
                raise self.error(stmt.pos, f"weight '{name}' is used as {show_type(t)} here but as "
                                           f"{show_type(have.type)} before")
            return have
        loc = location(self.file, stmt.pos)
        op = D.func.ParamOp([], [t], {"name": name}, loc=loc)
        value = op.result
        value.name_hint = name.replace(".", "_")
        index = sum(1 for o in self.param_block.ops if o.NAME in ("func.param", "sparse.convert"))
        self.param_block.insert(index, op)
        if layout is not None:
            conv = D.sparse.ConvertOp.build(value, layout=layout.kind, block=layout.params, loc=loc)
            self.param_block.insert(index + 1, conv)
            value = conv.result
        self.params[name] = value
        return value

    def layout(self, node: A.Layout, scope: Scope, dims: dict[str, Dim], t: TensorType) -> Layout:
        if node.kind not in ("bsr", "nm"):
            raise self.error(node.pos, f"unknown sparse layout '{node.kind}'; expected bsr(R, C) or nm(N, M)")
        params = [self.int_value(p, scope) for p in node.params]
        if len(params) != 2 or min(params) < 1:
            raise self.error(node.pos, f"sparse {node.kind}(...) takes two positive integers")
        if t.rank != 2:
            raise self.error(node.pos, f"a sparse layout needs a 2-D weight, got {show_type(t)}")
        layout = Layout(node.kind, (params[0], params[1]))
        steps = params if node.kind == "bsr" else [params[1], 1]
        if node.kind == "nm" and params[0] > params[1]:
            raise self.error(node.pos, f"nm({params[0]}, {params[1]}) needs N <= M")
        for axis, (d, s) in enumerate(zip(t.shape, steps, strict=True)):
            if isinstance(d, int) and d % s:
                raise self.error(node.pos, f"dim {axis} of {show_type(t)} ({d}) is not a multiple of {s} "
                                           f"required by sparse {node.kind}({params[0]}, {params[1]})")
        return layout

    def int_value(self, node: A.Node, scope: Scope) -> int:
        v = self.expr(node, scope)
        if isinstance(v, DimRef) and isinstance(v.dim, int):
            return v.dim
        if not isinstance(v, Lit) or v.kind != "int":
            raise self.error(node.pos, "expected an integer known at compile time")
        return v.value

    # ---- expressions -----------------------------------------------------------------------------------
    def expr(self, node: A.Node, scope: Scope) -> Any:
        """Lower an expression: a Value, a Lit, a tuple of Values, or a reference (model, mask, dim)."""
        from sparsa.frontend import builtins, expressions

        if isinstance(node, A.Num | A.Bool):
            return Lit(node.value)
        if isinstance(node, A.Name):
            return self.name(node, scope)
        lower = {A.BinOp: expressions.binop, A.Compare: expressions.compare, A.Unary: expressions.unary,
                 A.Index: expressions.index, A.Attribute: expressions.attribute, A.Call: builtins.call}.get(type(node))
        if lower is not None:
            return lower(self, node, scope)
        if isinstance(node, A.Lambda):
            return LambdaRef(node)
        if isinstance(node, A.NoneLit):
            raise self.error(node.pos, "'none' is only allowed as an index (x[..., None]) or an argument default")
        if isinstance(node, A.ListLit):
            raise self.error(node.pos, "a list is only allowed as an argument (shapes, permutations, sizes)")
        raise self.error(node.pos, f"unexpected {type(node).__name__}")

    def name(self, node: A.Name, scope: Scope) -> Any:
        found = scope.lookup(node.id)
        if found is POISON:
            raise Poisoned()
        if found is not None:
            return found
        from sparsa.frontend.builtins import BUILTINS

        if node.id in BUILTINS:
            raise self.error(node.pos, f"'{node.id}' is a function; call it: {node.id}(...)")
        near = difflib.get_close_matches(node.id, sorted(scope.all_names() | set(BUILTINS)), n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise self.error(node.pos, f"unknown name '{node.id}'{hint}")

    def tensor(self, node: A.Node, scope: Scope, what: str = "a tensor") -> Value:
        """Lower `node` and insist on a tensor (literals are not accepted)."""
        v = self.expr(node, scope)
        if not isinstance(v, Value):
            raise self.error(node.pos, f"expected {what}, got {describe(v)}")
        return v

    def as_tensor(self, v: Any, like: str | None, pos: A.Pos) -> Value:
        """A Value for `v`: literals become rank-0 constants of element type `like` (or their own kind)."""
        if isinstance(v, Value):
            return v
        if isinstance(v, Lit):
            dtype = like or {"bool": "i1", "int": "i64", "float": "f32"}[v.kind]
            if v.kind == "bool" and dtype != "i1" or v.kind != "bool" and dtype == "i1":
                raise self.error(pos, f"booleans only meet booleans, not {v.kind}s")
            value = v.value
            if is_int(dtype) and isinstance(value, float):
                if not value.is_integer():
                    raise self.error(pos, f"{value} does not fit integer type {dtype}")
                value = int(value)
            return self.emit(D.tensor.ConstantOp, pos, value=value, result_types=[TensorType(dtype, ())])
        if isinstance(v, DimRef):
            if isinstance(v.dim, int):
                return self.as_tensor(Lit(v.dim), like, pos)
            raise self.error(pos, f"size '{v.name}' is symbolic; use it in shapes or iota({v.name}), not as a value")
        raise self.error(pos, f"expected a tensor, got {describe(v)}")

    def emit(self, cls: type[Operation], pos: A.Pos, *operands: Any, result_types: list | None = None,
             regions: list[Region] | None = None, **attrs: Any) -> Any:
        """Build an op at the insertion point with the node's location; returns its result(s)."""
        try:
            op = cls.build(*operands, loc=location(self.file, pos), result_types=result_types,
                           regions=regions or [], **attrs)
            op.verify()
        except SparsaError as e:
            message = e.message.split(" op ", 1)[1] if e.message.startswith("'") else e.message
            raise self.error(pos, f"{cls.NAME.split('.')[-1]}: {message}") from None
        self.block.append(op)
        return op.results[0] if len(op.results) == 1 else tuple(op.results)

    def cast(self, v: Value, dtype: str, pos: A.Pos) -> Value:
        return v if v.type.dtype == dtype else self.emit(D.tensor.CastOp, pos, v, to=dtype)

    def unify_dtypes(self, a: Any, b: Any, pos: A.Pos) -> tuple[Value, Value]:
        """Two operands made tensors of one element type, by the language's mixing rules."""
        if isinstance(a, Value) and isinstance(b, Value):
            if (a.type.dtype == "i1") != (b.type.dtype == "i1"):
                raise self.error(pos, f"booleans only meet booleans: {show_type(a.type)} and {show_type(b.type)}")
            dt = promote(a.type.dtype, b.type.dtype)
            return self.cast(a, dt, pos), self.cast(b, dt, pos)
        if isinstance(a, Value) or isinstance(b, Value):
            t, lit = (a, b) if isinstance(a, Value) else (b, a)
            if not isinstance(lit, Lit):
                lit = self.as_tensor(lit, None, pos) if isinstance(lit, DimRef) else lit
            if isinstance(lit, Value):
                return self.unify_dtypes(a if isinstance(a, Value) else lit, b if isinstance(b, Value) else lit, pos)
            dt = t.type.dtype
            if lit.kind == "float" and not is_float(dt):
                if dt == "i1":
                    raise self.error(pos, f"booleans only meet booleans, not {show_type(t.type)} and a float")
                t = self.cast(t, "f32", pos)
                dt = "f32"
            const = self.as_tensor(lit, dt, pos)
            return (t, const) if isinstance(a, Value) else (const, t)
        raise self.error(pos, "expected at least one tensor")

    def check_broadcast(self, a: TensorType, b: TensorType, pos: A.Pos) -> None:
        rank = max(a.rank, b.rank)
        sa, sb = (1,) * (rank - a.rank) + a.shape, (1,) * (rank - b.rank) + b.shape
        for i, (x, y) in enumerate(zip(sa, sb, strict=True)):
            try:
                broadcast(x, y)
            except ValueError:
                raise self.error(pos, f"shapes {show_type(a)} and {show_type(b)} do not broadcast "
                                      f"(dim {i - rank}: {show_dim(x)} vs {show_dim(y)})") from None


def describe(v: Any) -> str:
    if isinstance(v, Lit):
        return f"the {v.kind} {v.value}"
    if isinstance(v, tuple):
        return f"{len(v)} values"
    if isinstance(v, ModelRef):
        return f"model '{v.model.name}'"
    if isinstance(v, FnRef):
        return f"{v.fn.kind} '{v.fn.name}'"
    if isinstance(v, DimRef):
        return f"size '{v.name}'"
    if isinstance(v, LambdaRef):
        return "a lambda"
    return type(v).__name__


def _text(node: A.Node) -> str:
    if isinstance(node, A.Num):
        return str(node.value)
    if isinstance(node, A.Name):
        return node.id
    if isinstance(node, A.BinOp):
        return f"{_text(node.lhs)} {node.op} {_text(node.rhs)}"
    return "?"


def lower_program(defs: list[A.Node], file: str, source: str, model: str | None) -> tuple[Module, str]:
    """Check every model of the program, then lower `model` (default: the last one) to a module."""
    lowerer = Lowerer(defs, file, source)
    if not lowerer.models:
        lowerer.report(FrontendError("the file defines no model", location(file, A.Pos(1, 1)), source))
        raise CompileErrors(lowerer.errors)
    names = list(lowerer.models)
    chosen = model or names[-1]
    if chosen not in lowerer.models:
        raise SparsaError(f"no model '{chosen}' in {file} (it has: {', '.join(names)})")
    from sparsa.frontend.regions import check_functions

    check_functions(lowerer)
    func = None
    for name in [n for n in names if n != chosen] + [chosen]:
        func = lowerer.lower_model(name)
    if lowerer.errors:
        raise CompileErrors(lowerer.errors)
    return Module([func]), chosen


