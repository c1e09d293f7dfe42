"""Pipeline strings: `canonicalize,cse,fuse-moe-dispatch{block=64}` parsed into passes and printed back."""

from __future__ import annotations

import re

from sparsa.ir.diagnostics import Location, ParseError
from sparsa.passes.base import PASS_REGISTRY, Pass

_NAME = re.compile(r"[a-z][a-z0-9-]*")
_OPTION = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*([^\s,}]+)")


def parse_pipeline(text: str) -> list[Pass]:
    """Passes of a pipeline string; a ParseError points at the bad character with a caret."""

    def fail(msg: str, pos: int) -> ParseError:
        return ParseError(msg, Location("<pipeline>", 1, pos + 1), text)

    passes: list[Pass] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        m = _NAME.match(text, pos)
        if not m:
            raise fail("expected a pass name", pos)
        name = m.group(0)
        cls = PASS_REGISTRY.get(name)
        if cls is None:
            raise fail(f"unknown pass '{name}' (known: {', '.join(sorted(PASS_REGISTRY))})", pos)
        pos = m.end()
        options: dict[str, object] = {}
        if text.startswith("{", pos):
            pos += 1
            while True:
                while pos < len(text) and text[pos] in " ,":
                    pos += 1
                if text.startswith("}", pos):
                    pos += 1
                    break
                om = _OPTION.match(text, pos)
                if not om:
                    raise fail(f"expected 'name=value' or '}}' in the options of '{name}'", pos)
                field = next((o for o in cls.option_fields if o.name == om.group(1).replace("-", "_")), None)
                if field is None:
                    known = ", ".join(o.name for o in cls.option_fields) or "none"
                    raise fail(f"pass '{name}' has no option '{om.group(1)}' (it has: {known})", pos)
                try:
                    options[field.name] = field.parse(om.group(2))
                except ValueError as e:
                    raise fail(str(e), om.start(2)) from None
                pos = om.end()
        passes.append(cls(**options))
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return passes
        if text[pos] != ",":
            raise fail("expected ',' between passes", pos)
        pos += 1


def format_pipeline(passes: list[Pass]) -> str:
    """The pipeline string that parses back to `passes`."""
    return ",".join(str(p) for p in passes)
