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


def refused_dtype(op: object) -> str | None:
    """Why the cpu target refuses op for its element types (None: it does not): the kernels are float32 and
    integer."""
    half = {v.type.dtype for v in list(op.operands) + list(op.results)} & {"f16", "bf16"}
    if half:
        return f"its kernels are float32 and integer, not {half.pop()}: cast to f32 or use the triton target"
    return None
