"""The reference backend: a NumPy interpreter of the IR, the oracle for every pass and backend."""

from sparsa.backends.reference.interpreter import Interpreter, run_function

__all__ = ["Interpreter", "run_function"]
