"""The triton target's code generation: the generated module of one function (kernels, then the host
launcher), from the rules every dialect module registers (`program.LOWERINGS`)."""

from __future__ import annotations

from sparsa.backends.triton import (  # noqa: F401
    attention,
    attention_grad,
    moe,
    scan,
    scan_grad,
    sparse,
    tensor,
    tensor_linalg,
    tensor_reduce,
    tensor_shape,
)
from sparsa.backends.triton.program import TritonProgram
from sparsa.ir.core import Operation


def generate(func: Operation) -> TritonProgram:
    """The kernels and launcher of `func`, every op lowered by its rule (an op without one is refused with
    its name and `.sp` line)."""
    return TritonProgram(func).generate()
