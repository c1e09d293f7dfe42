"""`tensor` dialect, data-movement part: matmul, reshape, transpose, slices, gathers, concat, split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir import intervals as I
from sparsa.ir.analysis import Cost, RuntimeShapeError
from sparsa.ir.core import Attr, Operand, Operation, Result, Value
from sparsa.ir.dialects.tensor import broadcast_result, same_dtype
from sparsa.ir.dims import Dim, broadcast_shapes, canonical, compatible, format_dim, mul, same
from sparsa.ir.traits import View, unknown_dim
from sparsa.ir.types import TensorType, is_int


def normalize_axis(op: Operation, axis: int, rank: int) -> int:
    """`axis` in [0, rank), accepting Python-style negative axes; a verify error when out of range."""
    if not -rank <= axis < rank:
        raise op.error(f"axis {axis} is out of range for rank {rank}")
    return axis % rank


class MatmulOp(Operation):
    """a @ b with numpy.matmul semantics (batched, broadcasting, 1-D promotion)."""

    NAME = "tensor.matmul"
    lhs = Operand()
    rhs = Operand()
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        a, b = shapes
        batch = np.broadcast_shapes(a[:-2], b[:-2])
        return [batch + a[-2:-1] + b[-1:] if len(b) > 1 else batch + a[-2:-1]]

    def infer(self) -> list[TensorType]:
        return [matmul_type(self, self.lhs.type, self.rhs.type)]

    def result_shapes(self, ctx: Any, operands: Sequence[Any]) -> list[tuple[int, ...]]:
        shapes = super().result_shapes(ctx, operands)
        self.check_unknown_dims([tuple(a.shape) for a in operands], tuple(shapes[0]))
        return shapes

    def check_unknown_dims(self, operands: list[tuple[int, ...]], result: tuple[int, ...]) -> None:
        """As Elementwise's: a batch dim typed `?` is the result's at run time (a kernel broadcasts only a dim
        typed 1), and a contracted dim typed `?` the other operand's."""
        a, b = self.lhs.type, self.rhs.type
        if a.rank < 2 or b.rank < 2 or [len(s) for s in operands] != [a.rank, b.rank]:
            return
        batch = result[:-2]
        for i, (t, shape) in enumerate(zip((a, b), operands, strict=True)):
            lead = len(batch) - (t.rank - 2)
            for axis, (d, n) in enumerate(zip(t.shape[:-2], shape[:-2], strict=True)):
                if d is None and n != batch[lead + axis]:
                    unknown_dim(self, i, axis, n, f"{batch[lead + axis]} in the result")
        k = (a.shape[-1], b.shape[-2])
        if None in k and operands[0][-1] != operands[1][-2]:
            i = k.index(None)
            unknown_dim(self, i, (a.rank - 1, b.rank - 2)[i], operands[i][(-1, -2)[i]],
                        f"{operands[1 - i][(-2, -1)[i]]} in operand {1 - i}", "the contracted dims differ")

    def reference(self, ctx: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.matmul(a, b)

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        f = 2.0 * outs[0].size * args[0].shape[-1]
        return Cost(f, f)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dA = dY @ B^T and dB = A^T @ dY, 1-D operands promoted as matmul does, batch dims summed back."""
        (a, b), dy = xs, dys[0]
        a2 = a if a.type.rank > 1 else g.emit("tensor.expand_dims", a, axes=[0])
        b2 = b if b.type.rank > 1 else g.emit("tensor.expand_dims", b, axes=[1])
        dy2 = dy
        if a.type.rank == 1:
            dy2 = g.emit("tensor.expand_dims", dy2, axes=[dy2.type.rank - (0 if b.type.rank == 1 else 1)])
        if b.type.rank == 1:
            dy2 = g.emit("tensor.expand_dims", dy2, axes=[dy2.type.rank])
        da = g.unbroadcast(g.emit("tensor.matmul", dy2, g.transpose_last(b2)), a2.type)
        db = g.unbroadcast(g.emit("tensor.matmul", g.transpose_last(a2), dy2), b2.type)
        if a.type.rank == 1:
            da = g.emit("tensor.squeeze", da, axes=[0])
        if b.type.rank == 1:
            db = g.emit("tensor.squeeze", db, axes=[1])
        return [da, db]


def matmul_type(op: Operation, a: TensorType, b: TensorType) -> TensorType:
    """Result type of numpy.matmul on `a` and `b`, or a verify error naming the contracted dims."""
    dt = same_dtype(op, a, b)
    if dt == "i1" or a.rank == 0 or b.rank == 0:
        raise op.error(f"needs numeric operands of rank >= 1, got {a} and {b}")
    sa = a.shape if a.rank > 1 else (1,) + a.shape
    sb = b.shape if b.rank > 1 else b.shape + (1,)
    if not compatible(sa[-1], sb[-2]):
        raise op.error(
            f"contracts dim {format_dim(sa[-1])} of {a} with dim {format_dim(sb[-2])} of {b}"
        )
    try:
        batch = broadcast_shapes(sa[:-2], sb[:-2])
    except ValueError as e:
        raise op.error(f"batch dims of {a} and {b} do not broadcast: {e}") from None
    shape = batch + ((sa[-2],) if a.rank > 1 else ()) + ((sb[-1],) if b.rank > 1 else ())
    return TensorType(dt, shape)


class ReshapeOp(View, Operation):
    """The same elements in row-major order with a new shape (one -1 is inferred)."""

    NAME = "tensor.reshape"
    x = Operand()
    shape = Attr(A.DIMS)
    result = Result()

    def infer(self) -> list[TensorType]:
        shape = list(self.shape)
        if shape.count(-1) > 1:
            raise self.error("allows at most one -1 in the new shape")
        if -1 in shape:
            shape[shape.index(-1)] = _remaining(list(self.x.type.shape), [d for d in shape if d != -1])
        src, dst = self.x.type.shape, tuple(shape)
        if all(isinstance(d, int) for d in src + dst) and int(np.prod(src)) != int(np.prod(dst)):
            raise self.error(f"cannot reshape {self.x.type} ({int(np.prod(src))} elements) to "
                             f"[{', '.join(map(format_dim, dst))}] ({int(np.prod(dst))} elements)")
        return [TensorType(self.x.type.dtype, dst)]

    def result_shapes(self, ctx: Any, operands: Sequence[Any]) -> list[tuple[int, ...]]:
        """Operation's, checked: over symbolic dims the types do not prove the element counts equal (an import
        retypes a value to the sizes PyTorch's guards know), so a call where they differ is an error, not a view
        past the end of a buffer."""
        shapes = super().result_shapes(ctx, operands)
        n, m = int(np.prod(operands[0].shape)), int(np.prod(shapes[0]))
        if n != m:
            raise RuntimeShapeError(f"'{self.NAME}' of an operand of shape {list(operands[0].shape)} ({n} elements) to "
                                    f"{self.result.type}, {list(shapes[0])} ({m} elements) in this call", self.loc)
        return shapes

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return x.reshape([ctx.dim(d) if d != -1 else -1 for d in self.shape])

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY reshaped back to the operand's shape."""
        shape = [-1 if d is None else d for d in xs[0].type.shape]
        return [g.emit("tensor.reshape", dys[0], shape=shape)]


def _remaining(src: list[Dim], known: list[Dim]) -> Dim:
    """The dim -1 stands for: `known`'s symbolic factors cancelled against `src`'s, and the product of `src`'s
    int factors divided by `known`'s ([s, 8] to [-1, 4, 2] is [s, 4, 2]); None where that does not divide."""
    rest = [d for d in src if not isinstance(d, int)]
    for d in known:
        if not isinstance(d, int):
            if d not in rest:
                return None
            rest.remove(d)
    total = int(np.prod([d for d in src if isinstance(d, int)]))
    part = int(np.prod([d for d in known if isinstance(d, int)]))
    if not part or total % part:
        return None
    out: Dim = total // part
    for d in rest:
        out = mul(out, d)
    return out


class TransposeOp(View, Operation):
    """Permutes the axes: result axis i is input axis perm[i]."""

    NAME = "tensor.transpose"
    x = Operand()
    perm = Attr(A.INTS)
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [tuple(shapes[0][p] for p in self.perm)]

    def infer(self) -> list[TensorType]:
        t = self.x.type
        if sorted(self.perm) != list(range(t.rank)):
            raise self.error(f"perm {list(self.perm)} is not a permutation of the {t.rank} axes of {t}")
        return [TensorType(t.dtype, tuple(t.shape[p] for p in self.perm))]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return np.transpose(x, self.perm)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY transposed back (the inverse permutation)."""
        inverse = [0] * len(self.perm)
        for i, p in enumerate(self.perm):
            inverse[p] = i
        return [g.emit("tensor.transpose", dys[0], perm=inverse)]


class ExpandDimsOp(View, Operation):
    """Inserts size-1 axes at the given positions of the result (NumPy's `x[..., None]`)."""

    NAME = "tensor.expand_dims"
    x = Operand()
    axes = Attr(A.INTS)
    result = Result()

    def infer(self) -> list[TensorType]:
        rank = self.x.type.rank + len(self.axes)
        axes = sorted(normalize_axis(self, a, rank) for a in self.axes)
        if len(set(axes)) != len(axes):
            raise self.error(f"repeats an axis in {list(self.axes)}")
        dims = iter(self.x.type.shape)
        return [TensorType(self.x.type.dtype, tuple(1 if i in axes else next(dims) for i in range(rank)))]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return np.expand_dims(x, tuple(self.axes))

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY with the new axes squeezed away."""
        return [g.emit("tensor.squeeze", dys[0], axes=list(self.axes))]


class SqueezeOp(View, Operation):
    """Removes the given size-1 axes."""

    NAME = "tensor.squeeze"
    x = Operand()
    axes = Attr(A.INTS)
    result = Result()

    def infer(self) -> list[TensorType]:
        t = self.x.type
        axes = {normalize_axis(self, a, t.rank) for a in self.axes}
        for a in axes:
            if t.shape[a] not in (1, None):
                raise self.error(f"cannot squeeze axis {a} of size {format_dim(t.shape[a])} in {t}")
        return [TensorType(t.dtype, tuple(d for i, d in enumerate(t.shape) if i not in axes))]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return np.squeeze(x, tuple(self.axes))

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY with the squeezed axes put back."""
        axes = sorted(a % xs[0].type.rank for a in self.axes)
        return [g.emit("tensor.expand_dims", dys[0], axes=axes)]


class SliceOp(View, Operation):
    """x[start:stop:step] on every axis (Python slice rules; a `?` stop runs to the end). A symbolic start (`{n-4}`,
    a size known at run time) is an offset from the axis's beginning, at most the stop, with step 1."""

    NAME = "tensor.slice"
    x = Operand()
    starts = Attr(A.DIMS)
    stops = Attr(A.DIMS)
    steps = Attr(A.INTS)
    result = Result()

    def infer(self) -> list[TensorType]:
        t = self.x.type
        if not len(self.starts) == len(self.stops) == len(self.steps) == t.rank:
            raise self.error(f"needs starts, stops and steps for each of the {t.rank} axes of {t}")
        if 0 in self.steps:
            raise self.error("step must not be zero")
        for a, s in zip(self.starts, self.steps, strict=True):
            if a is None:
                raise self.error("needs every start: an integer or a size (`?` is for stops)")
            if not isinstance(a, int) and s != 1:
                raise self.error(f"a start of {format_dim(a)} needs step 1 (a symbolic start: an offset from the "
                                 "axis's beginning)")
        return [TensorType(t.dtype, tuple(
            _slice_len(d, a, b, s) for d, a, b, s in zip(t.shape, self.starts, self.stops, self.steps, strict=True)
        ))]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        index = self.checked(ctx, x.shape)
        return x[index]

    def result_shapes(self, ctx: Any, operands: Sequence[Any]) -> list[tuple[int, ...]]:
        index = self.checked(ctx, operands[0].shape)
        return [tuple(len(range(n)[i]) for n, i in zip(operands[0].shape, index, strict=True))]

    def checked(self, ctx: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
        """The slice's index in this call, its length checked against the type: over a symbolic dim, the type took
        the bounds to lie inside the axis, in order (x[-2:] of s rows is 2 rows: not where s is 1)."""
        index = tuple(slice(ctx.dim(a), None if b is None else ctx.dim(b), s)
                      for a, b, s in zip(self.starts, self.stops, self.steps, strict=True))
        for axis, (a, i) in enumerate(zip(self.starts, index, strict=True)):
            if not isinstance(a, int) and i.start < 0:
                raise RuntimeShapeError(f"'{self.NAME}' starts at {format_dim(a)} = {i.start} along dim {axis}: a "
                                        "symbolic start is an offset from the axis's beginning, not below 0", self.loc)
        for axis, (d, n, i) in enumerate(zip(self.result.type.shape, shape, index, strict=True)):
            if d is not None and ctx.dim(d) != len(range(n)[i]):
                raise RuntimeShapeError(
                    f"'{self.NAME}' of an operand of shape {list(shape)} has {len(range(n)[i])} at dim {axis}, but "
                    f"its type {self.result.type} says {ctx.dim(d)}: its bounds do not lie inside the axis, in "
                    "order", self.loc)
        return index

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY put back where the slice took it from, zeros around it. A negative step takes the rows of a positive
        one, reversed: dY reversed, then put back (over a symbolic dim, only the whole axis reversed)."""
        x, dy = xs[0], dys[0]
        out = dy
        for axis, (start, stop, step) in enumerate(zip(self.starts, self.stops, self.steps, strict=True)):
            if (start, stop, step) == (0, None, 1):
                continue
            n = x.type.shape[axis]
            if step < 0:
                rank = out.type.rank
                flip = [(-1, None, -1) if a == axis else (0, None, 1) for a in range(rank)]
                out = g.emit("tensor.slice", out, starts=[f[0] for f in flip], stops=[f[1] for f in flip],
                             steps=[f[2] for f in flip])
                if (start, stop, step) == (-1, None, -1):
                    continue
                if not isinstance(n, int) or not (stop is None or isinstance(stop, int)):
                    raise self.error("has no derivative yet for a negative step over a symbolic dim, other than "
                                     "the whole axis reversed")
                rows = range(n)[slice(start, stop, step)]
                start, stop, step = (rows[-1], rows[0] + 1, -step) if rows else (0, 0, 1)
            if n is None or out.type.shape[axis] is None:
                raise self.error("has no derivative yet for dims of unknown size")
            try:
                out = put_back(g, out, axis, x.type.shape[axis], start, step, stop)
            except ValueError as e:
                raise self.error(f"has no derivative here: {e}") from None
        return [out]


def put_back(g: Any, taken: Value, axis: int, n: Dim, start: Dim, step: int, stop: Dim | None = None) -> Value:
    """The transpose of taking rows start:stop:step (Python's bounds, step >= 1) along `axis` of an axis of n:
    `taken` in those rows, zeros in the others (each taken row followed by step - 1 zero rows, cut to the span,
    zeros around it). `g` builds the ops (ir/autodiff.py's Grad). Over a symbolic n the bounds are taken to lie
    inside the axis, in order, as the slice's type took them (`_slice_len`; each call checks the slice); the
    start may be symbolic too (`n-7`). ValueError where the rows would run past the axis."""
    dtype, m = taken.type.dtype, taken.type.shape[axis]
    if isinstance(n, int) and isinstance(start, int) and (stop is None or isinstance(stop, int)):
        start, end, _ = slice(start, stop, step).indices(n)
        span = 0 if m == 0 else min(m * step, max(end - start, 0))
        first, rest = start, n - start - span
    else:
        if m is None:
            raise ValueError("rows put back from a slice of unknown length")
        end = n if stop is None else canonical(f"({n})-{-stop}") if isinstance(stop, int) and stop < 0 else stop
        first = start
        if isinstance(start, int) and start < 0:  # contiguous rows: the last m before `end`, however far back
            first = canonical(f"({end})-({m})") if step == 1 else canonical(f"({n})-{-start}")  # the start reached
        span, rest = canonical(f"({end})-({first})"), canonical(f"({n})-({end})")
        if any(isinstance(d, int) and d < 0 for d in (first, span, rest)):
            raise ValueError("rows put back past the end of their axis")
    out = taken
    if step != 1 and isinstance(n, int) and n == m * step and first < step:
        # every step-th row from row start < step, to the end: the rows as piece `start` of step interleaved ones,
        # the others zeros (so that the sum of the slices' put-backs that tile the axis is one concat: GPT-OSS's
        # interleaved gate and up)
        spread = g.emit("tensor.expand_dims", out, axes=[axis + 1])
        pieces = [spread if i == first else g.zeros_like(spread) for i in range(step)]
        return g.emit("tensor.reshape", g.emit("tensor.concat", pieces, axis=axis + 1), shape=list(
            taken.type.shape[:axis]) + [n] + list(taken.type.shape[axis + 1:]))
    if step != 1 and m != 0:
        spread = g.emit("tensor.expand_dims", out, axes=[axis + 1])
        gaps = list(spread.type.shape)
        gaps[axis + 1] = step - 1
        spread = g.emit("tensor.concat", [spread, g.full(0.0, TensorType(dtype, tuple(gaps)))], axis=axis + 1)
        shape = list(out.type.shape)
        shape[axis] = canonical(f"({m})*{step}")
        out = g.emit("tensor.reshape", spread, shape=shape)
    if not same(out.type.shape[axis], span):  # the taken rows' span: their last one's zeros cut
        rank = out.type.rank
        stops: list[Any] = [None] * rank
        stops[axis] = span
        out = g.emit("tensor.slice", out, starts=[0] * rank, stops=stops, steps=[1] * rank)
    pieces = []
    for size in (first, None, rest):
        if size is None:
            pieces.append(out)
        elif size:
            shape = list(out.type.shape)
            shape[axis] = size
            pieces.append(g.full(0.0, TensorType(dtype, tuple(shape))))
    return pieces[0] if len(pieces) == 1 else g.emit("tensor.concat", pieces, axis=axis)


def _slice_len(d: Dim, start: Dim, stop: Dim, step: int) -> Dim:
    """The length of d[start:stop:step]. Over a symbolic d, bounds counted from one end are taken to lie inside d
    (x[-1:] of s rows is 1 row, x[2:] is s-2, x[:-1] is s-1: the run checks each result against its type); a
    length that depends on where they fall (x[-3:5]) or a negative step other than a reversal (x[::-1]) is `?`.
    A symbolic start (step 1) is an offset from the beginning, at most the stop: x[a:] is d-a, x[a:b] b-a."""
    if isinstance(start, str):
        end = d if stop is None else stop if isinstance(stop, str) or stop >= 0 else \
            None if d is None else canonical(f"({d})-{-stop}")
        return None if end is None else canonical(f"({end})-({start})")
    if isinstance(d, int) and (stop is None or isinstance(stop, int)):
        return len(range(d)[slice(start, stop, step)])
    if (start, stop, step) in ((0, None, 1), (-1, None, -1)):  # the whole axis (reversed): its dim as written
        return d
    if d is None or step < 1 or not (stop is None or isinstance(stop, int)):
        return canonical(f"{stop}-{start}") if isinstance(stop, str) and start >= 0 and step == 1 else None
    if start >= 0:
        n = d if stop is None else f"{d}-{start - stop}" if stop < 0 else max(stop - start, 0)
        n = canonical(f"{n}-{start}") if stop is None and start and isinstance(n, str) else n
    else:
        n = -start if stop is None else max(stop - start, 0) if stop < 0 else None
    if n is None or step == 1:
        return canonical(n) if isinstance(n, str) else n
    top = canonical(f"{n}+{step - 1}")  # the ceiling of n / step
    if isinstance(top, int):
        return top // step
    return f"{top}//{step}" if "+" not in top and "-" not in top else f"({top})//{step}"


class GatherOp(Operation):
    """x[i0, i1, ...]: NumPy advanced indexing of the leading axes by broadcast integer index tensors."""

    NAME = "tensor.gather"
    x = Operand()
    indices = Operand(variadic=True)
    result = Result()

    def interval(self, n: Any, *args: I.Interval) -> I.Interval:
        return n.gather(self.x, self.result.type, list(args[1:]))

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return [np.broadcast_shapes(*shapes[1:]) + shapes[0][len(shapes) - 1:]]

    def infer(self) -> list[TensorType]:
        t = self.x.type
        idx = [i.type for i in self.indices]
        if not idx or len(idx) > t.rank:
            raise self.error(f"needs 1 to {t.rank} index tensors for {t}, got {len(idx)}")
        for i in idx:
            if not is_int(i.dtype):
                raise self.error(f"index tensors must be integers, got {i}")
        lead = broadcast_result(self, t.dtype, *idx).shape
        return [TensorType(t.dtype, lead + t.shape[len(idx):])]

    def reference(self, ctx: Any, x: np.ndarray, *indices: np.ndarray) -> np.ndarray:
        self.check_indices(x.shape, indices)
        return x[tuple(indices)]

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY added back at the places read (scatter-add into zeros); nothing to the indices."""
        x, idx = xs[0], xs[1:]
        lead = TensorType("i64", ys[0].type.shape[:ys[0].type.rank - (x.type.rank - len(idx))])
        idx = [g.broadcast_to(i, TensorType(i.type.dtype, lead.shape)) for i in idx]
        return [g.emit("tensor.scatter_add", g.zeros_like(x), dys[0], idx), *[None] * len(idx)]

    @staticmethod
    def check_indices(shape: tuple[int, ...], indices: Sequence[np.ndarray]) -> None:
        """IndexError unless every index is in -n..n-1 of its axis (negative ones count from the end)."""
        for axis, i in enumerate(indices):
            n = shape[axis]
            if i.size and (i.min() < -n or i.max() >= n):
                bad = int(i[(i < -n) | (i >= n)].flat[0])
                raise IndexError(f"index {bad} is out of range for axis {axis} of size {n}")


class ScatterAddOp(Operation):
    """base with `updates` added at x[i0, i1, ...] (the places `tensor.gather` reads; repeated places add up):
    index tensors of one shape S, updates of shape S + base's remaining dims (the transpose of a gather)."""

    NAME = "tensor.scatter_add"
    base = Operand()
    updates = Operand()
    indices = Operand(variadic=True)
    result = Result()

    def infer(self) -> list[TensorType]:
        t, u = self.base.type, self.updates.type
        idx = [i.type for i in self.indices]
        if not idx or len(idx) > t.rank or any(not is_int(i.dtype) for i in idx):
            raise self.error(f"needs 1 to {t.rank} integer index tensors for {t}")
        lead = idx[0].shape
        if any(len(i.shape) != len(lead) or not all(compatible(a, b) for a, b in zip(i.shape, lead, strict=True))
               for i in idx):
            raise self.error(f"index tensors must have one shape, got {', '.join(map(str, idx))}")
        want = lead + t.shape[len(idx):]
        if u.dtype != t.dtype or len(u.shape) != len(want) or not all(
                compatible(a, b) for a, b in zip(u.shape, want, strict=True)):
            raise self.error(f"updates must be {t.dtype} of shape index + the base's remaining dims, got {u}")
        return [t.without_layout()]

    def reference(self, ctx: Any, base: np.ndarray, updates: np.ndarray, *indices: np.ndarray) -> np.ndarray:
        GatherOp.check_indices(base.shape, indices)
        out = np.array(base, copy=True)
        np.add.at(out, tuple(indices), updates)
        return out

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY to the base; to the updates, dY gathered at the same places."""
        dy = dys[0]
        return [dy, g.emit("tensor.gather", dy, list(xs[2:])), *[None] * len(xs[2:])]


class ConcatOp(Operation):
    """Joins tensors along `axis`; the other dims must agree."""

    NAME = "tensor.concat"
    inputs = Operand(variadic=True)
    axis = Attr(A.INT)
    result = Result()

    def shape_rule(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        axis = self.axis % len(shapes[0])
        return [tuple(sum(s[axis] for s in shapes) if i == axis else n for i, n in enumerate(shapes[0]))]

    def infer(self) -> list[TensorType]:
        types = [v.type for v in self.inputs]
        if not types:
            raise self.error("needs at least one input")
        dt = same_dtype(self, *types)
        rank = types[0].rank
        axis = normalize_axis(self, self.axis, rank)
        out = list(types[0].shape)
        for t in types[1:]:
            if t.rank != rank or not all(
                compatible(a, b) for i, (a, b) in enumerate(zip(out, t.shape, strict=True)) if i != axis
            ):
                raise self.error(f"inputs {types[0]} and {t} disagree outside axis {axis}")
            out[axis] = _add(out[axis], t.shape[axis])
        return [TensorType(dt, tuple(out))]

    def reference(self, ctx: Any, *xs: np.ndarray) -> np.ndarray:
        return np.concatenate(xs, axis=self.axis)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """Each input's slice of dY: a split where the sizes are known, else slices from the nearer end whose offset
        is a number (zeros padded before and after a sequence of symbolic length L: [0:3], [3:-2], [-2:])."""
        axis = self.axis % ys[0].type.rank
        sizes = [x.type.shape[axis] for x in xs]
        if all(isinstance(s, int) for s in sizes):
            return list(g.op("tensor.split", dys[0], sizes=sizes, axis=axis).results)
        if None in sizes:
            raise self.error("has no derivative yet when an input's size along the axis is unknown (?)")
        rank, pieces = ys[0].type.rank, []
        for i, size in enumerate(sizes):
            before, after = sizes[:i], sizes[i + 1:]
            if all(isinstance(s, int) for s in before):
                start, stop = sum(before), canonical("+".join(f"({s})" for s in [*before, size]))
            elif all(isinstance(s, int) for s in after):
                if not isinstance(size, int):
                    raise self.error("has no derivative yet for two inputs of symbolic size along the axis")
                start, stop = (-size - sum(after), -sum(after) or None) if size else (-1, -1)  # ([-1:-1]: nothing)
            else:
                raise self.error("has no derivative yet for an input between inputs of symbolic size along the axis")
            starts, stops = [0] * rank, [None] * rank
            starts[axis], stops[axis] = start, stop
            pieces.append(g.emit("tensor.slice", dys[0], starts=starts, stops=stops, steps=[1] * rank))
        return pieces


def _add(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    if a is None or b is None:
        return None
    if a == 0 or b == 0:
        return b if a == 0 else a
    return f"{a}+{b}"


class SplitOp(View, Operation):
    """Cuts `x` along `axis` into pieces of the given sizes (which must add up to the dim)."""

    NAME = "tensor.split"
    x = Operand()
    sizes = Attr(A.INTS)
    axis = Attr(A.INT)
    results = Result(variadic=True)

    def infer(self) -> list[TensorType]:
        t = self.x.type
        axis = normalize_axis(self, self.axis, t.rank)
        if isinstance(t.shape[axis], int) and sum(self.sizes) != t.shape[axis]:
            raise self.error(f"sizes {list(self.sizes)} add up to {sum(self.sizes)}, "
                             f"but axis {axis} of {t} has {t.shape[axis]}")
        return [TensorType(t.dtype, t.shape[:axis] + (s,) + t.shape[axis + 1:]) for s in self.sizes]

    def reference(self, ctx: Any, x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(np.split(x, np.cumsum(self.sizes)[:-1], axis=self.axis))

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """The pieces' cotangents joined (zeros for a piece nothing flowed to)."""
        parts = [d if d is not None else g.zeros_like(y) for d, y in zip(dys, ys, strict=True)]
        return [g.emit("tensor.concat", parts, axis=self.axis)]


class BroadcastToOp(View, Operation):
    """Broadcasts `x` to `shape` with NumPy's rules."""

    NAME = "tensor.broadcast_to"
    x = Operand()
    shape = Attr(A.DIMS)
    result = Result()

    def infer(self) -> list[TensorType]:
        out = broadcast_result(self, self.x.type.dtype, self.x.type, TensorType("i1", self.shape))
        if len(out.shape) != len(self.shape) or any(
            isinstance(o, int) and isinstance(s, int) and o != s for o, s in zip(out.shape, self.shape, strict=True)
        ):
            raise self.error(f"cannot broadcast {self.x.type} to [{', '.join(map(format_dim, self.shape))}]")
        return [TensorType(self.x.type.dtype, tuple(self.shape))]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        return np.broadcast_to(x, [ctx.dim(d) for d in self.shape]).copy()

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """dY summed over the broadcast dims."""
        return [g.unbroadcast(dys[0], xs[0].type)]


