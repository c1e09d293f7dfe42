"""ATen's `*_backward` ops, the ones AOTAutograd's backward graphs hold, imported as the `vjp` rules of Sparsa's
own op classes: the same derivative as `differentiate` builds, not a second transcription of PyTorch's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _affine, _axis
from sparsa.frontend.torch_types import traced_at
from sparsa.ir.core import Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dims import canonical, same_shape


def _derivative(cls: type, reads: str, **fixed: Any) -> Callable:
    """An ATen `*_backward` op (what AOTAutograd's backward graphs hold) as Sparsa's own rule for the forward op:
    the op class's `vjp`, given the forward's input (`reads` "input": the forward op is built again on it) or
    its output ("output": all the rules of these ops read)."""
    def h(im: Importer, node: Any, dy: Any, v: Any, *args: Any, **kwargs: Any) -> Value:
        from sparsa.ir.autodiff import Grad

        dy, v = im.operands(dy, v)
        attrs = {k: f(v, *args, **kwargs) for k, f in fixed.items()}
        y = im.emit(cls, v, **attrs)
        x = v if reads == "input" else None
        g = Grad(im.block)
        (dx,) = y.defining_op.vjp(g, [dy], [x], [v if reads == "output" else y])
        return dx
    return h


def _threshold_backward(im: Importer, node: Any, dy: Any, x: Any, threshold: Any) -> Value:
    if threshold != 0:
        raise Unsupported("threshold_backward with a threshold other than 0")
    return _derivative(T.ReluOp, "input")(im, node, dy, x)


def _gelu_backward(im: Importer, node: Any, dy: Any, x: Any, approximate: str = "none") -> Value:
    return _derivative(T.GeluTanhOp if approximate == "tanh" else T.GeluOp, "input")(im, node, dy, x)


def _softmax_backward(im: Importer, node: Any, dy: Any, y: Any, dim: int, input_dtype: Any = None) -> Value:
    return _derivative(R.SoftmaxOp, "output", axis=lambda v, *a, **k: _axis(dim, v.type.rank))(im, node, dy, y)


def _sdpa_backward(im: Importer, node: Any, dout: Value, q: Value, k: Value, v: Value, out: Value, lse: Value,
                   dropout_p: float, is_causal: bool, attn_mask: Any = None, scale: Any = None) -> tuple:
    """SDPA's CPU flash backward as attention's own rule, on the forward's output and log-sum-exp: the dQ and
    dK/dV ops, given their block map by sparsify-attention like the forward (EMPTY tiles never visited)."""
    from sparsa.frontend.torch_attention import sdpa_operands
    from sparsa.ir.autodiff import Grad
    from sparsa.ir.dialects.attn_grad import AttentionLseOp, attention_vjp

    q2, k, v, mask, score, scale = sdpa_operands(im, q, k, v, dropout_p, is_causal, attn_mask=attn_mask,
                                                 scale=scale)
    if q2 is not q:
        raise Unsupported("SDPA's backward with a head dim known only at run time")
    if lse.type.dtype != q.type.dtype:
        raise Unsupported(f"SDPA's backward with a {lse.type.dtype} log-sum-exp for {q.type.dtype} queries")
    forward = AttentionLseOp.build(q, k, v, regions=[mask, score], scale=float(scale))
    forward.drop_uses()  # a description of the forward for the rule, not an op of the graph
    # (a bias the score adds gets no gradient: SDPA's flash backward gives none)
    dq, dk, dv = attention_vjp(forward, Grad(im.block), [dout, None], [q, k, v], [out, lse], bias_grads=False)
    return dq, dk, dv


def _zero_padded(im: Importer, g: Value, sizes: Any, dim: int, before: int, after: int) -> Value:
    """g with zeros before and after it along dim, to `sizes` (a select's or a slice's transpose; any dim may be
    symbolic, and so then may `before` and `after`)."""
    from sparsa.ir.dialects import tensor_shape as S

    if any(isinstance(s, Value) for s in sizes):
        raise Unsupported("a select backward to sizes computed at run time")
    parts = [im.splat(0.0, g.type.dtype, (*sizes[:dim], n, *sizes[dim + 1:])) if n else None for n in (before, after)]
    parts = [x for x in (parts[0], g, parts[1]) if x is not None]
    return parts[0] if len(parts) == 1 else im.emit(S.ConcatOp, parts, axis=dim)


def _select_backward(im: Importer, node: Any, dy: Value, sizes: Any, dim: int, index: int) -> Value:
    from sparsa.ir.dialects import tensor_shape as S

    dim = _axis(dim, len(sizes))
    n = sizes[dim]
    if not isinstance(index, int):
        raise Unsupported("a select backward at an index known only at run time")
    if isinstance(n, int):
        index %= n
    elif index < 0:  # (over a symbolic dim, counted from its end: BigBird's pooler reads row 0, others the last)
        index = canonical(f"({n})+({index})")
    g = im.emit(S.ExpandDimsOp, dy, axes=[dim])
    return _zero_padded(im, g, sizes, dim, index, canonical(f"({n})-({index})-1"))


def _slice_backward(im: Importer, node: Any, dy: Value, sizes: Any, dim: int, start: Any, end: Any,
                    step: int) -> Value:
    """tensor.slice's own rule (`put_back`): dY in the rows the slice took (every step-th), zeros elsewhere; along a
    symbolic dim too (a sequence shifted by one, a sliding window's last rows, a parallel scan's every other row at
    a new length), with bounds that lie inside it, as the guards PyTorch traced them under say."""
    from sparsa.ir.autodiff import Grad
    from sparsa.ir.dialects.tensor_shape import put_back

    dim = _axis(dim, len(sizes))
    stop = None if isinstance(end, int) and end >= 2 ** 62 else end  # (to the end: PyTorch's INT64_MAX)
    if isinstance(start, Value) or isinstance(stop, Value) or not isinstance(step, int) or step < 1:
        raise Unsupported("a slice backward with bounds known only at run time, or a step below 1")
    n, traced = sizes[dim], _traced_size(node, dim)
    if isinstance(n, int):
        traced = n
    if not isinstance(n, int) or isinstance(start, str) or isinstance(stop, str):
        # bounds as PyTorch traced them (its guards keep their signs and clamps): MPT's `alibi[:, :, -L:]` of 2048
        # starts at 2048 - L
        if traced is None:
            raise Unsupported("a slice backward along a symbolic dim PyTorch did not trace a size for")
        args = [*node.args, 0, None][3:5]  # (start's and end's nodes or ints, where given)
        start, stop = (_from_end(b, _traced_int(a), n, traced) for b, a in zip((start, stop), args, strict=True))
    try:
        return put_back(Grad(im.block), dy, dim, sizes[dim], start, step, stop)
    except ValueError as e:
        raise Unsupported(f"a slice backward: {e}") from None


def _from_end(bound: Any, at: int | None, n: Any, traced: int) -> Any:
    """A slice bound along a symbolic dim n (traced at `traced`) as an offset from its start: one PyTorch traced
    negative counts from the end (x[..., -L:] is all of it), or is 0 where it reached past the start."""
    if isinstance(bound, str) and at is None:
        raise Unsupported("a slice backward with a symbolic bound PyTorch did not trace a value for")
    if at is None or at >= 0:
        return bound
    return 0 if traced + at <= 0 else canonical(f"({n})+({bound})")


def _traced_int(arg: Any) -> int | None:
    """An int argument's value as PyTorch traced it (given, or a SymInt node's), or None where it does not say."""
    return traced_at(arg.meta.get("val") if hasattr(arg, "meta") else arg)


def _traced_size(node: Any, dim: int) -> int | None:
    """The size PyTorch traced the result's `dim` at, or None where it does not say."""
    val = node.meta.get("val")
    return traced_at(val.shape[dim]) if hasattr(val, "shape") and dim < len(val.shape) else None


def _layer_norm_backward(im: Importer, node: Any, dy: Value, x: Value, shape: Any, mean: Value, rstd: Value,
                         w: Any, b: Any, output_mask: Any) -> tuple:
    """native_layer_norm_backward as layer norm's own rule (`layer_norm_vjp`), from the statistics the forward
    saved; the gradients output_mask does not ask for, and those of a weight or bias the module lacks, are None."""
    from sparsa.ir.autodiff import Grad

    if len(shape) != 1:
        raise Unsupported("layer norm's backward over several axes")
    grads = R.layer_norm_vjp(Grad(im.block), dy, x, *_affine(im, x, w, b), mean, rstd)
    return tuple(g if want and has else None
                 for g, want, has in zip(grads, output_mask, (True, w is not None, b is not None), strict=True))


def _dropout_backward(im: Importer, node: Any, dy: Value, mask: Value, scale: float) -> Value:
    """native_dropout_backward: dy where the forward kept the element, times 1 / (1 - p) (the forward, which draws
    from PyTorch's generator, stays in PyTorch and hands its mask over)."""
    kept = im.emit(T.MulOp, dy, im.cast(mask, dy.type.dtype))
    return kept if scale == 1 else im.emit(T.MulOp, *im.operands(kept, float(scale)))


def _scatter_add(im: Importer, node: Any, base: Value, dim: int, index: Value, src: Value) -> Value:
    """base with src[p] added at p with its coordinate along dim replaced by index[p]."""
    from sparsa.ir.autodiff import Grad

    axis = _axis(dim, base.type.rank)
    if not same_shape(index.type.shape, src.type.shape) or index.type.rank != base.type.rank or \
            index.type.dtype != "i64":
        raise Unsupported(f"scatter_add of {src.type} at {index.type} (an index of the source's shape, int64)")
    if src.type.dtype != base.type.dtype:
        src = im.cast(src, base.type.dtype)
    return R.scatter_along(Grad(im.block), base, src, index, axis)


OPS: dict[str, Callable] = {
    "native_layer_norm_backward.default": _layer_norm_backward,
    "native_dropout_backward.default": _dropout_backward,
    "scatter_add.default": _scatter_add,
    "_scaled_dot_product_flash_attention_for_cpu_backward.default": _sdpa_backward,
    "select_backward.default": _select_backward, "slice_backward.default": _slice_backward,
    "silu_backward.default": _derivative(T.SiluOp, "input"),
    "sigmoid_backward.default": _derivative(T.SigmoidOp, "output"),
    "tanh_backward.default": _derivative(T.TanhOp, "output"), "threshold_backward.default": _threshold_backward,
    "gelu_backward.default": _gelu_backward, "_softmax_backward_data.default": _softmax_backward,
}
