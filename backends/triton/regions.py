"""Regions (attention masks and scores, MoE epilogues) as inline Triton code, one line per IR op."""

from __future__ import annotations

from sparsa.backends.table import LoweringTable
from sparsa.ir.core import Operation, Region, Value
from sparsa.ir.diagnostics import SparsaError
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.types import is_float


def _pow(a: str, exponent: Value, b: str) -> str:
    """a ** b: small integer and half exponents exactly (any sign of a), else exp(b * log(a)) (a > 0)."""
    op = exponent.defining_op
    if isinstance(op, T.ConstantOp) and not isinstance(op.value, bool):
        if op.value == 0.5:
            return f"tl.sqrt({a})"
        if float(op.value).is_integer() and 0 <= op.value <= 4:
            return "(" + " * ".join([a] * int(op.value)) + ")" if op.value else f"({a} * 0 + 1)"
    return f"tl.exp({b} * tl.log({a}))"


def python_floordiv(a: str, b: str) -> str:
    """Python's // on integers (Triton's // truncates toward zero)."""
    return f"(({a}) // ({b}) - ((({a}) % ({b}) != 0) & ((({a}) < 0) != (({b}) < 0))).to(tl.int64))"


def python_mod(a: str, b: str) -> str:
    """Python's % on integers (the sign of the divisor)."""
    return f"((({a}) % ({b}) + ({b})) % ({b}))"


class ExprEmitter:
    """Triton expressions for IR ops whose operands already have names (`names`: value id -> expression).

    `data` maps each outer value read by gathers (mask data tensors) to the kernel argument holding its
    pointer; a gather becomes a masked `tl.load` of that pointer at the (clamped) flat index.
    """

    def __init__(self, names: dict[int, str], data: dict[int, tuple[str, Value]], prefix: str):
        self.names = names
        self.data = data
        self.prefix = prefix
        self.lines: list[str] = []

    def emit_ops(self, ops: list) -> None:
        """Append one line per op (its name, its expression, the op and its `.sp` line) and name its result."""
        for op in ops:
            name = f"{self.prefix}{len(self.lines)}"
            self.lines.append(f"{name} = {self.expr(op)}  # {op.NAME}" + (f" @ {op.loc.short()}" if op.loc else ""))
            self.names[id(op.results[0])] = name


    def value(self, v: Value) -> str:
        if id(v) in self.names:
            return self.names[id(v)]
        if v.type.rank == 0 and id(v) in self.data:  # a 0-d value from outside (a length): one load
            return f"tl.load({self.data[id(v)][0]})"
        if v.type.rank == 1 and id(v) in self.data:  # a vector from outside (a bias): one value per column
            ptr, _ = self.data[id(v)]
            return f"tl.load({ptr} + offs_n, mask=offs_n < {ptr}_d0, other=0.0)[None, :]"
        raise SparsaError(f"the triton backend cannot read {v.type} from outside the region here")

    def expr(self, op: Operation) -> str:
        """op's Triton expression, by its SCALARS rule."""
        rule = SCALARS.find(op)
        if rule is None:
            raise SparsaError(f"'{op.NAME}' is not supported by the triton backend inside a region", op.loc)
        return rule(self, op)

    def operands(self, op: Operation) -> list[str]:
        """The expressions of op's operands."""
        return [self.value(v) for v in op.operands]


class RegionEmitter(ExprEmitter):
    """Emits `lines` computing a region's yielded value from names bound to its block arguments."""

    def __init__(self, region: Region, args: list[str], data: dict[int, tuple[str, Value]], prefix: str):
        super().__init__({id(a): n for a, n in zip(region.block.args, args, strict=True)}, data, prefix)
        self.region = region

    def emit(self) -> str:
        """The expression (a name) holding the region's (first) value after `self.lines`."""
        return self.emit_values()[0]

    def emit_values(self) -> list[str]:
        """The names holding every value the region yields, after `self.lines`."""
        ops = self.region.block.ops
        if not ops or not ops[-1].TERMINATOR:
            raise SparsaError("region has no terminator")
        self.emit_ops(ops[:-1])
        return [self.value(v) for v in ops[-1].operands]


# ---- scalar rules: one Triton expression per elementwise op class (and gathers of region data) ----------------
SCALARS = LoweringTable("triton scalar rules")


def _template(cls: type, text: str) -> None:
    """A rule that formats `text` with the operands' expressions ({x}, or {a} and {b})."""

    def rule(em: ExprEmitter, op: Operation) -> str:
        args = em.operands(op)
        return text.format(**dict(zip(("x",) if len(args) == 1 else ("a", "b", "c"), args, strict=False)))

    SCALARS.lowers(cls)(rule)


for _cls, _text in {
    T.AddOp: "({a} + {b})", T.SubOp: "({a} - {b})", T.MulOp: "({a} * {b})", T.DivOp: "({a} / {b})",
    T.MinimumOp: "tl.minimum({a}, {b})", T.MaximumOp: "tl.maximum({a}, {b})", T.AndOp: "({a} & {b})",
    T.OrOp: "({a} | {b})", T.NegOp: "(-{x})", T.AbsOp: "tl.abs({x})", T.ExpOp: "tl.exp({x})",
    T.LogOp: "tl.log({x})", T.SqrtOp: "tl.sqrt({x})", T.NotOp: "({x} == 0)", T.SigmoidOp: "tl.sigmoid({x})",
    T.TanhOp: "(2.0 * tl.sigmoid(2.0 * {x}) - 1.0)", T.ReluOp: "tl.maximum({x}, 0)",
    T.SiluOp: "({x} * tl.sigmoid({x}))", T.RsqrtOp: "tl.rsqrt({x})", T.SinOp: "tl.sin({x})",
    T.CosOp: "tl.cos({x})", T.SoftplusOp: "tl.where({x} > 20.0, {x}, tl.log(1.0 + tl.exp({x})))",
    T.GeluTanhOp: ("(0.5 * {x} * (1.0 + (2.0 * tl.sigmoid(2.0 * (0.7978845608028654 * "
                   "({x} + 0.044715 * {x} * {x} * {x}))) - 1.0)))"),
    T.GeluOp: "(0.5 * {x} * (1.0 + tl.math.erf({x} * 0.7071067811865476)))",
    T.WhereOp: "tl.where({a}, {b}, {c})",
}.items():
    _template(_cls, _text)

_CMP = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_CAST = {"f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16", "f64": "tl.float64", "i8": "tl.int8",
         "i32": "tl.int32", "i64": "tl.int64", "i1": "tl.int1"}


@SCALARS.lowers(T.ConstantOp)
def _constant(em: ExprEmitter, op: Operation) -> str:
    v = op.value
    return ("1" if v else "0") if isinstance(v, bool) else ("float('-inf')" if v == float("-inf") else repr(v))


@SCALARS.lowers(T.CmpOp)
def _cmp(em: ExprEmitter, op: Operation) -> str:
    a, b = em.operands(op)
    return f"({a} {_CMP[op.pred]} {b})"


@SCALARS.lowers(T.CastOp)
def _cast(em: ExprEmitter, op: Operation) -> str:
    (x,) = em.operands(op)
    return f"({x} != 0)" if op.to == "i1" else f"({x}).to({_CAST[op.to]})"


@SCALARS.lowers(T.FloorDivOp)
def _floordiv(em: ExprEmitter, op: Operation) -> str:
    a, b = em.operands(op)
    return f"tl.floor({a} / {b})" if is_float(op.result.type.dtype) else python_floordiv(a, b)


@SCALARS.lowers(T.ModOp)
def _mod(em: ExprEmitter, op: Operation) -> str:
    a, b = em.operands(op)
    return f"({a} - tl.floor({a} / {b}) * {b})" if is_float(op.result.type.dtype) else python_mod(a, b)


@SCALARS.lowers(T.PowOp)
def _pow_rule(em: ExprEmitter, op: Operation) -> str:
    a, b = em.operands(op)
    return _pow(a, op.rhs, b)


@SCALARS.lowers(S.GatherOp)
def _gather(em: ExprEmitter, op: Operation) -> str:
    """A gather of data from outside the region: a load at the (clamped) flat index."""
    if id(op.x) not in em.data:
        raise SparsaError("the triton backend reads only data from outside a region by index", op.loc)
    ptr, data = em.data[id(op.x)]
    dims = [f"{ptr}_d{i}" for i in range(data.type.rank)]
    flat = "0"
    for i, idx in enumerate(em.value(v) for v in op.indices):
        clamped = f"tl.minimum(tl.maximum({idx}, 0), {dims[i]} - 1)"
        flat = clamped if flat == "0" else f"({flat}) * {dims[i]} + {clamped}"
    return f"tl.load({ptr} + ({flat}))"
