"""ATen's `*_backward` ops, the ones AOTAutograd's backward graphs hold, imported as the `vjp` rules of Sparsa's
own op classes: the same derivative as `differentiate` builds, not a second transcription of PyTorch's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _axis
from sparsa.ir.core import Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R


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


OPS: dict[str, Callable] = {
    "silu_backward.default": _derivative(T.SiluOp, "input"),
    "sigmoid_backward.default": _derivative(T.SigmoidOp, "output"),
    "tanh_backward.default": _derivative(T.TanhOp, "output"), "threshold_backward.default": _threshold_backward,
    "gelu_backward.default": _gelu_backward, "_softmax_backward_data.default": _softmax_backward,
}
