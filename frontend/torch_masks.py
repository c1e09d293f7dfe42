"""ATen ops model code builds masks, index tables and in-place assemblies with, imported as IR the passes
already know (registered in `torch_import`'s table):

- tensors of one value: `zeros`/`ones`/`new_empty`/`new_empty_strided`/`new_zeros`/`new_ones`/`zeros_like`/
  `ones_like`/`full_like` (a `new_empty` is fully overwritten before it is read in the graphs that use it; as
  zeros);
- `masked_fill`, `tril`/`triu` (iota comparisons and a where), `_safe_softmax` (a row that is -inf
  everywhere gives zeros, not NaN);
- `scatter` of a value and `gather` along a dim, as comparisons of the index with an iota (DeepSeek's
  group routing: a group mask scattered from the chosen groups, scores gathered at the chosen experts).
  The comparison costs (index length) x (dim length) per row, so it is taken up to MAX_COMPARISONS; a larger
  gather, or one along a symbolic dim, is a `tensor.gather` (addressed);
- `slice_scatter` with step 1 (a concat of the pieces around the slice) and `copy` (a broadcast and cast):
  an attention that assembles q from its rotary and plain halves in place;
- `max.dim` (values and first indices), `all` (a min over the bools as ints).
"""

from __future__ import annotations

from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _axis, _slice, torch_dtype
from sparsa.ir.autodiff import Grad
from sparsa.ir.core import Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dims import same_shape
from sparsa.ir.types import TensorType

# The most (index length) x (dim length) comparisons per row a gather or scatter is imported with.
MAX_COMPARISONS = 1 << 16


def _full_of(value: Any):
    def h(im: Importer, node: Any, sizes: Any, dtype: Any = None) -> Value:
        return im.splat(value, torch_dtype(dtype) if dtype is not None else "f32", tuple(sizes))
    return h


def _new_of(value: Any):
    def h(im: Importer, node: Any, x: Value, sizes: Any, dtype: Any = None) -> Value:
        return im.splat(value, torch_dtype(dtype) if dtype is not None else x.type.dtype, tuple(sizes))
    return h


def _like_of(value: Any):
    def h(im: Importer, node: Any, x: Value, dtype: Any = None) -> Value:
        return im.splat(value, torch_dtype(dtype) if dtype is not None else x.type.dtype, x.type.shape)
    return h


def _full_like(im: Importer, node: Any, x: Value, value: Any, dtype: Any = None) -> Value:
    return _like_of(value)(im, node, x, dtype)


def _masked_fill(im: Importer, node: Any, x: Value, mask: Value, value: Any) -> Value:
    v = im.cast(value, x.type.dtype) if isinstance(value, Value) else im.const(value, x.type.dtype)
    return im.emit(T.WhereOp, mask, v, x)


def _triangle(lower: bool):
    def h(im: Importer, node: Any, x: Value, diagonal: int = 0) -> Value:
        if x.type.rank < 2:
            raise Unsupported("tril/triu of fewer than 2 dims")
        rows, cols = x.type.shape[-2:]
        i = im.emit(S.ExpandDimsOp, im.emit(T.IotaOp, result_types=[TensorType("i64", (rows,))]), axes=(1,))
        j = im.emit(S.ExpandDimsOp, im.emit(T.IotaOp, result_types=[TensorType("i64", (cols,))]), axes=(0,))
        offset = im.emit(T.SubOp, j, i)
        keep = im.emit(T.CmpOp, offset, im.const(diagonal, "i64"), pred="le" if lower else "ge")
        return im.emit(T.WhereOp, keep, x, im.const(0, x.type.dtype))
    return h


def _safe_softmax(im: Importer, node: Any, x: Value, dim: int, dtype: Any = None) -> Value:
    if dtype is not None:
        x = im.cast(x, torch_dtype(dtype))
    axis = _axis(dim, x.type.rank)
    top = im.emit(R.MaxOp, x, axes=(axis,), keepdim=True)
    empty = im.emit(T.CmpOp, top, im.const(float("-inf"), x.type.dtype), pred="eq")
    return im.emit(T.WhereOp, empty, im.const(0.0, x.type.dtype), im.emit(R.SoftmaxOp, x, axis=axis))


def _compared(index: Value, d: int, length: Any) -> bool:
    """Whether an index's places along dim d are few enough to compare with each of `length` positions."""
    n = index.type.shape[d]
    return isinstance(length, int) and isinstance(n, int) and n * length <= MAX_COMPARISONS


def _hits(im: Importer, index: Value, d: int, length: Any) -> Value:
    """[..., n, length, ...] (n: the index's size at d, length at d + 1): index[..., j, ...] == g."""
    n = index.type.shape[d]
    if not _compared(index, d, length):
        raise Unsupported(f"scatter of {n} values along a dim of {length} (compared, not addressed)")
    rank = index.type.rank
    g = im.emit(T.IotaOp, result_types=[TensorType(index.type.dtype, (length,))])
    g = im.emit(S.ExpandDimsOp, g, axes=tuple(a for a in range(rank + 1) if a != d + 1))
    return im.emit(T.CmpOp, im.emit(S.ExpandDimsOp, index, axes=(d + 1,)), g, pred="eq")


def _same_but(a: Value, b: Value, d: int, what: str) -> None:
    if a.type.rank != b.type.rank or not same_shape(a.type.shape[:d] + a.type.shape[d + 1:],
                                                    b.type.shape[:d] + b.type.shape[d + 1:]):
        raise Unsupported(f"{what} whose index is smaller than the tensor outside its dim")


def _scatter_value(im: Importer, node: Any, x: Value, dim: int, index: Value, value: Any) -> Value:
    d = _axis(dim, x.type.rank)
    _same_but(x, index, d, "scatter")
    hits = im.emit(R.MaxOp, im.cast(_hits(im, index, d, x.type.shape[d]), "i32"), axes=(d,), keepdim=False)
    v = im.cast(value, x.type.dtype) if isinstance(value, Value) else im.const(value, x.type.dtype)
    return im.emit(T.WhereOp, im.emit(T.CmpOp, hits, im.const(0, "i32"), pred="gt"), v, x)


def _gather(im: Importer, node: Any, x: Value, dim: int, index: Value, sparse_grad: bool = False) -> Value:
    """Compared with an iota where that is small (`_hits`); addressed otherwise (a `tensor.gather` of every axis:
    BERT's token types at the first L positions of a buffer, L symbolic, or many places along a long dim)."""
    d = _axis(dim, x.type.rank)
    if x.type.dtype == "i1":
        raise Unsupported("gather of bools")
    if index.type.rank != x.type.rank or index.type.dtype != "i64":
        raise Unsupported(f"gather at {index.type} from {x.type} (an int64 index of the tensor's rank)")
    if not _compared(index, d, x.type.shape[d]):
        return R.gather_along(Grad(im.block), x, index, d)
    _same_but(x, index, d, "gather")
    hits = _hits(im, index, d, x.type.shape[d])  # [..., n, G, ...]: exactly one hit per (..., j, ...)
    picked = im.emit(T.WhereOp, hits, im.emit(S.ExpandDimsOp, x, axes=(d,)), im.const(0, x.type.dtype))
    return im.emit(R.SumOp, picked, axes=(d + 1,), keepdim=False)


def _slice_scatter(im: Importer, node: Any, x: Value, src: Value, dim: int = 0, start: Any = None,
                   end: Any = None, step: int = 1) -> Value:
    d = _axis(dim, x.type.rank)
    size = x.type.shape[d]
    start = 0 if start is None else start
    end = size if end is None else end
    if step != 1 or not isinstance(start, int) or not isinstance(end, int) or not isinstance(size, int):
        raise Unsupported("slice_scatter with a step or symbolic bounds")
    start, end = (min(max(b + size if b < 0 else b, 0), size) for b in (start, end))  # Python's slice bounds
    pieces = ([_slice(im, node, x, d, 0, start)] if start > 0 else []) + [im.cast(src, x.type.dtype)] + (
        [_slice(im, node, x, d, end, None)] if end < size else [])
    return pieces[0] if len(pieces) == 1 else im.emit(S.ConcatOp, pieces, axis=d)


def _copy(im: Importer, node: Any, x: Value, src: Value, non_blocking: bool = False) -> Value:
    src = im.cast(src, x.type.dtype)
    return src if src.type.shape == x.type.shape else im.emit(S.BroadcastToOp, src, shape=x.type.shape)


def _max_dim(im: Importer, node: Any, x: Value, dim: int, keepdim: bool = False) -> tuple:
    axis = _axis(dim, x.type.rank)
    return (im.emit(R.MaxOp, x, axes=(axis,), keepdim=keepdim), im.emit(R.ArgmaxOp, x, axis=axis, keepdim=keepdim))


def _new_empty_strided(im: Importer, node: Any, x: Value, sizes: Any, stride: Any, dtype: Any = None,
                       **_: Any) -> Value:
    """A fresh tensor in a layout (AOTAutograd's restriding before a copy into it): the IR has values, not
    strides, and a new empty tensor's are unspecified, so zeros as new_empty."""
    return _new_of(0)(im, node, x, sizes, dtype)


def _all(im: Importer, node: Any, x: Value) -> Value:
    axes = tuple(range(x.type.rank))
    low = im.emit(R.MinOp, im.cast(im.emit(T.CmpOp, x, im.const(0, x.type.dtype), pred="ne") if x.type.dtype != "i1"
                                   else x, "i32"), axes=axes, keepdim=False)
    return im.emit(T.CmpOp, low, im.const(1, "i32"), pred="eq")


OPS = {
    "zeros.default": _full_of(0), "ones.default": _full_of(1), "new_empty.default": _new_of(0),
    "new_empty_strided.default": _new_empty_strided,
    "new_zeros.default": _new_of(0), "new_ones.default": _new_of(1), "zeros_like.default": _like_of(0),
    "ones_like.default": _like_of(1), "full_like.default": _full_like,
    "masked_fill.Scalar": _masked_fill, "masked_fill.Tensor": _masked_fill,
    "tril.default": _triangle(True), "triu.default": _triangle(False), "_safe_softmax.default": _safe_softmax,
    "scatter.value": _scatter_value, "gather.default": _gather, "slice_scatter.default": _slice_scatter,
    "copy.default": _copy, "max.dim": _max_dim, "all.default": _all,
}
