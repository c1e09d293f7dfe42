"""ATen's linear algebra that model code calls (registered in `torch_import`'s table): the triangular solve of
gated delta nets' chunked form (Qwen3-Next, Qwen3.5, Olmo hybrid), as `tensor.solve_triangular`."""

from __future__ import annotations

from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _expand, _transpose
from sparsa.ir.core import Value
from sparsa.ir.dialects import tensor_linalg as L
from sparsa.ir.dims import broadcast_shapes


def _solve_triangular(im: Importer, node: Any, a: Value, b: Value, *, upper: bool, left: bool = True,
                      unitriangular: bool = False) -> Value:
    """torch.linalg.solve_triangular: batch dims broadcast first; X A = B (left=False) as Aᵀ Xᵀ = Bᵀ."""
    a, b = im.operands(a, b)
    if a.type.rank < 2 or b.type.rank < 2:
        raise Unsupported("solve_triangular of fewer than 2 dims")
    if not left:
        a, b = _transpose(im, node, a, -2, -1), _transpose(im, node, b, -2, -1)
    try:
        batch = broadcast_shapes(a.type.shape[:-2], b.type.shape[:-2])
    except ValueError as e:
        raise Unsupported(f"solve_triangular of batch dims that do not broadcast: {e}") from None
    a, b = (_expand(im, node, v, batch + v.type.shape[-2:]) for v in (a, b))
    x = im.emit(L.SolveTriangularOp, a, b, upper=bool(upper) != (not left), unit=bool(unitriangular))
    return x if left else _transpose(im, node, x, -2, -1)


OPS = {"linalg_solve_triangular.default": _solve_triangular}
