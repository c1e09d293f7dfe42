"""Sparsa: a compiler for sparse neural networks (MoE, block-sparse attention, scans, sparse weights)."""

from sparsa.runtime.compiler import CompiledModel, compile
from sparsa.runtime.report import report

__version__ = "0.1.0"
__all__ = ["CompiledModel", "__version__", "compile", "report"]
