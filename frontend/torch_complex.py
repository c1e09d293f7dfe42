"""Complex tensors in ATen graphs, imported as pairs of real tensors: rotary embeddings written with complex
numbers (Llama 4, DeepSeek-V2: `freqs = polar(ones, angles)`, `view_as_real(view_as_complex(x) * freqs)`).

A complex value is a `Complex(re, im)` of two real IR values of its shape. `polar`, `view_as_complex`,
`view_as_real`, `_conj` and complex arithmetic (mul, add, sub) have rules of their own; views and copies act on
both parts alike. A partition's complex inputs come in as their real views ([..., 2]) and its complex outputs leave
the same way (runtime/torch_backend.py converts at the boundary).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sparsa.frontend.torch_types import Unsupported
from sparsa.ir.core import Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S

# The complex element types, and their parts' real type.
PARTS = {"complex64": "f32", "complex128": "f64"}


class Complex(NamedTuple):
    re: Value
    im: Value


def from_real(im: Any, x: Value) -> Complex:
    """A real [..., 2] value (a complex tensor's `view_as_real`) as its complex value."""
    rank = x.type.rank

    def part(i: int) -> Value:
        starts, stops = [0] * rank, [None] * rank
        starts[-1], stops[-1] = i, i + 1
        piece = im.emit(S.SliceOp, x, starts=tuple(starts), stops=tuple(stops), steps=(1,) * rank)
        return im.emit(S.SqueezeOp, piece, axes=(rank - 1,))

    return Complex(part(0), part(1))


def to_real(im: Any, z: Complex) -> Value:
    """The real [..., 2] value of a complex one (`view_as_real`)."""
    rank = z.re.type.rank
    parts = [im.emit(S.ExpandDimsOp, p, axes=(rank,)) for p in z]
    return im.emit(S.ConcatOp, parts, axis=rank)


def _polar(im: Any, node: Any, r: Value, theta: Value) -> Complex:
    return Complex(im.emit(T.MulOp, r, im.emit(T.CosOp, theta)), im.emit(T.MulOp, r, im.emit(T.SinOp, theta)))


def _mul(im: Any, node: Any, a: Any, b: Any) -> Complex:
    if not isinstance(a, Complex):
        a, b = b, a
    if not isinstance(b, Complex):  # by a real value or scalar: each part
        return Complex(*(im.emit(T.MulOp, *im.operands(p, b)) for p in a))
    mul, add, sub = (lambda x, y, c=c: im.emit(c, x, y) for c in (T.MulOp, T.AddOp, T.SubOp))
    return Complex(sub(mul(a.re, b.re), mul(a.im, b.im)), add(mul(a.re, b.im), mul(a.im, b.re)))


def _additive(cls: type) -> Any:
    def handler(im: Any, node: Any, a: Any, b: Any, alpha: Any = 1) -> Complex:
        if alpha != 1 or not (isinstance(a, Complex) and isinstance(b, Complex)):
            raise _unsupported("add or sub of a complex and a real value, or with alpha")
        return Complex(im.emit(cls, a.re, b.re), im.emit(cls, a.im, b.im))

    return handler


def _unsupported(what: str) -> Exception:
    return Unsupported(f"complex values: {what}")


def _partwise(handler: Any) -> Any:
    """A view or copy of a complex value: the same op on each part."""

    def each(im: Any, node: Any, z: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(z, Complex):
            raise _unsupported(f"{node.target} of a real value with complex arguments")
        parts = [handler(im, node, p, *args, **kwargs) for p in z]
        if isinstance(parts[0], tuple):  # split, unbind: a tuple of complex values
            return tuple(Complex(r, i) for r, i in zip(*parts, strict=True))
        return Complex(*parts)

    return each


def _cat(im: Any, node: Any, zs: Any, dim: int = 0) -> Complex:
    from sparsa.frontend.torch_import import _cat as cat

    if not all(isinstance(z, Complex) for z in zs):
        raise _unsupported("cat of complex and real values")
    return Complex(cat(im, node, [z.re for z in zs], dim), cat(im, node, [z.im for z in zs], dim))


def _to_copy(im: Any, node: Any, z: Complex, dtype: Any = None) -> Complex:
    import torch

    if dtype is not None and dtype not in (torch.complex64, torch.complex128):
        raise _unsupported(f"a cast to {dtype}")
    want = PARTS[str(dtype).removeprefix("torch.")] if dtype is not None else z.re.type.dtype
    return Complex(*(im.cast(p, want) for p in z))


def handlers(table: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ops that make or read complex values, by ATen name: added to the importer's table; the rules taking a
    complex operand, by ATen name), the views' rules built from the importer's own `table`."""
    makers = {"polar.default": _polar,
              "view_as_complex.default": lambda im, node, x: from_real(im, x),
              "view_as_real.default": lambda im, node, z: to_real(im, z),
              "_conj.default": lambda im, node, z: Complex(z.re, im.emit(T.NegOp, z.im))}
    views = ["view.default", "_unsafe_view.default", "reshape.default", "unsqueeze.default", "squeeze.dim",
             "squeeze.dims", "squeeze.default", "expand.default", "slice.Tensor", "select.int", "permute.default",
             "transpose.int", "t.default", "clone.default", "alias.default", "detach.default", "split.Tensor",
             "split_with_sizes.default", "unbind.int", "flip.default"]
    rules = {name: _partwise(table[name]) for name in views}
    rules.update({"mul.Tensor": _mul, "add.Tensor": _additive(T.AddOp), "sub.Tensor": _additive(T.SubOp),
                  "cat.default": _cat, "_to_copy.default": _to_copy, **makers})
    return makers, rules
