"""Printer for the textual IR (`.sir`): one generic MLIR-flavoured syntax for every op."""

from __future__ import annotations

import re

from sparsa.ir.core import Block, Module, Operation, Value
from sparsa.ir.types import TensorType

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Namer:
    """Gives values `%name` from their hints (made unique with `_N`) or `%N` counters, per function."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.used: set[str] = set()
        self.counter = 0

    def define(self, v: Value) -> str:
        hint = v.name_hint if v.name_hint and _IDENT.fullmatch(v.name_hint) else None
        if hint is None:
            while str(self.counter) in self.used:
                self.counter += 1
            name = str(self.counter)
            self.counter += 1
        else:
            name, n = hint, 1
            while name in self.used:
                name = f"{hint}_{n}"
                n += 1
        self.used.add(name)
        self.names[id(v)] = name
        return "%" + name

    def ref(self, v: Value) -> str:
        name = self.names.get(id(v))
        return "%" + name if name is not None else "%<<undefined>>"


def format_types(types: list[TensorType], parens_for_one: bool = False) -> str:
    if len(types) == 1 and not parens_for_one:
        return str(types[0])
    return "(" + ", ".join(str(t) for t in types) + ")"


def print_op(op: Operation, namer: Namer | None = None, indent: int = 0) -> str:
    """Text of one operation (and its regions) in generic form."""
    namer = namer or Namer()
    lines: list[str] = []
    _op(op, namer, indent, lines)
    return "\n".join(lines)


def _op(op: Operation, namer: Namer, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if op.NAME == "func.func":
        _func(op, namer, indent, out)
        return
    results = ", ".join(namer.define(v) for v in op.results)
    operands = ", ".join(namer.ref(v) for v in op.operands)
    line = pad + (f"{results} = " if results else "") + f"{op.NAME}({operands})"
    if op.regions:
        line += " ("
        for i, r in enumerate(op.regions):
            line += ", " if i else ""
            if r.empty:
                line += "{}"
                continue
            out.append(line + "{")
            args = ", ".join(f"{namer.define(a)}: {a.type}" for a in r.block.args)
            out.append(f"{pad}^bb0({args}):")
            for o in r.block.ops:
                _op(o, namer, indent + 2, out)
            line = pad + "}"
        line += ")"
    operand_types = format_types([v.type for v in op.operands], True)
    result_types = format_types([v.type for v in op.results])
    out.append(f"{line}{_attrs(op)} : {operand_types} -> {result_types}" + (f" {op.loc}" if op.loc else ""))


def _attrs(op: Operation, attributes: dict | None = None) -> str:
    attributes = op.attributes if attributes is None else attributes
    parts = []
    for f in type(op).attr_fields:
        if f.name not in attributes:
            continue
        value = attributes[f.name]
        if not f.required and value == f.default:
            continue
        parts.append(f"{f.name} = {f.kind.format(value)}")
    return " {" + ", ".join(parts) + "}" if parts else ""


def _func(op: Operation, namer: Namer, indent: int, out: list[str]) -> None:
    pad = " " * indent
    block: Block = op.regions[0].block
    args = ", ".join(f"{namer.define(a)}: {a.type}" for a in block.args)
    results = format_types(list(op.attributes["result_types"]), True)
    extra = {k: v for k, v in op.attributes.items() if k not in ("sym_name", "result_types")}
    attrs = f" attributes{_attrs(op, extra)}" if extra else ""
    out.append(f"{pad}func.func @{op.attributes['sym_name']}({args}) -> {results}{attrs} {{")
    for o in block.ops:
        _op(o, namer, indent + 2, out)
    out.append(f"{pad}}}" + (f" {op.loc}" if op.loc else ""))


def print_module(module: Module) -> str:
    """Text of a whole module; parsing it gives back a module that prints the same."""
    out = ["module {"]
    for f in module.funcs:
        out.append(print_op(f, Namer(), 2))
    out.append("}")
    return "\n".join(out) + "\n"
