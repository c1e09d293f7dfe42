"""ATen's indexing ops that read or write at tensor indices or one slice: `index` and `index_put` (an index's
backward, accumulating) with leading whole axes, `select_scatter`, `scatter` at a top-k's indices, `fill` and
`repeat`, and `as_strided` (with its scatter) where it only gives a dense tensor another shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _axis, _slice
from sparsa.ir.core import Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dims import broadcast_shapes, mul


def _reshaping(source: Any, size: Any, stride: Any, offset: Any) -> bool:
    """Whether as_strided(source, size, stride, offset) reads all of `source` in order: source (its fake value in
    the graph) is dense, row-major and at its storage's start, and size and stride are the row-major layout of as
    many elements (strides of size-1 dims are free). Then it is a reshape, and its scatter a whole overwrite."""
    val = source.meta.get("val") if hasattr(source, "meta") else None
    sizes = [*size, *getattr(val, "shape", ())]
    if val is None or offset not in (None, 0) or not all(isinstance(s, int) for s in (*sizes, *stride)):
        return False
    numel, want = 1, []
    for s in reversed(list(size)):
        want.append(numel)
        numel *= s
    laid_out = all(s == 1 or st == w for s, st, w in zip(size, stride, reversed(want), strict=True))
    try:
        dense = val.is_contiguous() and val.storage_offset() == 0 and \
            val.untyped_storage().nbytes() == val.numel() * val.element_size()
    except (RuntimeError, NotImplementedError):  # a fake value without a storage to ask: not known to be dense
        return False
    return laid_out and dense and numel == val.numel()


def _as_strided(im: Importer, node: Any, x: Value, size: Any, stride: Any, offset: Any = None) -> Value:
    """as_strided that only reshapes (an adaptive pooling's decomposition: Swin's pooler)."""
    if not _reshaping(node.args[0], size, stride, offset):
        raise Unsupported("as_strided other than a reshape of a whole dense tensor")
    return im.emit(S.ReshapeOp, x, shape=tuple(size))


def _as_strided_scatter(im: Importer, node: Any, base: Value, src: Value, size: Any, stride: Any,
                        offset: Any = None) -> Value:
    """as_strided_scatter over all of a dense base, in order: src, in base's shape (the pooling's backward)."""
    if not _reshaping(node.args[0], size, stride, offset):
        raise Unsupported("as_strided_scatter other than over a whole dense tensor")
    return im.emit(S.ReshapeOp, im.cast(src, base.type.dtype), shape=base.type.shape)


def _select_scatter(im: Importer, node: Any, x: Value, src: Value, dim: int, index: int) -> Value:
    """x with its index-th slice along dim replaced by src: the slices before and after it and src, joined."""
    d = _axis(dim, x.type.rank)
    n = x.type.shape[d]
    if not isinstance(n, int):
        raise Unsupported("select_scatter along a symbolic dim")
    i = index + n if index < 0 else index
    parts = [_slice(im, node, x, d, 0, i, 1)] if i > 0 else []
    parts.append(im.emit(S.ExpandDimsOp, im.cast(src, x.type.dtype), axes=(d,)))
    if i + 1 < n:
        parts.append(_slice(im, node, x, d, i + 1, None, 1))
    return parts[0] if len(parts) == 1 else im.emit(S.ConcatOp, parts, axis=d)


def _fill(im: Importer, node: Any, x: Value, value: Any) -> Value:
    """fill: x's shape, every element `value` (a 0-d tensor or a number) in x's type."""
    v = im.cast(value, x.type.dtype) if isinstance(value, Value) else im.const(value, x.type.dtype)
    return im.emit(S.BroadcastToOp, v, shape=x.type.shape)


def _indexed_axes(indices: Any) -> int:
    """The first axis an aten.index / index_put indexes: its leading Nones (whole axes) are skipped; the tensor
    indices after them are consecutive (a None between or after them: unsupported)."""
    k = 0
    while k < len(indices) and indices[k] is None:
        k += 1
    if k == len(indices) or any(i is None for i in indices[k:]):
        raise Unsupported("index with a None between or after its tensor indices")
    return k


def _axes_first(im: Importer, x: Value, k: int, m: int, first: bool = True) -> Value:
    """x with its axes k..k+m-1 moved to the front (`first`), or its first m axes moved back to k."""
    if k == 0:
        return x
    r = x.type.rank
    perm = list(range(k, k + m)) + list(range(k)) + list(range(k + m, r)) if first else \
        list(range(m, m + k)) + list(range(m)) + list(range(m + k, r))
    return im.emit(S.TransposeOp, x, perm=tuple(perm))


def _index(im: Importer, node: Any, x: Value, indices: Any) -> Value:
    """x[:, ..., i0, i1, ...]: a gather of the indexed axes moved to the front, the index dims then put where the
    first tensor index was (as PyTorch places consecutive tensor indices)."""
    k = _indexed_axes(indices)
    idx = [im.tensor(i) for i in indices[k:]]
    y = im.emit(S.GatherOp, _axes_first(im, x, k, len(idx)), idx)
    return _axes_first(im, y, k, y.type.rank - (x.type.rank - len(idx)), first=False)


def _index_put(im: Importer, node: Any, base: Value, indices: Any, values: Value, accumulate: bool = False) -> Value:
    """base with values added at base[:, ..., i0, i1, ...] (accumulate: an index's backward; repeated places add
    up): a scatter-add on the indexed axes moved to the front."""
    if not accumulate:
        raise Unsupported("index_put that writes (accumulate=False): repeated places would race")
    k = _indexed_axes(indices)
    idx = [im.tensor(i) for i in indices[k:]]
    lead = broadcast_shapes(*(i.type.shape for i in idx))
    idx = [i if i.type.shape == lead else im.emit(S.BroadcastToOp, i, shape=lead) for i in idx]
    want = base.type.shape[:k] + lead + base.type.shape[k + len(idx):]
    if values.type.dtype != base.type.dtype:
        values = im.cast(values, base.type.dtype)
    if values.type.shape != want:
        values = im.emit(S.BroadcastToOp, values, shape=want)
    out = im.emit(S.ScatterAddOp, _axes_first(im, base, k, len(idx)), _axes_first(im, values, k, len(lead)), idx)
    return _axes_first(im, out, k, len(idx), first=False)


def topk_indices_axis(node: Any) -> int | None:
    """The axis along which an FX node's values are a top-k's indices (distinct along it), or None."""
    import operator

    import torch

    if getattr(node, "op", None) != "call_function" or node.target is not operator.getitem or node.args[1] != 1 \
            or getattr(node.args[0], "target", None) is not torch.ops.aten.topk.default:
        return None
    topk = node.args[0]
    dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
    return dim % len(node.meta["val"].shape)


def one_per_row(index: Any, axis: int) -> bool:
    """An FX node's index of one entry along `axis` (a max's or argmax's with keepdim): none can repeat there."""
    val = getattr(index, "meta", {}).get("val")
    return val is not None and val.dim() > axis and val.shape[axis] == 1


def _scatter(im: Importer, node: Any, base: Value, dim: int, index: Value, src: Value) -> Value:
    """scatter(base, dim, index, src) where index is a top-k's indices along dim (Llama 4's router scores: the
    top values written into a tensor of -inf) or has one entry along it: no place is written twice, so src where
    an index points, base elsewhere; where indices may repeat, PyTorch keeps any one of the writes, which Sparsa
    does not guess."""
    from sparsa.frontend.torch_derivatives import _scatter_add

    axis = _axis(dim, base.type.rank)
    if topk_indices_axis(node.args[2]) != axis and not one_per_row(node.args[2], axis):
        raise Unsupported("scatter at indices that may repeat along the dim (a top-k's indices are taken)")
    dt = base.type.dtype
    placed = _scatter_add(im, node, im.splat(0, dt, base.type.shape), dim, index, src)
    hits = _scatter_add(im, node, im.splat(0, dt, base.type.shape), dim, index, im.splat(1, dt, src.type.shape))
    hit = im.emit(T.CmpOp, hits, im.const(0, dt), pred="gt")
    return im.emit(T.WhereOp, hit, placed, base)


def _index_select(im: Importer, node: Any, x: Value, dim: int, index: Value) -> Value:
    """x's rows along dim at a 1-D index's places: x[:, ..., index] (JetMoe's experts' tokens)."""
    return _index(im, node, x, [None] * _axis(dim, x.type.rank) + [index])


def _index_add(im: Importer, node: Any, base: Value, dim: int, index: Value, source: Value, alpha: Any = 1) -> Value:
    """base with source's rows along dim added at a 1-D index's places (repeated places add up): index_select's
    backward, and JetMoe's experts' outputs summed back to their tokens."""
    if alpha != 1:
        source = im.emit(T.MulOp, *im.operands(source, alpha))
    return _index_put(im, node, base, [None] * _axis(dim, base.type.rank) + [index], source, True)


def _repeat(im: Importer, node: Any, x: Value, repeats: Any) -> Value:
    """x tiled `repeats` times along each dim (leading new dims where there are more repeats than dims): x
    viewed [1, s0, 1, s1, ...], broadcast to [r0, s0, r1, s1, ...] and viewed [r0 * s0, r1 * s1, ...]. A repeat
    may be a size (Bloom's ALiBi slopes, repeated batch times)."""
    lead = len(repeats) - x.type.rank
    if lead < 0 or not all(isinstance(r, int | str) for r in repeats):
        raise Unsupported(f"repeat of {x.type} by {list(repeats)}")
    shape = (1,) * lead + tuple(x.type.shape)
    pairs = tuple(d for s in shape for d in (1, s))
    spread = im.emit(S.ReshapeOp, x, shape=pairs)
    tiled = im.emit(S.BroadcastToOp, spread, shape=tuple(d for r, s in zip(repeats, shape, strict=True)
                                                         for d in (r, s)))
    return im.emit(S.ReshapeOp, tiled, shape=tuple(mul(r, s) for r, s in zip(repeats, shape, strict=True)))


OPS: dict[str, Callable] = {
    "index.Tensor": _index, "index_put.default": _index_put,
    # the same without bounds checks (a bilinear resize's decomposition: BEiT's position bias)
    "_unsafe_index.Tensor": _index, "_unsafe_index_put.default": _index_put,
    "as_strided.default": _as_strided, "as_strided_scatter.default": _as_strided_scatter,
    "select_scatter.default": _select_scatter,
    "fill.Tensor": _fill, "fill.Scalar": _fill, "scatter.src": _scatter, "repeat.default": _repeat,
    "index_select.default": _index_select, "index_add.default": _index_add,
}
