"""ATen's ops that pad, crop or rotate one axis (registered in `torch_import`'s table), built of slices of it and
constants joined along it: `constant_pad_nd` and `roll`; and `fold_pad_slices`, the graph rewrite that drops a
padding sliced straight back off (SDPA's mask alignment on CUDA)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sparsa.frontend.torch_import import Importer, Unsupported, _axis, _slice, _view
from sparsa.ir.core import Value
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dims import canonical


def _constant_pad_nd(im: Importer, node: Any, x: Value, pad: Any, value: Any = 0) -> Value:
    """Padding before and after dims (pairs from the last dim backwards) as a concat with splat constants; a
    negative amount crops (a slice). An amount known only at run time is a dim expression, taken where the shape
    environment knows its sign: Mamba2 pads to whole chunks by `(c - L % c) % c` rows, and its backward crops them
    off again."""
    pad = list(pad)
    out = x
    for i in range(0, len(pad), 2):
        d = x.type.rank - 1 - i // 2
        signs = [_sign(pad[j], node, j) for j in (i, i + 1)]
        if None in signs:
            raise Unsupported("constant_pad_nd by amounts known only at run time, of a sign not known")
        before, after = pad[i], pad[i + 1]
        n = out.type.shape[d]
        if signs[0] < 0 or signs[1] < 0:
            crop = [canonical(f"-({a})") if s < 0 else 0 for a, s in zip((before, after), signs, strict=True)]
            if not isinstance(crop[0], int) or crop[1] and n is None:
                raise Unsupported("constant_pad_nd cropping a dim of unknown size, or its start by a run-time amount")
            starts, stops = [0] * out.type.rank, [None] * out.type.rank
            starts[d], stops[d] = crop[0], canonical(f"({n})-({crop[1]})") if crop[1] else None
            out = im.emit(S.SliceOp, out, starts=tuple(starts), stops=tuple(stops), steps=(1,) * out.type.rank)
        parts = []
        for amount, sign in ((before, signs[0]), (None, 0), (after, signs[1])):
            if amount is None:
                parts.append(out)
            elif sign > 0:
                shape = tuple(amount if j == d else n for j, n in enumerate(out.type.shape))
                parts.append(im.splat(value, out.type.dtype, shape))
        out = parts[0] if len(parts) == 1 else im.emit(S.ConcatOp, parts, axis=d)
    return out


def _sign(amount: Any, node: Any, j: int) -> int | None:
    """1 for a padding, -1 for a crop, 0 for neither; for a dim expression (the SymInt of the node's j-th amount), the
    sign the shape environment's value ranges prove; None where they prove none, or for a size the dim language
    cannot write."""
    if isinstance(amount, int):
        return (amount > 0) - (amount < 0)
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    amounts = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
    val = getattr(amounts[j], "meta", {}).get("val")
    if not isinstance(amount, str) or type(val).__name__ != "SymInt":
        return None
    return 1 if statically_known_true(val >= 0) else -1 if statically_known_true(val <= 0) else None


def _roll(im: Importer, node: Any, x: Value, shifts: Any, dims: Any = ()) -> Value:
    """x rolled by `shifts` along `dims` (all elements, flattened, without dims): per dim, its last `shift`
    elements then the rest, as a concat of two slices (Swin's shifted windows)."""
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        flat = _view(im, node, x, [-1])
        return _view(im, node, _roll(im, node, flat, shifts, [0]), list(x.type.shape))
    if len(shifts) != len(dims) or not all(isinstance(s, int) for s in shifts):
        raise Unsupported(f"roll by {shifts} along {dims}")
    for shift, dim in zip(shifts, dims, strict=True):
        d = _axis(dim, x.type.rank)
        n = x.type.shape[d]
        if not isinstance(n, int):
            raise Unsupported("roll along a symbolic dim")
        s = shift % n if n else 0
        if s:
            x = im.emit(S.ConcatOp, [_slice(im, node, x, d, n - s, None), _slice(im, node, x, d, 0, n - s)], axis=d)
    return x


def fold_pad_slices(gm: Any) -> int:
    """Replace `constant_pad_nd(x, [0, p])[..., :n]`, padding at the end of one dim sliced straight back to
    x's size n, by x; returns how many (the caller removes what became dead). This is how SDPA aligns a
    mask on CUDA: the padding is never read, and with a dynamic sequence length its width is a size
    expression (Mod(8 - Mod(s0, 8), 8)) that the IR has no form for."""
    import torch

    aten = torch.ops.aten
    folded = 0
    for pad in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.constant_pad_nd.default]:
        x, widths = pad.args[0], list(pad.args[1])
        val = x.meta.get("val") if hasattr(x, "meta") else None
        if val is None or any(not (isinstance(w, int) and w == 0) for w in widths[0::2]):
            continue  # padding before a dim's start
        dims = [val.dim() - 1 - i for i, w in enumerate(widths[1::2]) if not (isinstance(w, int) and w == 0)]
        if len(dims) != 1 or not pad.users or not all(_slices_back(u, pad, val, dims[0]) for u in pad.users):
            continue
        for user in list(pad.users):
            user.replace_all_uses_with(x)
        folded += 1
    return folded


def _slices_back(node: Any, padded: Any, val: Any, dim: int) -> bool:
    """node = padded[..., 0:n] along `dim`, n being the unpadded size `val.shape[dim]`."""
    import torch

    if node.op != "call_function" or node.target is not torch.ops.aten.slice.Tensor or node.args[0] is not padded:
        return False
    d, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    end = end.meta.get("val") if hasattr(end, "meta") else end
    return d % val.dim() == dim and start in (0, None) and step == 1 and str(end) == str(val.shape[dim])


OPS: dict[str, Callable] = {"constant_pad_nd.default": _constant_pad_nd, "roll.default": _roll}
