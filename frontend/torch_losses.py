"""What a language model's training step adds around the layers, imported so its graphs stay in Sparsa: log-softmax,
the negative log-likelihood loss (forward and backward) and the embedding's backward, as tensor ops (gathers at the
targets, their transpose `tensor.scatter_add`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _axis
from sparsa.ir.core import Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.types import TensorType

REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def _log_softmax(im: Importer, node: Any, x: Value, dim: int, half_to_float: bool = False) -> Value:
    if half_to_float:
        raise Unsupported("log_softmax of a half type to float")
    lse = im.emit(R.LogSumExpOp, x, axes=[_axis(dim, x.type.rank)], keepdim=True)
    return im.emit(T.SubOp, x, lse)


def _log_softmax_backward(im: Importer, node: Any, dy: Value, y: Value, dim: int, input_dtype: Any = None) -> Value:
    """dy - exp(y) * sum(dy) along dim (y the log-probabilities)."""
    total = im.emit(R.SumOp, dy, axes=[_axis(dim, y.type.rank)], keepdim=True)
    return im.emit(T.SubOp, dy, im.emit(T.MulOp, im.emit(T.ExpOp, y), total))


def _targets(im: Importer, x: Value, target: Value, weight: Any, reduction: int, ignore_index: int) -> tuple:
    """(rows, targets made safe to gather at, which count) of an nll_loss over x [N, C]."""
    if weight is not None or x.type.rank != 2 or reduction not in REDUCTIONS:
        raise Unsupported("nll_loss with class weights, or of other than [N, C] inputs")
    n = x.type.shape[0]
    rows = im.emit(T.IotaOp, result_types=[TensorType(target.type.dtype, (n,))])
    ignore = im.const(ignore_index, target.type.dtype)
    valid = im.emit(T.CmpOp, target, ignore, pred="ne")
    return rows, im.emit(T.WhereOp, valid, target, im.const(0, target.type.dtype)), valid


def _nll_loss(im: Importer, node: Any, x: Value, target: Value, weight: Any, reduction: int,
              ignore_index: int) -> tuple:
    rows, safe, valid = _targets(im, x, target, weight, reduction, ignore_index)
    dt = x.type.dtype
    picked = im.emit(S.GatherOp, x, [rows, safe])
    losses = im.emit(T.WhereOp, valid, im.emit(T.NegOp, picked), im.const(0.0, dt))
    total_weight = im.emit(R.SumOp, im.cast(valid, dt), axes=[0])
    if REDUCTIONS[reduction] == "none":
        return losses, total_weight
    out = im.emit(R.SumOp, losses, axes=[0])
    return (im.emit(T.DivOp, out, total_weight) if REDUCTIONS[reduction] == "mean" else out), total_weight


def _nll_loss_backward(im: Importer, node: Any, dy: Value, x: Value, target: Value, weight: Any, reduction: int,
                       ignore_index: int, total_weight: Value) -> Value:
    """-dy (over the total weight for a mean) at each row's target, 0 elsewhere and on ignored rows."""
    rows, safe, valid = _targets(im, x, target, weight, reduction, ignore_index)
    dt = x.type.dtype
    g = im.emit(T.NegOp, dy)
    if REDUCTIONS[reduction] == "mean":
        g = im.emit(T.DivOp, g, total_weight)
    g = im.emit(S.BroadcastToOp, g, shape=list(target.type.shape)) if g.type.rank == 0 else g
    updates = im.emit(T.WhereOp, valid, g, im.const(0.0, dt))
    zeros = im.splat(0.0, dt, x.type.shape)
    return im.emit(S.ScatterAddOp, zeros, updates, [rows, safe])


def _embedding_backward(im: Importer, node: Any, dy: Value, indices: Value, num_weights: int, padding_idx: int,
                        scale_grad_by_freq: bool) -> Value:
    """The rows of dy added at their indices (the gather's transpose); the padding index's row gets none."""
    if scale_grad_by_freq:
        raise Unsupported("embedding backward scaled by frequency")
    if padding_idx >= 0:
        keep = im.emit(T.CmpOp, indices, im.const(padding_idx, indices.type.dtype), pred="ne")
        keep = im.emit(S.ExpandDimsOp, im.cast(keep, dy.type.dtype), axes=[indices.type.rank])
        dy = im.emit(T.MulOp, dy, keep)
    zeros = im.splat(0.0, dy.type.dtype, (num_weights, dy.type.shape[-1]))
    return im.emit(S.ScatterAddOp, zeros, dy, [indices])


OPS: dict[str, Callable] = {
    "_log_softmax.default": _log_softmax, "_log_softmax_backward_data.default": _log_softmax_backward,
    "nll_loss_forward.default": _nll_loss, "nll_loss_backward.default": _nll_loss_backward,
    "embedding_dense_backward.default": _embedding_backward,
}
