"""ATen's linear algebra that model code calls (registered in `torch_import`'s table): the triangular solve of
gated delta nets' chunked form (Qwen3-Next, Qwen3.5, Olmo hybrid), as `tensor.solve_triangular`, and vector
norms (F.normalize: Swin v2's cosine attention) as the reductions they are."""

from __future__ import annotations

from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _axis, _expand, _transpose
from sparsa.ir.core import Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_linalg as L
from sparsa.ir.dialects import tensor_reduce as R
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


def _vector_norm(im: Importer, node: Any, x: Value, ord: Any = 2, dim: Any = None, keepdim: bool = False, *,
                 dtype: Any = None) -> Value:
    """torch.linalg.vector_norm over `dim` (every axis when None): sqrt(sum(x²)) for ord 2, sum(|x|) for 1,
    max(|x|) and min(|x|) for ±inf, sum(|x|^p)^(1/p) otherwise (its backward is elementwise ops in the graph)."""
    if dtype is not None or not x.type.dtype.startswith(("f", "bf")):
        raise Unsupported("a vector norm with a dtype, or of integers")
    if not isinstance(ord, (int, float)) or ord == 0:
        raise Unsupported(f"a vector norm of order {ord}")
    dims = list(range(x.type.rank)) if dim is None or dim == [] else [dim] if isinstance(dim, int) else list(dim)
    axes = tuple(sorted({_axis(d, x.type.rank) for d in dims}))
    if ord == 2:
        return im.emit(T.SqrtOp, im.emit(R.SumOp, im.emit(T.MulOp, x, x), axes=axes, keepdim=keepdim))
    a = im.emit(T.AbsOp, x)
    if ord in (float("inf"), float("-inf")):
        return im.emit(R.MaxOp if ord > 0 else R.MinOp, a, axes=axes, keepdim=keepdim)
    if ord == 1:
        return im.emit(R.SumOp, a, axes=axes, keepdim=keepdim)
    powered = im.emit(T.PowOp, *im.operands(a, float(ord)))
    return im.emit(T.PowOp, *im.operands(im.emit(R.SumOp, powered, axes=axes, keepdim=keepdim), 1.0 / float(ord)))


OPS = {"linalg_solve_triangular.default": _solve_triangular, "linalg_vector_norm.default": _vector_norm}
