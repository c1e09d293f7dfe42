"""The `.sp` language frontend: grammar and parser, checking, and lowering to IR."""

from __future__ import annotations

from sparsa.frontend.lower import lower_program
from sparsa.frontend.parser import parse_source
from sparsa.frontend.values import CompileErrors, FrontendError
from sparsa.ir.core import Module


def compile_source(source: str, filename: str = "<source>", model: str | None = None) -> tuple[Module, str]:
    """Parse and check `.sp` source and lower `model` (default: the last one); returns (module, model name)."""
    return lower_program(parse_source(source, filename), filename, source, model)


__all__ = ["CompileErrors", "FrontendError", "compile_source", "parse_source"]
