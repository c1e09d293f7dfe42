"""Parser for the textual IR (`.sir`): the one grammar that reads back what the printer writes.

    module   := 'module' '{' func* '}' | func*
    func     := 'func.func' '@'NAME '(' (%v ':' type),* ')' '->' '(' type,* ')' ('attributes' attrs)? '{' op* '}' loc?
    op       := (%v,+ '=')? OPNAME '(' %v,* ')' ('(' region,+ ')')? attrs? ':' '(' type,* ')' '->' types loc?
    region   := '{' ('^'NAME '(' (%v ':' type),* ')' ':' op*)? '}'
    attrs    := '{' (NAME '=' literal),* '}'
    literal  := number | 'true' | 'false' | "string" | '[' literal,* ']' | '{' dim-expr '}' | '?' | NAME | type
    type     := 'tensor' '<' (dim 'x')* ELEMENT (',' '#bsr<' R 'x' C '>' | ',' '#nm<' N ':' M '>')? '>'
    loc      := 'loc' '(' "file" ':' LINE ':' COL ')'

Comments run from `//` to the end of the line.
"""

from __future__ import annotations

import re
from typing import Any

from sparsa.ir import dialects as _dialects  # noqa: F401  (registers every op)
from sparsa.ir.attrs import DimLiteral, Symbol
from sparsa.ir.core import OP_REGISTRY, Block, Module, Operation, Region, Value
from sparsa.ir.diagnostics import Location, ParseError
from sparsa.ir.dims import Dim, check_expr
from sparsa.ir.types import ELEMENT_TYPES, Layout, TensorType

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_VALUE = re.compile(r"%([A-Za-z_0-9][A-Za-z0-9_]*)")
_NUMBER = re.compile(r"-?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+|\d+|inf|nan)(?![A-Za-z0-9_])")
_INT = re.compile(r"\d+")


class Parser:
    """Recursive-descent parser over the raw text, with line/column tracking for errors."""

    def __init__(self, text: str, filename: str = "<sir>"):
        self.text = text
        self.file = filename
        self.pos = 0
        self.scopes: list[dict[str, Value]] = []

    # ---- scanning -------------------------------------------------------------------------------
    def loc(self, pos: int | None = None) -> Location:
        pos = self.pos if pos is None else pos
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return Location(self.file, line, col)

    def fail(self, message: str, pos: int | None = None) -> ParseError:
        return ParseError(message, self.loc(self.error_pos() if pos is None else pos), self.text)

    def error_pos(self) -> int:
        """Where to point for "expected X": right after the last token when X was due before a line break."""
        self.skip()
        p = self.pos
        while p > 0 and self.text[p - 1].isspace():
            p -= 1
        return p if "\n" in self.text[p : self.pos] else self.pos

    def skip(self) -> None:
        while True:
            while self.pos < len(self.text) and self.text[self.pos].isspace():
                self.pos += 1
            if self.text.startswith("//", self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
                continue
            return

    def peek(self, s: str) -> bool:
        self.skip()
        return self.text.startswith(s, self.pos)

    def accept(self, s: str) -> bool:
        if self.peek(s):
            self.pos += len(s)
            return True
        return False

    def expect(self, s: str, what: str | None = None) -> None:
        if not self.accept(s):
            raise self.fail(f"expected {what or repr(s)}, found {self.found()}")

    def found(self) -> str:
        self.skip()
        if self.pos >= len(self.text):
            return "end of input"
        m = re.compile(r"\S+").match(self.text, self.pos)
        return repr(m.group(0)[:20]) if m else "end of input"

    def match(self, pattern: re.Pattern[str], what: str) -> re.Match[str]:
        self.skip()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.fail(f"expected {what}, found {self.found()}")
        self.pos = m.end()
        return m

    # ---- values ---------------------------------------------------------------------------------
    def define(self, name: str, value: Value, pos: int) -> None:
        if any(name in s for s in self.scopes):
            raise self.fail(f"redefinition of %{name}", pos)
        self.scopes[-1][name] = value
        value.name_hint = None if name.isdigit() else name

    def use(self) -> Value:
        self.skip()
        start = self.pos
        name = self.match(_VALUE, "a value (%name)").group(1)
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise self.fail(f"use of undefined value %{name}", start)

    # ---- types ----------------------------------------------------------------------------------
    def type(self) -> TensorType:
        self.skip()
        start = self.pos
        if not self.accept("tensor"):
            raise self.fail(f"expected a type like tensor<4x?xf32>, found {self.found()}")
        if self.text[self.pos : self.pos + 1] != "<":
            raise self.fail("expected '<' after 'tensor'")
        self.pos += 1
        shape: list[Dim] = []
        while True:
            c = self.text[self.pos : self.pos + 1]
            if c.isdigit():
                shape.append(int(_INT.match(self.text, self.pos).group(0)))
                self.pos += len(str(shape[-1]))
            elif c == "?":
                shape.append(None)
                self.pos += 1
            elif c == "{":
                end = self.text.find("}", self.pos)
                if end < 0:
                    raise self.fail("unclosed '{' in a dim")
                expr = self.text[self.pos + 1 : end].strip()
                try:
                    check_expr(expr)
                except ValueError as e:
                    raise self.fail(str(e)) from None
                shape.append(expr)
                self.pos = end + 1
            else:
                break
            if self.text[self.pos : self.pos + 1] != "x":
                raise self.fail(f"expected 'x' after a dim, found {self.found()}")
            self.pos += 1
        m = re.compile(r"[a-z0-9]+").match(self.text, self.pos)
        dtype = m.group(0) if m else ""
        if dtype not in ELEMENT_TYPES:
            raise self.fail(f"expected an element type ({', '.join(ELEMENT_TYPES)}), found {dtype or self.found()}")
        self.pos = m.end()
        layout = self.layout() if self.accept(",") else None
        self.expect(">", "'>' closing the tensor type")
        try:
            return TensorType(dtype, tuple(shape), layout)
        except ValueError as e:
            raise self.fail(str(e), start) from None

    def layout(self) -> Layout:
        start = self.pos
        if self.accept("#bsr<"):
            m = self.match(re.compile(r"(\d+)x(\d+)>"), "block sizes like 32x32>")
            return Layout("bsr", (int(m.group(1)), int(m.group(2))))
        if self.accept("#nm<"):
            m = self.match(re.compile(r"(\d+):(\d+)>"), "a pattern like 2:4>")
            return Layout("nm", (int(m.group(1)), int(m.group(2))))
        raise self.fail("expected a layout (#bsr<RxC> or #nm<N:M>)", start)

    def type_list(self) -> list[TensorType]:
        self.expect("(")
        types: list[TensorType] = []
        if not self.accept(")"):
            types.append(self.type())
            while self.accept(","):
                types.append(self.type())
            self.expect(")", "')' closing the type list")
        return types

    # ---- attributes -----------------------------------------------------------------------------
    def literal(self) -> Any:
        self.skip()
        if self.accept("["):
            items: list[Any] = []
            if not self.accept("]"):
                items.append(self.literal())
                while self.accept(","):
                    items.append(self.literal())
                self.expect("]", "']' closing the list")
            return items
        if self.peek('"'):
            m = self.match(re.compile(r'"((?:[^"\\\n]|\\.)*)"'), "a string")
            return re.sub(r"\\(.)", r"\1", m.group(1))
        if self.accept("{"):
            end = self.text.find("}", self.pos)
            if end < 0:
                raise self.fail("unclosed '{' in a dim")
            expr = self.text[self.pos : end].strip()
            self.pos = end + 1
            return DimLiteral(expr)
        if self.accept("?"):
            return None
        if self.peek("tensor<"):
            return self.type()
        m = _NUMBER.match(self.text, self.pos)
        if m:
            self.pos = m.end()
            s = m.group(0)
            return float(s) if any(c in s for c in ".eEn") else int(s)
        word = self.match(re.compile(r"[A-Za-z_][A-Za-z0-9_]*"), "an attribute value").group(0)
        return {"true": True, "false": False}.get(word, Symbol(word))

    def attributes(self, cls: type[Operation]) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        if not self.accept("{"):
            return attrs
        if self.accept("}"):
            return attrs
        while True:
            self.skip()
            start = self.pos
            name = self.match(re.compile(r"[A-Za-z_][A-Za-z0-9_]*"), "an attribute name").group(0)
            field = cls.attr_field(name)
            if field is None:
                known = ", ".join(f.name for f in cls.attr_fields) or "none"
                raise self.fail(f"'{cls.NAME}' has no attribute '{name}' (it has: {known})", start)
            self.expect("=")
            self.skip()
            vstart = self.pos
            value = self.literal()
            try:
                attrs[name] = field.kind.coerce(value)
            except ValueError as e:
                raise self.fail(f"attribute '{name}' of '{cls.NAME}': {e}", vstart) from None
            if not self.accept(","):
                break
        self.expect("}", "'}' closing the attributes")
        return attrs

    def location(self) -> Location | None:
        if not self.accept("loc("):
            return None
        m = self.match(re.compile(r'"([^"\n]*)"\s*:\s*(\d+)\s*:\s*(\d+)\s*\)'), 'a location like "f.sp":3:9)')
        return Location(m.group(1), int(m.group(2)), int(m.group(3)))

    # ---- structure ------------------------------------------------------------------------------
    def module(self) -> Module:
        wrapped = self.accept("module")
        if wrapped:
            self.expect("{", "'{' opening the module")
        funcs = []
        while self.peek("func.func"):
            funcs.append(self.func())
        if wrapped:
            self.expect("}", "'}' closing the module, or another func.func")
        self.skip()
        if self.pos < len(self.text):
            raise self.fail(f"expected func.func or end of input, found {self.found()}")
        return Module(funcs)

    def func(self) -> Operation:
        self.skip()
        start = self.pos
        self.expect("func.func")
        name = self.match(re.compile(r"@([A-Za-z_][A-Za-z0-9_.]*)"), "a function name (@name)").group(1)
        self.scopes.append({})
        block = self.block_args()
        self.expect("->")
        results = self.type_list()
        extra = {}
        if self.accept("attributes"):  # MLIR's spelling of a function's other attributes
            extra = self.attributes(OP_REGISTRY["func.func"])
        self.expect("{", "'{' opening the function body")
        self.ops(block)
        self.expect("}", "'}' closing the function body, or an op")
        self.scopes.pop()
        loc = self.location()
        func = OP_REGISTRY["func.func"]([], [], {"sym_name": name, "result_types": tuple(results), **extra},
                                        [Region([block])], loc)
        func.text_loc = self.loc(start)
        return func

    def block_args(self) -> Block:
        self.expect("(")
        names: list[tuple[str, int]] = []
        types: list[TensorType] = []
        if not self.accept(")"):
            while True:
                self.skip()
                pos = self.pos
                names.append((self.match(_VALUE, "an argument (%name)").group(1), pos))
                self.expect(":")
                types.append(self.type())
                if not self.accept(","):
                    break
            self.expect(")", "')' closing the arguments")
        block = Block(types)
        for (n, pos), v in zip(names, block.args, strict=True):
            self.define(n, v, pos)
        return block

    def ops(self, block: Block) -> None:
        while not self.peek("}"):
            if self.pos >= len(self.text):
                raise self.fail("unexpected end of input inside a block")
            block.append(self.op())

    def op(self) -> Operation:
        self.skip()
        start = self.pos
        names: list[tuple[str, int]] = []
        if self.peek("%"):
            while True:
                self.skip()
                pos = self.pos
                names.append((self.match(_VALUE, "a result name").group(1), pos))
                if not self.accept(","):
                    break
            self.expect("=")
        self.skip()
        name_pos = self.pos
        opname = self.match(_IDENT, "an op name").group(0)
        cls = OP_REGISTRY.get(opname)
        if cls is None or opname == "func.func":
            raise self.fail(f"unknown op '{opname}'", name_pos)
        self.expect("(", "'(' opening the operands")
        operands: list[Value] = []
        if not self.accept(")"):
            operands.append(self.use())
            while self.accept(","):
                operands.append(self.use())
            self.expect(")", "')' closing the operands")
        regions: list[Region] = []
        if self.accept("("):
            while True:
                regions.append(self.region())
                if not self.accept(","):
                    break
            self.expect(")", "')' closing the regions")
        attrs = self.attributes(cls)
        self.expect(":", "':' and the op's type")
        self.skip()
        type_pos = self.pos
        operand_types = self.type_list()
        self.expect("->")
        result_types = self.type_list() if self.peek("(") else [self.type()]
        loc = self.location()
        if [v.type for v in operands] != operand_types:
            got = ", ".join(str(v.type) for v in operands)
            raise self.fail(f"operand types ({', '.join(map(str, operand_types))}) do not match the "
                            f"operands' types ({got})", type_pos)
        if len(names) != len(result_types):
            raise self.fail(f"'{opname}' names {len(names)} results but its type has {len(result_types)}", start)
        for f in cls.attr_fields:
            if f.required and f.name not in attrs:
                raise self.fail(f"'{opname}' needs attribute '{f.name}'", name_pos)
        op = cls(operands, result_types, attrs, regions, loc)
        op.text_loc = self.loc(name_pos)
        for (n, pos), v in zip(names, op.results, strict=True):
            self.define(n, v, pos)
        return op

    def region(self) -> Region:
        self.expect("{", "'{' opening a region")
        if self.accept("}"):
            return Region()
        self.expect("^", "a block header (^bb0(...):)")
        self.match(re.compile(r"[A-Za-z_0-9]+"), "a block name")
        self.scopes.append({})
        block = self.block_args()
        self.expect(":")
        self.ops(block)
        self.expect("}", "'}' closing the region")
        self.scopes.pop()
        return Region([block])


def parse_module(text: str, filename: str = "<sir>") -> Module:
    """Parse a whole module; raises ParseError with file:line:col on malformed input."""
    return Parser(text, filename).module()
