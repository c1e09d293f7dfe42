"""Source locations and user-facing errors with a caret under the offending column."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A position in a source file (1-based line and column), printed `loc("f.sp":3:9)`."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f'loc("{self.file}":{self.line}:{self.col})'

    def short(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def render(kind: str, message: str, loc: Location | None, source: str | None = None) -> str:
    """`file:line:col: kind: message`, then the source line and a caret, as compilers print them."""
    if loc is None:
        return f"{kind}: {message}"
    head = f"{loc.short()}: {kind}: {message}"
    if source is None:
        source = _read(loc.file)
    lines = source.splitlines() if source is not None else []
    if not 1 <= loc.line <= len(lines):
        return head
    text = lines[loc.line - 1].expandtabs(1)
    return f"{head}\n{text}\n{' ' * (max(loc.col, 1) - 1)}^"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


class SparsaError(Exception):
    """An error a user can act on: what went wrong, where, and what was expected."""

    def __init__(self, message: str, loc: Location | None = None, source: str | None = None):
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.source = source

    def __str__(self) -> str:
        return render("error", self.message, self.loc, self.source)


class ParseError(SparsaError):
    """Malformed textual input (`.sir` or `.sp`)."""


class VerifyError(SparsaError):
    """IR that breaks an op's or a function's invariants."""
