"""AST of the `.sp` language: one node class per grammar rule, each carrying its source position."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pos:
    """1-based line and column of a node's first character."""

    line: int
    col: int


@dataclass
class Node:
    pos: Pos = field(repr=False, compare=False)


# ---- expressions --------------------------------------------------------------------------------
@dataclass
class Num(Node):
    value: int | float


@dataclass
class Bool(Node):
    value: bool


@dataclass
class NoneLit(Node):
    pass


@dataclass
class Name(Node):
    id: str


@dataclass
class BinOp(Node):
    op: str  # + - * / // % ** @ and or
    lhs: Node
    rhs: Node


@dataclass
class Compare(Node):
    op: str  # == != < <= > >=
    lhs: Node
    rhs: Node


@dataclass
class Unary(Node):
    op: str  # - + not
    x: Node


@dataclass
class Slice(Node):
    start: Node | None
    stop: Node | None
    step: Node | None


@dataclass
class EllipsisLit(Node):
    pass


@dataclass
class Index(Node):
    base: Node
    items: list[Node]


@dataclass
class Arg(Node):
    name: str | None
    value: Node


@dataclass
class Lambda(Node):
    params: list[str]
    body: Node | Block


@dataclass
class Call(Node):
    func: Node
    args: list[Arg]
    block: Lambda | None = None


@dataclass
class Attribute(Node):
    base: Node
    name: str


@dataclass
class ListLit(Node):
    items: list[Node]


# ---- types and statements ------------------------------------------------------------------------
@dataclass
class TypeExpr(Node):
    dtype: str
    dims: list[Node] | None  # None: a scalar


@dataclass
class Layout(Node):
    kind: str
    params: list[Node]


@dataclass
class Param(Node):
    name: str
    type: TypeExpr
    layout: Layout | None


@dataclass
class Assign(Node):
    targets: list[str]
    value: Node


@dataclass
class For(Node):
    var: str
    lo: Node
    hi: Node
    body: Block


@dataclass
class Return(Node):
    values: list[Node]


@dataclass
class ExprStmt(Node):
    value: Node


@dataclass
class Block(Node):
    stmts: list[Node]


# ---- definitions ---------------------------------------------------------------------------------
@dataclass
class Const(Node):
    name: str
    value: Node


@dataclass
class DataParam(Node):
    name: str
    type: TypeExpr


@dataclass
class MaskDef(Node):
    """A `mask` (yields a boolean) or `score` (yields a new score) function over attention indices."""

    kind: str  # "mask" | "score"
    name: str
    params: list[str]
    data: list[DataParam]
    body: Node


@dataclass
class ModelArg(Node):
    name: str
    type: TypeExpr


@dataclass
class Model(Node):
    name: str
    args: list[ModelArg]
    returns: list[TypeExpr]
    body: Block


@dataclass
class Program(Node):
    consts: list[Const]
    functions: dict[str, MaskDef]
    models: dict[str, Model]
    order: list[Node]  # definitions in file order
