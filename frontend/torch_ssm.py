"""The ATen ops of a state-space block that are not attention, a MoE block or plain tensor ops: Mamba's causal
depthwise convolution and its backward (and a vision transformer's patch embedding, the other convolution
Sparsa computes), softplus and its backward, and stack. The convolution is imported as
what it computes (shifted slices of the padded input times one weight column each, summed), and its backward
as the `vjp` rules of those same ops: the derivative `differentiate` would build, not a transcription of
PyTorch's convolution_backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _axis
from sparsa.ir.core import Value
from sparsa.ir.dialects import scan as SC
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.types import TensorType


def _depthwise_conv1d(im: Importer, x: Value, w: Value, bias: Value | None, stride: Any, padding: Any,
                      dilation: Any, transposed: bool, output_padding: Any, groups: int) -> Value:
    """y[b, c, t] = bias[c] + sum_k w[c, 0, k] * xp[b, c, t + k*dilation], xp = x with `padding` zeros on both
    sides of the time axis: one slice, multiply and add per tap (Mamba's convolutions have 4)."""
    if transposed or x.type.rank != 3 or w.type.rank != 3 or list(stride) != [1] or any(output_padding):
        raise Unsupported("convolutions other than 1-D, stride 1 and not transposed")
    B, C, L = x.type.shape
    channels, per_group, K = w.type.shape
    if groups != C or channels != C or per_group != 1 or not all(isinstance(d, int) for d in (C, K)) or L is None:
        raise Unsupported("convolutions other than depthwise (groups = channels) of static channels and taps")
    pad, step = int(padding[0]), int(dilation[0])
    parts = [x]
    if pad:
        zeros = im.splat(0.0, x.type.dtype, (B, C, pad))
        parts = [zeros, x, zeros]
    xp = parts[0] if len(parts) == 1 else im.emit(S.ConcatOp, parts, axis=2)
    extra = 2 * pad - step * (K - 1)  # output length - L (a symbolic L: Mamba under dynamic shapes)
    out = L + extra if isinstance(L, int) else L if extra == 0 else f"{L}{extra:+d}"
    if isinstance(out, int) and out <= 0:
        raise Unsupported("a convolution with no output")
    y = None
    for k in range(K):
        tap = im.emit(S.SliceOp, w, starts=(0, 0, k), stops=(C, 1, k + 1), steps=(1, 1, 1))
        column = im.emit(S.ReshapeOp, tap, shape=(C, 1))
        end = k * step + out if isinstance(out, int) else f"{L}{k * step + extra:+d}" if k * step + extra else L
        window = im.emit(S.SliceOp, xp, starts=(0, 0, k * step), stops=(None, None, end), steps=(1, 1, 1))
        term = im.emit(T.MulOp, window, column)
        y = term if y is None else im.emit(T.AddOp, y, term)
    if bias is not None:
        y = im.emit(T.AddOp, y, im.emit(S.ReshapeOp, bias, shape=(C, 1)))
    return y


def _patch_conv2d(im: Importer, x: Value, w: Value, bias: Value | None, stride: Any, padding: Any,
                  dilation: Any, transposed: bool, output_padding: Any, groups: int) -> Value:
    """A vision transformer's patch embedding: a 2-D convolution whose stride is its kernel (p x q), unpadded, one
    group. Its patches do not overlap, so it is one matmul: x's [C, p, q] patches as rows (a reshape and a
    transpose) times the weight as [C p q, O], then the patches' grid put back as [B, O, H/p, W/q]. Rows and
    columns past the last whole patch are not read, as PyTorch's."""
    if transposed or x.type.rank != 4 or w.type.rank != 4 or any(output_padding) or groups != 1:
        raise Unsupported("convolutions other than 1-D depthwise and 2-D patch embeddings")
    B, C, H, W = x.type.shape
    O, Cw, p, q = w.type.shape
    if not all(isinstance(d, int) for d in (C, H, W, O, p, q)) or Cw != C:
        raise Unsupported("a 2-D convolution of symbolic sizes")
    if list(stride) != [p, q] or any(padding) or list(dilation) != [1, 1] or H < p or W < q:
        raise Unsupported("2-D convolutions other than patch embeddings (stride = kernel, no padding)")
    hp, wq = H // p, W // q
    if (hp * p, wq * q) != (H, W):
        x = im.emit(S.SliceOp, x, starts=(0, 0, 0, 0), stops=(None, None, hp * p, wq * q), steps=(1, 1, 1, 1))
    grid = im.emit(S.ReshapeOp, x, shape=(B, C, hp, p, wq, q))
    patches = im.emit(S.ReshapeOp, im.emit(S.TransposeOp, grid, perm=(0, 2, 4, 1, 3, 5)), shape=(-1, C * p * q))
    kernel = im.emit(S.TransposeOp, im.emit(S.ReshapeOp, w, shape=(O, C * p * q)), perm=(1, 0))
    y = im.emit(S.MatmulOp, patches, kernel)
    if bias is not None:
        y = im.emit(T.AddOp, y, bias)
    return im.emit(S.TransposeOp, im.emit(S.ReshapeOp, y, shape=(B, hp, wq, O)), perm=(0, 3, 1, 2))


def _conv(im: Importer, *args: Any) -> Value:
    """The convolutions Sparsa computes: Mamba's 1-D depthwise ones and 2-D patch embeddings."""
    return (_patch_conv2d if args[0].type.rank == 4 else _depthwise_conv1d)(im, *args)


def _convolution(im: Importer, node: Any, x: Value, w: Value, bias: Any, stride: Any, padding: Any, dilation: Any,
                 transposed: bool, output_padding: Any, groups: int) -> Value:
    return _conv(im, x, w, bias, stride, padding, dilation, transposed, output_padding, groups)


def _convolution_backward(im: Importer, node: Any, dy: Value, x: Value, w: Value, bias_sizes: Any, stride: Any,
                          padding: Any, dilation: Any, transposed: bool, output_padding: Any, groups: int,
                          output_mask: Any) -> tuple:
    """The convolution built again on its inputs (with a bias of zeros where it had one), then its ops' rules in
    reverse: (dx, dw, dbias), None where output_mask says not wanted. A convolution without a bias has bias_sizes
    None or [0] (Qwen3.5's and Olmo hybrid's)."""
    start = len(im.block.ops)
    biased = bias_sizes is not None and list(bias_sizes) != [0]
    bias = im.splat(0.0, w.type.dtype, tuple(bias_sizes)) if biased else None
    y = _conv(im, x, w, bias, stride, padding, dilation, transposed, output_padding, groups)
    g = _reverse(im, start, y, dy)
    wanted = list(output_mask)
    grads = []
    for i, v in enumerate((x, w, bias)):
        if not wanted[i]:
            grads.append(None)
        elif v is None:
            raise Unsupported("a bias gradient of a convolution without a bias")
        else:
            grads.append(g.grads.get(id(v)) or g.full(0.0, TensorType(v.type.dtype, v.type.shape)))
    return tuple(grads)


def _softplus(im: Importer, node: Any, x: Value, beta: float = 1.0, threshold: float = 20.0) -> Value:
    """log(1 + exp(beta x)) / beta; ATen's linear branch above `threshold` equals it in float32 (they differ by
    exp(-threshold))."""
    if threshold < 15:
        raise Unsupported(f"softplus with a threshold of {threshold} (its linear branch is not the function)")
    if beta == 1:
        return im.emit(T.SoftplusOp, x)
    scaled = im.emit(T.MulOp, x, im.const(float(beta), x.type.dtype))
    return im.emit(T.DivOp, im.emit(T.SoftplusOp, scaled), im.const(float(beta), x.type.dtype))


def _softplus_backward(im: Importer, node: Any, dy: Value, x: Value, beta: float = 1.0,
                       threshold: float = 20.0) -> Value:
    """softplus's own rule (sigmoid(beta x) dy)."""
    if threshold < 15:
        raise Unsupported(f"softplus_backward with a threshold of {threshold}")
    start = len(im.block.ops)
    return _reverse(im, start, _softplus(im, node, x, beta, threshold), dy).grads[id(x)]


def _reverse(im: Importer, start: int, y: Value, dy: Value) -> Any:
    """The rules of the ops made since `start` (a forward built again on its inputs), in reverse, from dy on y:
    the Grad holding each input's cotangent."""
    from sparsa.ir.autodiff import Grad

    g = Grad(im.block)
    g.flow(y, dy)
    g.reverse(im.block.ops[start:])
    return g


def _stack(im: Importer, node: Any, xs: Any, dim: int = 0) -> Value:
    xs = [im.tensor(x) for x in xs]
    d = _axis(dim, xs[0].type.rank + 1)
    parts = [im.emit(S.ExpandDimsOp, x, axes=(d,)) for x in xs]
    return parts[0] if len(parts) == 1 else im.emit(S.ConcatOp, parts, axis=d)


def _linear_scan(im: Importer, node: Any, a: Any, b: Any, dim: int, reverse: bool = False) -> Value:
    """`sparsa::linear_scan` (frontend/torch_scan.py: a parallel prefix scan folded): `scan.scan`, transposed
    where reversed (its backward)."""
    a, b = im.tensor(a), im.tensor(b)
    return im.emit(SC.ScanOp, a, b, axis=_axis(dim, max(a.type.rank, b.type.rank)), transpose=bool(reverse))


def _linear_scan_backward(im: Importer, node: Any, a: Any, h: Any, dh: Any, dim: int,
                          reverse: bool) -> tuple:
    """`sparsa::linear_scan_backward` from the saved states h: `scan.scan`'s own rule (the transposed scan of dh,
    and it times the states a step before); the transposed form's (a second derivative) is not taken."""
    if reverse:
        raise Unsupported("the backward of a transposed linear scan (a second derivative)")
    from sparsa.ir.autodiff import Grad

    a, h, dh = im.tensor(a), im.tensor(h), im.tensor(dh)
    g = Grad(im.block)
    da, db = SC.scan_rule(g, dh, a, h.type, h, _axis(dim, h.type.rank))  # (db at h's shape: b's broadcast)
    return g.broadcast_to(da, h.type), db


OPS: dict[str, Callable] = {
    "convolution.default": _convolution, "convolution_backward.default": _convolution_backward,
    "softplus.default": _softplus, "softplus_backward.default": _softplus_backward, "stack.default": _stack,
}
