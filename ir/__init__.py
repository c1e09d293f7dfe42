"""Sparsa's IR: typed ops declared once per class, dialects, textual form, verifier."""

from sparsa.ir import dialects
from sparsa.ir.core import OP_REGISTRY, Block, Module, Operation, Region, Value
from sparsa.ir.diagnostics import Location, ParseError, SparsaError, VerifyError
from sparsa.ir.parser import parse_module
from sparsa.ir.printer import print_module, print_op
from sparsa.ir.types import Layout, TensorType, scalar
from sparsa.ir.verifier import verify_module

__all__ = [
    "OP_REGISTRY", "Block", "Layout", "Location", "Module", "Operation", "ParseError", "Region",
    "SparsaError", "TensorType", "Value", "VerifyError", "dialects", "parse_module", "print_module",
    "print_op", "scalar", "verify_module",
]
