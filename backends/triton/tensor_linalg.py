"""triton lowering of the `tensor` dialect's linear-algebra part: the triangular solve on the vendor library
(torch.linalg.solve_triangular: cuBLAS/MAGMA's trsm on a GPU), as Inductor leaves linear algebra to aten."""

from __future__ import annotations

from sparsa.backends.triton.program import LOWERINGS, TritonProgram
from sparsa.ir.core import Operation
from sparsa.ir.dialects import tensor_linalg as L


@LOWERINGS.lowers(L.SolveTriangularOp)
def solve_triangular(p: TritonProgram, op: Operation) -> None:
    a, b = p.name(op.a), p.name(op.b)
    p.lines.append(f"{p.new(op.result)} = torch.linalg.solve_triangular({a}, {b}, upper={bool(op.upper)}, "
                   f"unitriangular={bool(op.unit)})")
