"""IR core: values, operations declared by typed fields, blocks, regions, modules, the op registry."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from sparsa.ir.attrs import AttrKind
from sparsa.ir.diagnostics import Location, VerifyError
from sparsa.ir.types import TensorType

# op name -> class; filled once at import time by `Operation.__init_subclass__`.
OP_REGISTRY: dict[str, type[Operation]] = {}


class Value:
    """An SSA value: the result of an operation or an argument of a block."""

    __slots__ = ("type", "name_hint", "owner", "index", "uses")

    def __init__(self, type: TensorType, owner: Operation | Block | None = None, index: int = 0,
                 name_hint: str | None = None):
        self.type = type
        self.owner = owner
        self.index = index
        self.name_hint = name_hint
        self.uses: list[Use] = []

    @property
    def defining_op(self) -> Operation | None:
        return self.owner if isinstance(self.owner, Operation) else None

    def replace_all_uses_with(self, other: Value) -> None:
        for use in list(self.uses):
            use.op.set_operand(use.index, other)

    def __repr__(self) -> str:
        return f"<Value {self.name_hint or '?'}: {self.type}>"


@dataclass(eq=False)
class Use:
    """One operand slot of `op` that reads a value."""

    op: Operation
    index: int


class Operand:
    """Declares a named operand (or a variadic / optional group) of an op class."""

    def __init__(self, variadic: bool = False, optional: bool = False):
        self.variadic = variadic
        self.optional = optional
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, op: Operation | None, owner: type) -> Any:
        if op is None:
            return self
        lo, hi = op.operand_segment(self.name)
        if self.variadic:
            return op.operands[lo:hi]
        if self.optional:
            return op.operands[lo] if hi > lo else None
        return op.operands[lo]


class Result:
    """Declares a named result (or a variadic group) of an op class."""

    def __init__(self, variadic: bool = False):
        self.variadic = variadic
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, op: Operation | None, owner: type) -> Any:
        if op is None:
            return self
        fields = type(op).result_fields
        if self.variadic:
            fixed = len(fields) - 1
            lo = [f.name for f in fields].index(self.name)
            return op.results[lo : len(op.results) - (fixed - lo)]
        return op.results[[f.name for f in fields].index(self.name)]


class Attr:
    """Declares a typed attribute of an op class; `default` makes it optional (not printed when equal)."""

    REQUIRED: ClassVar[object] = object()

    def __init__(self, kind: AttrKind, default: Any = REQUIRED):
        self.kind = kind
        self.default = default
        self.name = ""

    @property
    def required(self) -> bool:
        return self.default is Attr.REQUIRED

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, op: Operation | None, owner: type) -> Any:
        if op is None:
            return self
        return op.attributes.get(self.name, None if self.required else self.default)


class RegionField:
    """Declares a named region of an op class; an optional region may be empty (no blocks)."""

    def __init__(self, optional: bool = False):
        self.optional = optional
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, op: Operation | None, owner: type) -> Any:
        if op is None:
            return self
        return op.regions[[f.name for f in type(op).region_fields].index(self.name)]


class Block:
    """A list of operations with typed arguments; the last op of a region's block is its terminator."""

    def __init__(self, arg_types: Sequence[TensorType] = (), arg_names: Sequence[str | None] = ()):
        names = list(arg_names) + [None] * (len(arg_types) - len(arg_names))
        self.args = [Value(t, self, i, n) for i, (t, n) in enumerate(zip(arg_types, names, strict=True))]
        self.ops: list[Operation] = []
        self.parent: Region | None = None

    def append(self, op: Operation) -> Operation:
        op.parent = self
        self.ops.append(op)
        return op

    def insert(self, index: int, op: Operation) -> Operation:
        op.parent = self
        self.ops.insert(index, op)
        return op

    @property
    def terminator(self) -> Operation | None:
        return self.ops[-1] if self.ops else None


class Region:
    """A list of blocks owned by an operation (Sparsa uses single-block regions)."""

    def __init__(self, blocks: Sequence[Block] = ()):
        self.blocks: list[Block] = []
        self.parent: Operation | None = None
        for b in blocks:
            self.add_block(b)

    def add_block(self, block: Block) -> Block:
        block.parent = self
        self.blocks.append(block)
        return block

    @property
    def block(self) -> Block:
        return self.blocks[0]

    @property
    def empty(self) -> bool:
        return not self.blocks


class Operation:
    """Base of every op. Subclasses declare NAME, fields, a docstring, infer(), verify(), reference()."""

    NAME: ClassVar[str] = ""
    PURE: ClassVar[bool] = True
    TERMINATOR: ClassVar[bool] = False
    # Structural ops (function, parameter, terminators) are run by the interpreter itself; every
    # other op defines `reference(self, ctx, *args)`: NumPy arrays in, an array or tuple out.
    STRUCTURAL: ClassVar[bool] = False
    # its regions read only their arguments and what they make (a fused scan's), never a value from outside
    ISOLATED: ClassVar[bool] = False
    operand_fields: ClassVar[list[Operand]] = []
    result_fields: ClassVar[list[Result]] = []
    attr_fields: ClassVar[list[Attr]] = []
    region_fields: ClassVar[list[RegionField]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = {k: v for base in reversed(cls.__mro__) for k, v in vars(base).items()}
        cls.operand_fields = [v for v in fields.values() if isinstance(v, Operand)]
        cls.result_fields = [v for v in fields.values() if isinstance(v, Result)]
        cls.attr_fields = [v for v in fields.values() if isinstance(v, Attr)]
        cls.region_fields = [v for v in fields.values() if isinstance(v, RegionField)]
        for group in (cls.operand_fields, cls.result_fields):
            if sum(1 for f in group if getattr(f, "variadic", False) or getattr(f, "optional", False)) > 1:
                raise TypeError(f"{cls.__name__}: at most one variadic or optional group per kind")
        if cls.NAME:
            if cls.NAME in OP_REGISTRY:
                raise TypeError(f"op {cls.NAME} registered twice")
            if not (cls.__doc__ or "").strip():
                raise TypeError(f"op {cls.NAME} needs a one-line docstring")
            OP_REGISTRY[cls.NAME] = cls

    def __init__(self, operands: Sequence[Value] = (), result_types: Sequence[TensorType] = (),
                 attributes: dict[str, Any] | None = None, regions: Sequence[Region] = (),
                 loc: Location | None = None):
        self.operands: list[Value] = []
        self.results = [Value(t, self, i) for i, t in enumerate(result_types)]
        self.attributes: dict[str, Any] = {}
        self.regions: list[Region] = []
        self.loc = loc
        # Where the op was read from a .sir file (not printed): verifier errors point there first.
        self.text_loc: Location | None = None
        self.parent: Block | None = None
        for v in operands:
            self._add_use(v, len(self.operands))
            self.operands.append(v)
        for name, value in (attributes or {}).items():
            field = self.attr_field(name)
            if field is not None and not field.required and value == field.default:
                continue
            self.attributes[name] = value
        for r in regions:
            r.parent = self
            self.regions.append(r)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, *operands: Value | Sequence[Value] | None, loc: Location | None = None,
              regions: Sequence[Region] = (), result_types: Sequence[TensorType] | None = None,
              **attrs: Any) -> Operation:
        """Create the op from operands (a list for a variadic group) and attributes.

        Result types are inferred, except for ops whose result type is the point of the op
        (`func.param`, `tensor.constant`, `tensor.iota`), which take `result_types`.
        """
        flat: list[Value] = []
        for o in operands:
            if o is None:
                continue
            flat.extend(o) if isinstance(o, list | tuple) else flat.append(o)
        for f in cls.attr_fields:
            if f.name not in attrs and not f.required:
                attrs[f.name] = f.default
        regs = list(regions)
        while len(regs) < len(cls.region_fields):
            regs.append(Region())
        op = cls(flat, (), attrs, regs, loc)
        for i, t in enumerate(op.infer() if result_types is None else result_types):
            op.results.append(Value(t, op, i))
        return op

    @classmethod
    def attr_field(cls, name: str) -> Attr | None:
        return next((f for f in cls.attr_fields if f.name == name), None)

    # ---- structure ----------------------------------------------------------------------------
    def operand_segment(self, name: str) -> tuple[int, int]:
        """[lo, hi) of operand field `name` in `self.operands`, given one variadic/optional group."""
        fields = type(self).operand_fields
        names = [f.name for f in fields]
        i = names.index(name)
        extra = len(self.operands) - sum(1 for f in fields if not (f.variadic or f.optional))
        lo = 0
        for f in fields[:i]:
            lo += extra if (f.variadic or f.optional) else 1
        return lo, lo + (extra if (fields[i].variadic or fields[i].optional) else 1)

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"{self.NAME} has {len(self.results)} results, not one")
        return self.results[0]

    def set_operand(self, index: int, value: Value) -> None:
        old = self.operands[index]
        old.uses = [u for u in old.uses if not (u.op is self and u.index == index)]
        self.operands[index] = value
        self._add_use(value, index)

    def _add_use(self, value: Value, index: int) -> None:
        value.uses.append(Use(self, index))

    def drop_uses(self) -> None:
        """Unlink this op (and the ops nested in its regions) from the values they read."""
        for op in self.walk():
            for v in op.operands:
                v.uses = [u for u in v.uses if u.op is not op]

    def erase(self) -> None:
        """Remove from the parent block; the op's results must be unused."""
        self.drop_uses()
        if self.parent is not None:
            self.parent.ops.remove(self)
            self.parent = None

    def walk(self) -> Iterator[Operation]:
        """This op, then every op nested in its regions, in order."""
        yield self
        for r in self.regions:
            for b in r.blocks:
                for op in list(b.ops):
                    yield from op.walk()

    @property
    def parent_op(self) -> Operation | None:
        if self.parent is None or self.parent.parent is None:
            return None
        return self.parent.parent.parent

    # ---- semantics hooks --------------------------------------------------------------------------
    def infer(self) -> list[TensorType]:
        """Result types from operand types and attributes."""
        return [r.type for r in self.results]

    def verify(self) -> None:
        """Op-specific invariants beyond what the fields and infer() check; raise VerifyError."""

    def result_shapes(self, ctx: Any, operands: Sequence[Any]) -> list[tuple[int, ...]]:
        """The shapes of the results in one call, given the operands' arrays (only shapes and dtypes are
        read) and `ctx` (the interpreter's `shape_of` for the dims the signature binds). Dims unknown at compile
        time (a slice to a computed stop, say) come from `shape_rule`, else from the reference semantics run
        on stand-ins of the operands (no data, stride 0)."""
        types = [r.type for r in self.results]
        if all(None not in t.shape for t in types):
            return [ctx.shape_of(t) for t in types]
        shapes = self.shape_rule([tuple(a.shape) for a in operands])
        if shapes is not None:
            return shapes
        import numpy as np

        dummies = [np.lib.stride_tricks.as_strided(np.zeros(1, a.dtype), a.shape, [0] * a.ndim) for a in operands]
        outs = self.reference(ctx, *dummies)
        return [np.shape(o) for o in (outs if isinstance(outs, tuple) else (outs,))]

    def interval(self, n: Any, *args: Any) -> Any:
        """Bounds of the result over a whole tile from bounds of the operands (`ir.intervals.Interval`s), for
        block-map analysis of masks, built with the namespace `n` (`ir.intervals.NumpyBounds` on arrays of all
        tiles, the cpu backend's as native code; `n.gather` bounds the data a mask reads). None: no bound."""
        return None

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Any:
        """An `ir.analysis.Cost` of one execution on arrays `args` giving `outs` (for `sparsa explain`): by
        default one operation per element produced."""
        from sparsa.ir.analysis import Cost

        size = float(sum(getattr(o, "size", 0) for o in outs))
        return Cost(size, size)

    def per_shape(self) -> bool:
        """Whether the results depend on the call's dims alone (no operand's data): a host computes them once per
        set of shapes (a block map of a mask over positions only)."""
        return False

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]] | None:
        """The results' shapes from the operands' concrete shapes, where the op has a rule cheaper than
        running its reference (None: no rule)."""
        return None

    def error(self, message: str) -> VerifyError:
        return VerifyError(f"'{self.NAME}' op {message}", self.text_loc or self.loc)


@dataclass(eq=False)
class Module:
    """A translation unit: an ordered list of `func.func` operations."""

    funcs: list[Operation]

    def lookup(self, name: str) -> Operation:
        for f in self.funcs:
            if f.attributes.get("sym_name") == name:
                return f
        raise KeyError(name)

    def walk(self) -> Iterator[Operation]:
        for f in self.funcs:
            yield from f.walk()

    def __str__(self) -> str:
        from sparsa.ir.printer import print_module

        return print_module(self)
