"""The runtime: `sparsa.compile`, weights, calls, and the command line."""

from sparsa.runtime.compiler import CompiledModel, compile

__all__ = ["CompiledModel", "compile"]
