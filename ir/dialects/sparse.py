"""`sparse` dialect: conversion to sparse layouts (`#bsr`, `#nm`) and matmul with a sparse weight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparsa.ir import attrs as A
from sparsa.ir.analysis import Cost
from sparsa.ir.core import Attr, Operand, Operation, Result
from sparsa.ir.dialects.tensor_shape import matmul_type
from sparsa.ir.types import Layout, TensorType


def layout_violation(w: np.ndarray, layout: Layout) -> str | None:
    """Why the dense 2-D array `w` does not fit `layout`, naming the first offending block or group; else None.

    A `#bsr<R x C>` weight fits when its dims are multiples of the block; every block may be
    zero or not. A `#nm<N:M>` weight `[K, N_out]` has at most N nonzeros in each group of M
    consecutive rows down every column (the reduction axis of `x @ w`).
    """
    if w.ndim != 2:
        return f"a sparse layout needs a 2-D weight, got shape {list(w.shape)}"
    rows, cols = w.shape
    if layout.kind == "bsr":
        br, bc = layout.params
        if rows % br or cols % bc:
            return f"shape {list(w.shape)} is not a multiple of the {br}x{bc} block"
        return None
    n, m = layout.params
    if rows % m:
        return f"reduction dim {rows} is not a multiple of the group size {m}"
    counts = (w.reshape(rows // m, m, cols) != 0).sum(axis=1)
    bad = np.argwhere(counts > n)
    if bad.size:
        g, c = (int(i) for i in bad[0])
        return (f"group of rows {g * m}..{g * m + m - 1} in column {c} has {int(counts[g, c])} nonzeros, "
                f"more than {n} of {m}")
    return None


class ConvertOp(Operation):
    """The same values stored in sparse layout `layout` ("bsr" or "nm") with parameters `block`."""

    NAME = "sparse.convert"
    x = Operand()
    layout = Attr(A.StrKind(("bsr", "nm")))
    block = Attr(A.INTS)
    result = Result()

    def infer(self) -> list[TensorType]:
        t = self.x.type
        if t.rank != 2 or len(self.block) != 2:
            raise self.error(f"needs a 2-D tensor and two block parameters, got {t} and {list(self.block)}")
        lay = Layout(self.layout, (self.block[0], self.block[1]))
        if self.layout == "nm" and not 0 < self.block[0] <= self.block[1]:
            raise self.error(f"#nm<{self.block[0]}:{self.block[1]}> needs 0 < N <= M")
        steps = self.block if self.layout == "bsr" else (self.block[1], 1)
        for d, s in zip(t.shape, steps, strict=True):
            if isinstance(d, int) and d % s:
                raise self.error(f"dims of {t} must be multiples of {lay}")
        return [TensorType(t.dtype, t.shape, lay)]

    def reference(self, ctx: Any, x: np.ndarray) -> np.ndarray:
        why = layout_violation(x, self.result.type.layout)
        if why:
            raise ValueError(f"value does not fit {self.result.type.layout}: {why}")
        return x

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        return [dys[0]]  # the same values (sparse.matmul's rule keeps the cotangent on the pattern)


class SparseMatmulOp(Operation):
    """x @ w where w carries a sparse layout; the value equals the dense product."""

    NAME = "sparse.matmul"
    x = Operand()
    w = Operand()
    result = Result()

    def infer(self) -> list[TensorType]:
        if self.w.type.layout is None or self.w.type.rank != 2:
            raise self.error(f"needs a 2-D weight with a sparse layout, got {self.w.type}")
        return [matmul_type(self, self.x.type, self.w.type.without_layout())]

    def reference(self, ctx: Any, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return np.matmul(x, w)

    def vjp(self, g: Any, dys: list, xs: list, ys: list) -> list:
        """The dense product's rule (dx = dy w^T; dw = x^T dy, batches summed), dw then kept on w's pattern only:
        its stored blocks (#bsr) or its kept entries (#nm). Pruned places get no gradient, so training keeps the
        layout."""
        from sparsa.ir.dialects.tensor_shape import MatmulOp

        conv = self.w.defining_op
        if not isinstance(conv, ConvertOp):
            raise self.error("differentiates a weight given in its sparse layout by sparse.convert only")
        dense = conv.x
        product = MatmulOp.build(xs[0], dense)
        product.drop_uses()  # the rule's description of the product, not an op of the function
        dx, dw = product.vjp(g, dys, [xs[0], dense], ys)
        return [dx, None if dw is None else g.mask(_pattern(g, conv), dw)]


def _pattern(g: Any, conv: ConvertOp) -> Any:
    """Where a sparse weight stores values: its nonzero entries (#nm), or every entry of a block with one (#bsr)."""
    w = conv.x
    nonzero = g.cmp("ne", w, g.scalar(0.0, w.type.dtype))
    if conv.layout == "nm":
        return nonzero
    (rows, cols), (br, bc) = w.type.shape, conv.block
    if not isinstance(rows, int) or not isinstance(cols, int):
        raise conv.error(f"differentiates a #bsr weight of static shape only, got {w.type}")
    tiles = g.emit("tensor.reshape", g.cast(nonzero, w.type.dtype), shape=[rows // br, br, cols // bc, bc])
    stored = g.emit("tensor.max", tiles, axes=[1, 3], keepdim=True)
    spread = g.emit("tensor.broadcast_to", stored, shape=[rows // br, br, cols // bc, bc])
    return g.cmp("ne", g.emit("tensor.reshape", spread, shape=[rows, cols]), g.scalar(0.0, w.type.dtype))


# ---- packed storage: what `lower-sparse-weights` turns a sparse weight into ------------------------------
def pack_bsr(w: np.ndarray, br: int, bc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row_ptr, col_idx, blocks) of the nonzero br x bc blocks of w, row-major."""
    rows, cols = w.shape
    tiles = w.reshape(rows // br, br, cols // bc, bc).transpose(0, 2, 1, 3)
    nonzero = (tiles != 0).any(axis=(2, 3))
    row_ptr = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]).astype(np.int64)
    block_rows, col_idx = np.nonzero(nonzero)
    return row_ptr, col_idx.astype(np.int64), np.ascontiguousarray(tiles[block_rows, col_idx])


def unpack_bsr(row_ptr: np.ndarray, col_idx: np.ndarray, blocks: np.ndarray, cols: int) -> np.ndarray:
    """The dense [rows, cols] matrix of a BSR weight."""
    br, bc = blocks.shape[1:]
    dense = np.zeros(((len(row_ptr) - 1) * br, cols), dtype=np.float64)
    for r in range(len(row_ptr) - 1):
        for i in range(row_ptr[r], row_ptr[r + 1]):
            dense[r * br : (r + 1) * br, col_idx[i] * bc : (col_idx[i] + 1) * bc] = blocks[i]
    return dense


def pack_nm(w: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices): for each column and each group of m rows, the n kept entries and their offsets."""
    rows, cols = w.shape
    groups = w.reshape(rows // m, m, cols)
    order = np.argsort(groups == 0, axis=1, kind="stable")[:, :n, :]  # nonzeros first, in row order
    values = np.take_along_axis(groups, order, axis=1).reshape(rows // m * n, cols)
    return values, order.reshape(rows // m * n, cols).astype(np.int8)


class PackBsrOp(Operation):
    """A dense weight packed as block-sparse rows: row_ptr [R/br + 1], col_idx [nnzb], blocks [nnzb, br, bc]."""

    NAME = "sparse.pack_bsr"
    w = Operand()
    block = Attr(A.INTS)
    row_ptr = Result()
    col_idx = Result()
    blocks = Result()

    def infer(self) -> list[TensorType]:
        t = self.w.type
        if t.rank != 2 or len(self.block) != 2:
            raise self.error(f"needs a 2-D weight and a 2-D block, got {t} and {list(self.block)}")
        br, bc = self.block
        rows = t.shape[0] // br if isinstance(t.shape[0], int) else None
        return [TensorType("i64", (None if rows is None else rows + 1,)), TensorType("i64", (None,)),
                TensorType(t.dtype, (None, br, bc))]

    def reference(self, ctx: Any, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        why = layout_violation(w, Layout("bsr", tuple(self.block)))
        if why:
            raise ValueError(f"weight does not fit #bsr<{self.block[0]}x{self.block[1]}>: {why}")
        return pack_bsr(w, *self.block)


class BsrMatmulOp(Operation):
    """x @ W for W [K, N] stored block-sparse: only the stored blocks are multiplied."""

    NAME = "sparse.bsr_matmul"
    x = Operand()
    row_ptr = Operand()
    col_idx = Operand()
    blocks = Operand()
    cols = Attr(A.INT)
    dense_above = Attr(A.FLOAT, default=1.0)  # stored-block density past which the dense kernel runs
    result = Result()

    def infer(self) -> list[TensorType]:
        x, b = self.x.type, self.blocks.type
        if b.rank != 3 or x.rank < 1 or x.dtype != b.dtype:
            raise self.error(f"needs x [..., K] and blocks [nnzb, br, bc] of one element type, got {x} and {b}")
        for name, t in (("row_ptr", self.row_ptr.type), ("col_idx", self.col_idx.type)):
            if t.rank != 1 or t.dtype != "i64":
                raise self.error(f"{name} must be 1-D i64, got {t}")
        rows, k, br = self.row_ptr.type.shape[0], x.shape[-1], b.shape[1]
        if all(isinstance(d, int) for d in (rows, k, br)) and (rows - 1) * br != k:
            raise self.error(f"{rows - 1} block rows of {br} do not cover the {k} inputs of {x}")
        if isinstance(b.shape[2], int) and self.cols % b.shape[2]:
            raise self.error(f"cols = {self.cols} is not a multiple of the block width {b.shape[2]}")
        return [TensorType(x.dtype, x.shape[:-1] + (self.cols,))]

    def reference(self, ctx: Any, x: np.ndarray, row_ptr: np.ndarray, col_idx: np.ndarray,
                  blocks: np.ndarray) -> np.ndarray:
        br, bc = blocks.shape[1:] if blocks.ndim == 3 else (1, 1)
        x64 = x.astype(np.float64)
        if len(col_idx) > self.dense_above * (len(row_ptr) - 1) * (self.cols // bc):
            return x64 @ unpack_bsr(row_ptr, col_idx, blocks, self.cols)
        y = np.zeros(x.shape[:-1] + (self.cols,), dtype=np.float64)
        for r in range(len(row_ptr) - 1):
            xs = x64[..., r * br : (r + 1) * br]
            for i in range(row_ptr[r], row_ptr[r + 1]):
                c = col_idx[i]
                y[..., c * bc : (c + 1) * bc] += xs @ blocks[i]
        return y

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        x, row_ptr, col_idx, blocks = args
        dense = 2.0 * outs[0].size * x.shape[-1]
        total = (len(row_ptr) - 1) * (self.cols // blocks.shape[2])
        density = len(col_idx) / total if total else 0.0
        if density > self.dense_above:
            return Cost(dense, dense, f"dense kernel: block density {density:.0%} > {self.dense_above:.0%}")
        return Cost(dense, dense * density, f"block-sparse: {len(col_idx)}/{total} blocks ({density:.0%})")


class PackNmOp(Operation):
    """A dense N:M weight packed as values [K*N/M, cols] and in-group offsets [K*N/M, cols] (i8)."""

    NAME = "sparse.pack_nm"
    w = Operand()
    n = Attr(A.INT)
    m = Attr(A.INT)
    values = Result()
    indices = Result()

    def infer(self) -> list[TensorType]:
        t = self.w.type
        if t.rank != 2 or not 0 < self.n <= self.m:
            raise self.error(f"needs a 2-D weight and 0 < n <= m, got {t}, {self.n}:{self.m}")
        rows = t.shape[0] // self.m * self.n if isinstance(t.shape[0], int) else None
        return [TensorType(t.dtype, (rows, t.shape[1])), TensorType("i8", (rows, t.shape[1]))]

    def reference(self, ctx: Any, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        why = layout_violation(w, Layout("nm", (self.n, self.m)))
        if why:
            raise ValueError(f"weight does not fit #nm<{self.n}:{self.m}>: {why}")
        return pack_nm(w, self.n, self.m)


class NmMatmulOp(Operation):
    """x @ W for W [K, cols] stored N:M along K: each output reads n of every m inputs."""

    NAME = "sparse.nm_matmul"
    x = Operand()
    values = Operand()
    indices = Operand()
    n = Attr(A.INT)
    m = Attr(A.INT)
    result = Result()

    def infer(self) -> list[TensorType]:
        x, v = self.x.type, self.values.type
        if v.rank != 2 or x.rank < 1 or x.dtype != v.dtype:
            raise self.error(f"needs x [..., K] and values [K*n/m, cols] of one element type, got {x} and {v}")
        if self.indices.type.shape != v.shape or self.indices.type.dtype != "i8":
            raise self.error(f"indices {self.indices.type} must be i8 of the values' shape {v}")
        k = x.shape[-1]
        if isinstance(k, int) and isinstance(v.shape[0], int) and k // self.m * self.n != v.shape[0]:
            raise self.error(f"values {v} do not hold {self.n} of every {self.m} of the {k} inputs")
        return [TensorType(x.dtype, x.shape[:-1] + (v.shape[1],))]

    def reference(self, ctx: Any, x: np.ndarray, values: np.ndarray, indices: np.ndarray) -> np.ndarray:
        kept, cols = values.shape
        rows = (np.arange(kept) // self.n * self.m)[:, None] + indices.astype(np.int64)
        dense = np.zeros((x.shape[-1], cols), dtype=np.float64)
        np.add.at(dense, (rows, np.broadcast_to(np.arange(cols), rows.shape)), values)
        return x.astype(np.float64) @ dense

    def cost(self, args: Sequence[Any], outs: Sequence[Any]) -> Cost:
        dense = 2.0 * outs[0].size * args[0].shape[-1]
        return Cost(dense, dense * self.n / self.m, f"{self.n}:{self.m} sparse")
