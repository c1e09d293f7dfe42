"""Packed layouts of the grouped GEMMs' operands, on both hosts: expert weights in panels of PANEL columns (once
per loaded weights, or at each call through the transposes and slices they are read through: `packed_views`)
and the gathered rows by register tile (`pack_rows`), with the native host's kernels that make them."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch_mlir import ir
from torch_mlir.dialects import arith, func, memref, scf, vector

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.context import HOSTED, KernelContext, element_type
from sparsa.backends.cpu.outputs import aligned
from sparsa.backends.cpu.signature import Hosted, Kernel, Scratch
from sparsa.backends.cpu.target import PANEL, ROW_BLOCK
from sparsa.backends.cpu.threads import SPLIT_WORK, num_threads, together
from sparsa.ir.core import Operation, Value
from sparsa.ir.dialects import moe as M
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import TensorType


# ---- weights in panels ---------------------------------------------------------------------------------------
def packable(op: Operation, weights: list[Value], fixed: set[int]) -> bool:
    """Whether a grouped GEMM can take its weights packed in panels: each is the same on every call (packed
    once per loaded weights) or a [0, 2, 1] transpose (packed at each call from the transpose's source, which
    costs about a copy and replaces the transpose's own), with one output width, and the epilogue is
    elementwise (so it can run a panel at a time)."""
    if any(id(w) not in fixed and _view_chain(w) is None for w in weights):
        return False
    if len({w.type.shape[2] for w in weights}) != 1 or weights[0].type.shape[2] != op.result.type.shape[-1]:
        return False
    return all(isinstance(o, Elementwise | T.ConstantOp) or o.TERMINATOR for o in op.epilogue.block.ops)


def _view_op(op: Operation | None) -> bool:
    """A view a pack kernel reads through: the last two axes of a 3-D tensor swapped (a weight stored [E, N, K],
    as PyTorch's Linear and transformers' expert weights are), or a slice of them (one half of transformers' fused
    gate_up_proj, or every other column of GPT-OSS's interleaved one)."""
    if isinstance(op, S.TransposeOp):
        return tuple(op.perm) == (0, 2, 1)
    return isinstance(op, S.SliceOp) and op.x.type.rank == 3 and op.steps[0] == 1 and all(s > 0 for s in op.steps) \
        and op.starts[0] == 0 and op.stops[0] is None and all(isinstance(a, int) for a in op.starts)


def _view_chain(w: Value) -> tuple[Value, dict[int, int], dict[int, int], dict[int, int]] | None:
    """w ([E, K, N]) as views of a source (`_view_op`s, at least one): the source, the source's axis of each of
    w's last two, and the offset and stride along each (index i of w along a is offset + i * stride of the source
    along its axis); None where w is not such a view."""
    axis_of, offset, stride = {1: 1, 2: 2}, {1: 0, 2: 0}, {1: 1, 2: 1}
    v = w
    while _view_op(v.defining_op):
        op = v.defining_op
        if isinstance(op, S.TransposeOp):
            axis_of = {a: tuple(op.perm)[c] for a, c in axis_of.items()}
        else:
            if not all(isinstance(d, int) for d in w.type.shape[1:]):
                return None  # a slice's columns are read by w's static sizes
            offset = {a: op.starts[axis_of[a]] + o * op.steps[axis_of[a]] for a, o in offset.items()}
            stride = {a: s * op.steps[axis_of[a]] for a, s in stride.items()}
        v = op.operands[0]
    return None if v is w else (v, axis_of, offset, stride)


def packed_views(ops: list[Operation], fixed: set[int]) -> set[int]:
    """The views (`_view_op`) the host leaves as NumPy views (no kernel, no copy): every use is a weight of a
    grouped GEMM that takes it packed, or another such view; the pack kernel reads through them."""
    slots: set[tuple[int, int]] = set()  # (op, operand index) of the weights that reach a kernel packed
    for op in ops:
        if isinstance(op, M.GroupedMatmulOp | M.GroupedMatmulCombineOp):
            weights = list(op.weights) if isinstance(op, M.GroupedMatmulOp) else [op.weight]
            if packable(op, weights, fixed):
                slots |= {(id(op), 3 + i) for i in range(len(weights))}
    views: set[int] = set()
    for op in reversed(ops):  # uses first: a view whose every use is a packed weight or a view read through
        if _view_op(op) and id(op.result) not in fixed and op.result.uses and all(
                (id(u.op), u.index) in slots or id(u.op) in views for u in op.result.uses):
            views.add(id(op))
    return views


@HOSTED.lowers(S.TransposeOp)
def hosted_packed_transpose(cx: KernelContext, op: Operation, k: Kernel | None) -> Hosted:
    """A transpose no kernel makes (`packed_views`): the grouped GEMMs' pack kernels read its source."""
    return Hosted(virtual=True)


def pack_kernel(cx: KernelContext, op: Operation, w: Value) -> tuple[Kernel, Scratch]:
    """A kernel packing grouped-GEMM weight w ([E, K, N]) in panels ([E, ceil(N / PANEL), K, PANEL], zero past N)
    into a Scratch buffer, the experts split over the parts: `pack_panels` in native code, for weights that may
    change between calls. From the source of a transpose no kernel makes ([E, N, K]: PyTorch's layout) where w
    is one, or of the tensor a slice of it views (half of a fused gate_up), at the slice's offsets. Panels
    with all their columns in w go by vectors (`pack_panel`), the last one past N an element at a time."""
    chain = _view_chain(w) if id(w.defining_op) in cx.packed else None
    source, axis_of, offset, stride = chain if chain is not None else (w, {1: 1, 2: 2}, {1: 0, 2: 0}, {1: 1, 2: 1})
    E, K = w.type.shape[0], w.type.shape[1]
    panels = Scratch(TensorType(w.type.dtype, (E, None, K, PANEL)), lambda known, ctx: (
        known[id(w)][0], -(-known[id(w)][2] // PANEL), known[id(w)][1], PANEL), f"{w.name_hint}_panels")
    start = len(cx.tiled)
    name, entry = cx.function(op, [source.type, panels.type], True, "pack_panels")
    src, dst, part, parts = entry.arguments
    et = element_type(w.type.dtype)
    lanes = cx.target.lanes(ir.FloatType(et).width) if isinstance(et, ir.FloatType) else 1
    transposed = axis_of[1] == 2  # K contiguous in the source: read along K, transposed in registers
    vectors = lanes > 1 and PANEL % lanes == 0 and lanes & (lanes - 1) == 0 and stride[1 if transposed else 2] in (1, 2)
    with ir.InsertionPoint(entry):
        N = w.type.shape[2]  # static where a slice is read through (`_view_chain`)
        n = B.c_index(N) if isinstance(N, int) else B.mdim(src, axis_of[2])
        K = B.mdim(dst, 2)

        def along(i: ir.Value, a: int) -> ir.Value:  # src's index of w's index i along axis a
            return B.add(B.mul(i, B.c_index(stride[a])) if stride[a] != 1 else i, B.c_index(offset[a]))

        def at_w(e: ir.Value, kk: ir.Value, col: ir.Value) -> list[ir.Value]:  # src's indices of w[e, kk, col]
            at = {0: e, axis_of[1]: along(kk, 1), axis_of[2]: along(col, 2)}
            return [at[0], at[1], at[2]]

        def elements(e: ir.Value, p: ir.Value) -> None:  # one at a time, zero past column n
            pack_elements(src, dst, e, p, B.mul(p, B.c_index(PANEL)), K, n, lambda kk, col: at_w(e, kk, col), et)

        experts = B.loop(part, B.mdim(src, 0), parts)
        with ir.InsertionPoint(experts.body):
            e = experts.induction_variable
            pl = B.loop(0, B.mdim(dst, 1))
            with ir.InsertionPoint(pl.body):
                p = pl.induction_variable
                if not vectors:
                    elements(e, p)
                else:  # a whole panel's columns in w: vectors of lanes
                    c0 = B.mul(p, B.c_index(PANEL))
                    whole = B.if_(B.cmpi("le", B.add(c0, B.c_index(PANEL)), n), has_else=True)
                    with ir.InsertionPoint(whole.then_block):
                        pack_panel(src, dst, e, p, c0, K, lanes, transposed, lambda kk, col: at_w(e, kk, col),
                                   stride[1 if transposed else 2])
                        scf.YieldOp([])
                    with ir.InsertionPoint(whole.else_block):  # the last panel, past N
                        elements(e, p)
                        scf.YieldOp([])
                scf.YieldOp([])
            scf.YieldOp([])
        func.ReturnOp([])
    return cx.extra(Kernel(name, op, [source], [panels], "parts"), start), panels


def pack_panel(src: ir.Value, dst: ir.Value, e: ir.Value, p: ir.Value, c0: ir.Value, K: ir.Value, lanes: int,
               transposed: bool, at_w: Any, step: int = 1) -> None:
    """dst[e, p] = w[e, :, c0:c0 + PANEL] in vectors of `lanes` (at_w(kk, col): src's indices of w[e, kk, col]).
    From a source stored [E, N, K] (`transposed`: PyTorch's layout), per step of `lanes` rows of K, each group of
    lanes columns is read as lanes vectors along K, transposed in registers (`B.transpose_square`) and stored as
    lanes rows of the panel: every load and store a vector, where one element at a time packed a 16 MB weight in
    2.5-4.2 ms (1.3-1.7 now, Zen 4). The rows of K past the last whole step go one element at a time. `step` is
    the source's stride along the axis read by vectors (w's columns, or its rows where transposed): 1 or 2 (every
    other element: GPT-OSS's interleaved gate and up, `every_other`)."""
    vt = ir.VectorType.get([lanes], ir.MemRefType(dst.type).element_type)

    def load(kk: ir.Value, col: ir.Value) -> ir.Value:  # lanes of w from [kk, col], along src's last axis
        if step == 1:
            return vector.LoadOp(vt, src, at_w(kk, col)).result
        return every_other(src, at_w(kk, col), vt)

    if not transposed:  # w's columns are contiguous (or every other one) in src: row by row, vector by vector
        rows = B.loop(0, K)
        with ir.InsertionPoint(rows.body):
            kk = rows.induction_variable
            for j in range(0, PANEL, lanes):
                vector.StoreOp(load(kk, B.add(c0, B.c_index(j))), dst, [e, p, kk, B.c_index(j)])
            scf.YieldOp([])
        return
    steps = B.round_down(K, lanes)
    for j in range(0, PANEL, lanes):
        blocks = B.loop(0, steps, lanes)
        with ir.InsertionPoint(blocks.body):
            k0 = blocks.induction_variable
            cols = [load(k0, B.add(c0, B.c_index(j + i))) for i in range(lanes)]
            for i, row in enumerate(B.transpose_square(cols)):
                vector.StoreOp(row, dst, [e, p, B.add(k0, B.c_index(i)), B.c_index(j)])
            scf.YieldOp([])
    rest = B.loop(steps, K)
    with ir.InsertionPoint(rest.body):
        kk = rest.induction_variable
        for j in range(PANEL):
            B.store(B.load(src, *at_w(kk, B.add(c0, B.c_index(j)))), dst, e, p, kk, B.c_index(j))
        scf.YieldOp([])


def pack_elements(src: ir.Value, dst: ir.Value, e: ir.Value, p: ir.Value, c0: ir.Value, K: ir.Value, n: ir.Value,
                  at_w: Any, et: ir.Type) -> None:
    """dst[e, p] = w[:, c0:c0 + PANEL] an element at a time, zero past column n (at_w(kk, col): src's indices of
    w[kk, col]): a panel past w's last column, or one whose columns a vector load cannot take."""
    with B.nest([K, B.c_index(PANEL)]) as (kk, j):
        col = B.add(c0, j)
        inside = B.if_(B.cmpi("lt", col, n), [et], has_else=True)
        with ir.InsertionPoint(inside.then_block):
            scf.YieldOp([B.load(src, *at_w(kk, col))])
        with ir.InsertionPoint(inside.else_block):
            scf.YieldOp([B.c_float(0.0, et)])
        B.store(inside.results[0], dst, e, p, kk, j)


def every_other(src: ir.Value, at: list[ir.Value], vt: ir.Type) -> ir.Value:
    """A vector of every other element of src along its last axis from `at` (its indices): the even lanes of a
    vector at `at`, then the odd lanes of one that starts lanes - 1 elements on (so that the last element it
    reads is the last one taken)."""
    lanes = ir.VectorType(vt).shape[0]
    low = vector.LoadOp(vt, src, at).result
    high = vector.LoadOp(vt, src, at[:-1] + [B.add(at[-1], B.c_index(lanes - 1))]).result
    return vector.ShuffleOp(low, high, [2 * i for i in range(lanes // 2)] + [lanes + 1 + 2 * i
                                                                             for i in range(lanes // 2)]).result


def cached_panels(host: Any, w: Value) -> np.ndarray:
    """The panels of a fixed weight ([E, K, N], or a dense matmul's [K, N] as one expert), packed the first time a
    call asks and kept in the call's cache with the weight-only results (cleared with them)."""
    key = ("panels", id(w))
    if key not in host.cache:
        a = host.values[id(w)]
        host.cache[key] = (pack_panels(a if a.ndim == 3 else a[None]),)
    return host.cache[key][0]


def panels_scratch(w: Value) -> Scratch:
    """The native host's buffer of `cached_panels(w)`: the array the Python host keeps, passed as it is."""
    experts, k = (w.type.shape[0], w.type.shape[1]) if w.type.rank == 3 else (1, w.type.shape[0])
    return Scratch(TensorType(w.type.dtype, (experts, None, k, PANEL)), lambda known, ctx: (), f"{w.name_hint}_panels",
                   cached=("panels", id(w)))


def panels_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The packed shape of an [E, K, N] weight."""
    E, K, N = shape
    return E, -(-N // PANEL), K, PANEL


def pack_panels(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[E, K, N] -> [E, ceil(N / PANEL), K, PANEL], zero-padded: each panel one contiguous [K, PANEL] block.
    w may be a strided view; one stored [E, N, K] (a transpose's source) is read PANEL rows at a time,
    runs of PANEL * K contiguous elements, near the speed of a copy."""
    E, K, N = w.shape
    full = N // PANEL
    out = aligned(panels_shape(w.shape), w.dtype) if out is None else out

    def experts(lo: int, hi: int) -> None:
        if w.strides[1] < w.strides[2]:  # stored [E, N, K]
            src = w[lo:hi].transpose(0, 2, 1)
            out[lo:hi, :full] = src[:, :full * PANEL].reshape(hi - lo, full, PANEL, K).transpose(0, 1, 3, 2)
        else:
            out[lo:hi, :full] = w[lo:hi, :, :full * PANEL].reshape(hi - lo, K, full, PANEL).transpose(0, 2, 1, 3)
        if N % PANEL:  # the last panel's columns past N are zero
            out[lo:hi, full] = 0
            out[lo:hi, full, :, :N % PANEL] = w[lo:hi, :, full * PANEL:]

    n = min(E, num_threads()) if w.size >= SPLIT_WORK else 1  # NumPy's copies let go of the GIL
    together([lambda p=p: experts(E * p // n, E * (p + 1) // n) for p in range(n)])
    return out


# ---- rows by register tile -----------------------------------------------------------------------------
def block_tiles(m: int) -> int:
    """Register tiles of m rows per block of ROW_BLOCK rows in the packed rows' layout: each block's rows start a
    tile (6-row tiles: 11 a block, the last with 4 rows and 2 of zeros), so that a chunk of a block's rows is whole
    tiles whatever m is."""
    return -(-ROW_BLOCK // m)


def first_tile(row: ir.Value, m: int) -> ir.Value:
    """The tile of the packed rows' layout that row `row` (the first of its tile) starts."""
    block, within = arith.DivUIOp(row, B.c_index(ROW_BLOCK)).result, arith.RemUIOp(row, B.c_index(ROW_BLOCK)).result
    return B.add(B.mul(block, B.c_index(block_tiles(m))), arith.DivUIOp(within, B.c_index(m)).result)


def pack_rows(rows: np.ndarray, perm: np.ndarray, op: Operation, m: int) -> np.ndarray:
    """The rows a grouped GEMM multiplies, in perm's order (rows[perm // topk] where it gathers) and packed by
    register tile a block of ROW_BLOCK rows at a time (`block_tiles`): [blocks * block_tiles(m), D, m], element
    [b * block_tiles(m) + t, k, r] row b * ROW_BLOCK + t * m + r's k-th (while t * m + r < ROW_BLOCK, else zero);
    a padding row (perm -1) is zeros. The Python host's; the native host runs `pack_rows_kernel`."""
    n, D = len(perm), rows.shape[1]
    src = rows[np.maximum(perm, 0) // op.topk] if op.gather else rows[:n]
    blocks, per = -(-n // ROW_BLOCK), block_tiles(m)
    flat = np.zeros((blocks * per * m, D), rows.dtype)  # each block's rows, then zeros to its last tile's end
    i = np.arange(n)
    flat[i // ROW_BLOCK * (per * m) + i % ROW_BLOCK] = np.where((perm >= 0)[:, None], src, 0)
    out = aligned((blocks * per, D, m), rows.dtype)
    out[...] = flat.reshape(blocks * per, m, D).transpose(0, 2, 1)
    return out


def pack_rows_kernel(cx: KernelContext, op: Operation, m: int) -> tuple[Kernel, Scratch]:
    """`pack_rows` in native code, into a Scratch buffer sized by perm's bound (what offsets[E] says is used is
    packed, but for tiles of padding only, which no GEMM reads: a segment's real rows come first), the tiles
    shared over the parts."""
    rows = op.rows
    per = block_tiles(m)
    xp = Scratch(TensorType(rows.type.dtype, (None, rows.type.shape[1], m)), lambda known, ctx: (
        -(-known[id(op.perm)][0] // ROW_BLOCK) * per, known[id(rows)][1], m), "rows_packed")
    start = len(cx.tiled)
    name, entry = cx.function(op, [rows.type, op.perm.type, op.offsets.type, xp.type], True, "pack_rows")
    src, perm, offsets, dst, part, parts = entry.arguments
    et = element_type(rows.type.dtype)
    with ir.InsertionPoint(entry):
        used = B.as_index(B.load(offsets, B.sub(B.mdim(offsets, 0), B.c_index(1))))
        D = B.mdim(src, 1)
        toks = memref.AllocaOp(ir.MemRefType.get([m], B.index()), [], []).result
        zero = B.c_float(0.0, et)
        last = B.sub(used, B.c_index(1))
        tiles = B.loop(part, B.mul(B.ceil_div(used, ROW_BLOCK), B.c_index(per)), parts)
        with ir.InsertionPoint(tiles.body):
            t = tiles.induction_variable
            within = B.mul(arith.RemUIOp(t, B.c_index(per)).result, B.c_index(m))  # the tile's first row in its block
            first = B.add(B.mul(arith.DivUIOp(t, B.c_index(per)).result, B.c_index(ROW_BLOCK)), within)
            some = B.if_(arith.AndIOp(B.cmpi("lt", first, used), B.cmpi(  # a real row in it
                "ge", B.load(perm, B.minsi(first, last)), B.c_int(0))).result)
            with ir.InsertionPoint(some.then_block):
                real = []
                for r in range(m):  # each row's token (-1: a padding row, or past its block: packed as zeros)
                    i = B.add(first, B.c_index(r))
                    a = B.load(perm, B.minsi(i, last))
                    ok = arith.AndIOp(B.cmpi("lt", i, used), B.cmpi("ge", a, B.c_int(0))).result
                    real.append(ok if ROW_BLOCK % m == 0 else arith.AndIOp(
                        ok, B.cmpi("lt", B.add(within, B.c_index(r)), B.c_index(ROW_BLOCK))).result)
                    tok = B.as_index(arith.DivSIOp(arith.MaxSIOp(a, B.c_int(0)).result, B.c_int(op.topk)).result)
                    B.store(B.select(real[r], tok, B.c_index(0)), toks, r)
                at = [B.load(toks, r) for r in range(m)]
                with B.nest([D]) as (k,):
                    for r in range(m):  # a contiguous run of m stores
                        B.store(B.select(real[r], B.load(src, at[r], k), zero), dst, t, k, B.c_index(r))
                scf.YieldOp([])
            scf.YieldOp([])
        func.ReturnOp([])
    return cx.extra(Kernel(name, op, [rows, op.perm, op.offsets], [xp], "parts", one_part_below=True), start), xp
