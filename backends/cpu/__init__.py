"""The cpu backend: Sparsa IR lowered through upstream MLIR (the bindings torch-mlir ships) to LLVM native code."""

from __future__ import annotations

import functools

from sparsa.backends.base import UnsupportedOp


@functools.cache
def available() -> bool:
    """Whether the cpu target can run here (torch-mlir's MLIR bindings import)."""
    try:
        import torch_mlir.ir  # noqa: F401
    except ImportError:
        return False
    return True


class CpuLoweringError(UnsupportedOp):
    """An op the cpu backend cannot lower."""
