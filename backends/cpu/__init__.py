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


def unknown_broadcast(op: object) -> str | None:
    """Why an elementwise op's operands may broadcast where the cpu kernels cannot tell (None: they cannot). A kernel
    broadcasts a dim of static size 1 only; a dim of unknown size (`?`: a slice from -1 to a symbolic end) beside
    another operand's, or a larger result's, may be 1 at run time (NumPy's reading, the reference's)."""
    from sparsa.ir.dims import format_dim
    from sparsa.ir.traits import Elementwise

    if not isinstance(op, Elementwise) or len(op.operands) < 2 or not op.results:
        return None
    out = op.results[0].type.shape
    shapes = [v.type.shape for v in op.operands]
    for axis in range(1, len(out) + 1):
        dims = [s[-axis] for s in shapes if len(s) >= axis]
        if None in dims and (out[-axis] is not None or sum(d != 1 for d in dims) > 1):
            return f"a dim of unknown size beside {format_dim(out[-axis])}: it may broadcast at run time"
    return None
