"""The cpu target's dense matmul kernel, `x @ w` with a matrix w: both operands packed before the GEMM, as the
grouped GEMMs' are (moe_pack.py), where there are rows enough to pay for it.

Read in place, a register tile's k step loads a row of w's column panel a row of w apart and TILE_M elements of x
a row of x apart. At 3072 columns the rows of w are 12 KiB apart, each on a page of its own (a k block of 128 rows
is more pages than the L1 TLB holds). The GEMM then ran at 121-148 GFLOP/s where OpenBLAS ran at 186-197 (Zen 4,
two threads); at up to 512 columns, where the rows share pages, reading in place was as fast. Packed, each of the
part's rows goes by register tile ([tiles, K, TILE_M]: one stream), and w by groups of PANEL-column panels
([K, PANEL] blocks, as many as fill half of L2) just before the rows pass over them, so that a panel's k block sits
in L1 and the group in L2 while every chunk of rows is multiplied by it. A w that is the same at every call comes
in panels the host packed once (`Kernel.panels`). An elementwise chain that alone reads the product runs on each
tile before its store (`epilogues`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, memref, scf, tensor, vector

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.context import KERNELS, KernelContext, carried, element_type
from sparsa.backends.cpu.moe_pack import pack_elements, pack_panel
from sparsa.backends.cpu.signature import Kernel
from sparsa.backends.cpu.target import PANEL, ROW_BLOCK
from sparsa.ir.core import Operation, Value
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.traits import Elementwise
from sparsa.ir.types import TensorType

# Rows (all of x's but the last dim, when known at compile time) below which a matmul reads its operands in place:
# packing w costs a pass over it per part, which a few rows do not win back.
PACK_ROWS = 128


def packs(op: Operation) -> bool:
    """Whether this matmul runs packed: float32, a matrix w at least a panel wide (a router's few columns are one
    narrow register tile, in cache either way), x of the result's rank (its leading dims are rows), and rows
    enough (or not known at compile time). A product over no k (JetMoE's experts split a weight into pieces, some
    empty) is zeros either way."""
    x, w, out = op.lhs.type, op.rhs.type, op.result.type
    if out.dtype != "f32" or w.rank != 2 or x.rank < 2 or x.rank != out.rank or w.shape[0] == 0:
        return False
    if isinstance(w.shape[1], int) and w.shape[1] < PANEL:
        return False
    return not _static_rows(op) or math.prod(x.shape[:-1]) >= PACK_ROWS


def _static_rows(op: Operation) -> bool:
    return all(isinstance(d, int) for d in op.lhs.type.shape[:-1])


def read_transposed(ops: list[Operation], fixed: set[int]) -> set[int]:
    """The transposes of a matrix that no kernel makes: every use is the w of a packed matmul, whose kernel packs w
    from the transpose's source instead (PyTorch's Linear weight, stored [N, K] and read as its transpose: a copy of
    the weight at each call saved), where the matmul's rows are known at compile time (else a part may have too
    few to pack, and read w in place). A transpose of weights is made once by the host, and stays."""
    views = set()
    for op in ops:
        if isinstance(op, S.TransposeOp) and tuple(op.perm) == (1, 0) and id(op.result) not in fixed \
                and op.result.uses and all(isinstance(u.op, S.MatmulOp) and u.index == 1 and packs(u.op)
                                           and _static_rows(u.op) for u in op.result.uses):
            views.add(id(op))
    return views


@KERNELS.lowers(S.MatmulOp)
def matmul_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """x @ w packed (`packs`), else the tagged generic read in place (`KernelContext.dense`). Split by rows as
    that one is: each part packs its own rows and all of w. Where the rows are known only at run time, a part
    with fewer than ROW_BLOCK of them (a decode step) reads in place."""
    if not packs(op):
        return cx.dense(op)
    return _kernel(cx, op, [], [])


def epilogues(ops: list[Operation], groups: dict[int, tuple[list[Operation], list[Value]]],
              skip: set[int]) -> dict[int, tuple[Operation, list[Operation], list[Value]]]:
    """Packed matmuls whose result only an elementwise chain of its shape reads (a Linear layer's bias, its
    activation: `relu(x @ w + b)`), each made in the chain's kernel (`epilogue_kernel`), the chain applied to each
    tile of the product before it is stored: the product is never stored and read again (a 1024 x 3072 Linear's
    bias add was a kernel of its own, 2.3 ms beside the GEMM's 17.7 on Zen 5). The chain is the fused group
    (`jit.fused_groups`) that its one reader belongs to, or that reader alone; its other inputs are whole tensors
    of the result's shape, or broadcast along its rows (a bias), or scalars (`_read_as`). root id -> (the matmul,
    the chain's ops in order, its other inputs). One matmul per chain (SwiGLU's gate and up: the first)."""
    member_of: dict[int, list[int]] = {}
    for root, (group, _) in groups.items():
        for o in group:
            member_of.setdefault(id(o), []).append(root)
    at = {id(op) for op in ops}
    found: dict[int, tuple[Operation, list[Operation], list[Value]]] = {}
    for mm in ops:
        if not isinstance(mm, S.MatmulOp) or id(mm) in skip or not packs(mm) or not mm.result.uses:
            continue
        readers = {id(u.op): u.op for u in mm.result.uses}
        u = next(iter(readers.values()))
        if len(readers) != 1 or id(u) not in at or id(u) in skip or not isinstance(u, Elementwise) or u.regions \
                or len(u.results) != 1 or len(member_of.get(id(u), [])) > 1:
            continue
        if id(u) in member_of:
            group, inputs = groups[member_of[id(u)][0]]
        else:
            group, inputs = [u], list({id(v): v for v in u.operands}.values())
        out = mm.result.type
        if id(group[-1]) in found or any(o.results[0].type.dtype != "f32" or o.results[0].type.shape != out.shape
                                         for o in group):
            continue  # (a sum ending the group: its space is the product's, its result not)
        rest = [v for v in inputs if v is not mm.result]
        if all(_read_as(v.type, out) for v in rest):
            found[id(group[-1])] = (mm, group, rest)
    return found


def _read_as(t: TensorType, out: TensorType) -> str | None:
    """How an epilogue reads an input of type t beside a product of type out: "scalar" (rank 0), "row" (the
    same for every row: leading dims 1 or none), "full" (the product's rows); its last dim is out's or 1. None:
    neither (float32 only)."""
    if t.dtype != "f32" or t.rank > out.rank:
        return None
    if t.rank == 0:
        return "scalar"
    if t.shape[-1] not in (1, out.shape[-1]):
        return None
    if all(d == 1 for d in t.shape[:-1]):
        return "row"
    return "full" if t.rank == out.rank and tuple(t.shape[:-1]) == tuple(out.shape[:-1]) else None


def epilogue_kernel(cx: KernelContext, mm: Operation, chain: list[Operation], rest: list[Value]) -> Kernel:
    """The packed matmul mm with the elementwise chain that reads its result (`epilogues`) applied to each of
    its tiles before the store: the kernel of the chain's last op."""
    cx.check_dtypes(chain)
    start = len(cx.tiled)
    return cx.extra(_kernel(cx, mm, chain, rest), start)  # (an earlier layer's kernel of the same code, if any)


def _kernel(cx: KernelContext, op: Operation, chain: list[Operation], rest: list[Value]) -> Kernel:
    """The packed matmul's kernel (with the epilogue `chain` reading the `rest` inputs beside the product)."""
    split, cut = cx.row_split(op)
    view = op.rhs.defining_op if id(op.rhs.defining_op) in cx.packed else None  # read_transposed
    source = view.x if view is not None else op.rhs
    result = chain[-1].results[0] if chain else op.result
    # a w that is the same at every call (a `.sp` param, a frozen torch parameter): the host packs its panels once
    # and keeps them (`Kernel.panels`, as the grouped GEMMs' expert weights); the kernel also takes w as it is, for
    # a part with few rows (read in place)
    prepacked = view is None and id(op.rhs) in cx.fixed
    extra = [op.rhs] if prepacked else []
    if split == "rows":
        cut = cut + [False] * len(extra) + [v.type.rank == result.type.rank and
                                            carried(v.type.shape[0], result.type.shape[0]) for v in rest]
    # the dim 0 the host cuts is dynamic in the kernel (only there: a static K of the same size stays static, or
    # the GEMM would take its long-K path)
    w_t = op.rhs.type
    panel_types = [TensorType(w_t.dtype, (1, -(-w_t.shape[1] // PANEL) if isinstance(w_t.shape[1], int) else None,
                                          w_t.shape[0], PANEL))] if prepacked else []
    types = [op.lhs.type, source.type, *panel_types, *[v.type for v in rest], result.type]
    if split == "rows":
        types = [t.with_shape((None, *t.shape[1:])) if c else t for t, c in zip(types, [*cut, True], strict=True)]
    label = "matmul_" + "_".join(o.NAME.split(".")[-1] for o in chain[:3]) if chain else ""
    name, entry = cx.function(chain[-1] if chain else op, types, False, label)
    x, w, *ms, out = entry.arguments
    panels = ms.pop(0) if prepacked else None
    et = element_type(op.result.type.dtype)
    with ir.InsertionPoint(entry):
        x2, out2 = _rows(x), _rows(out)
        tail = None
        if chain:
            reads = [(v, _read_as(v.type, result.type), m) for v, m in zip(rest, ms, strict=True)]
            reads = [(v, how, _rows(m) if how == "full" else _flat(m) if how == "row" else m) for v, how, m in reads]

            def tail(y: ir.Value, r0: ir.Value, c0: ir.Value, rows: ir.Value, width: ir.Value) -> ir.Value:
                return _epilogue(cx, op, chain, reads, y, [r0, c0, rows, width], et)
        if view is not None:
            packed_matmul(cx, x2, w, out2, et, transposed=True, epilogue=tail)
        elif _static_rows(op):
            packed_matmul(cx, x2, w, out2, et, epilogue=tail, panels=panels)
        else:  # rows known only at run time: a part with fewer than a chunk reads in place
            few = B.if_(B.cmpi("lt", B.mdim(x2, 0), B.c_index(ROW_BLOCK)), has_else=True)
            with ir.InsertionPoint(few.then_block):
                cx.values[id(op.lhs)], cx.values[id(op.rhs)] = B.read(x), B.read(w)
                cx.lower(op)
                B.write(cx.get(op.result), out)
                if tail is not None:  # on the product where it lies
                    rows, width = B.sizes_of(out2)
                    B.write(tail(B.read(out2, writable=True), B.c_index(0), B.c_index(0), rows, width), out2)
                scf.YieldOp([])
            with ir.InsertionPoint(few.else_block):
                packed_matmul(cx, x2, w, out2, et, epilogue=tail, panels=panels)
                scf.YieldOp([])
        func.ReturnOp([])
    return Kernel(name, chain[-1] if chain else op, [op.lhs, source, *extra, *rest], [result], split, cut,
                  work_op=op if chain else None, panels=[2] if prepacked else [])


def _epilogue(cx: KernelContext, mm: Operation, chain: list[Operation], reads: list[tuple[Value, str, ir.Value]],
              y: ir.Value, tile: list[ir.Value], et: ir.Type) -> ir.Value:
    """The chain on y, the product's tile [rows, width] at (r0, c0): one tagged elementwise generic whose body is
    each op's scalar rule in turn (as `KernelContext.fused`), reading each input's part of the tile."""
    r0, c0, rows, width = tile
    d0, d1, zero = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1), ir.AffineConstantExpr.get(0)
    operands = [(y, [d0, d1])]
    for v, how, m in reads:
        whole = v.type.shape[-1] == 1 and mm.result.type.shape[-1] != 1 if v.type.rank else False  # read at 0
        if how == "scalar":
            operands.append((B.read(m), []))
        elif how == "row":
            operands.append((B.read(m), [zero]) if whole else (B.slice_tensor(B.read(m), [c0], [width]), [d1]))
        else:
            operands.append((B.slice_tensor(B.read(m), [r0, 0], [rows, 1]), [d0, zero]) if whole
                            else (B.slice_tensor(B.read(m), [r0, c0], [rows, width]), [d0, d1]))

    inputs = [mm.result, *[v for v, _, _ in reads]]
    return cx.tile_map(operands, [rows, width], et,
                       lambda *scalars: cx.scalar_chain(inputs, scalars, chain, chain[-1].results[0]), tag=True)


def _flat(m: ir.Value) -> ir.Value:
    """A contiguous memref as a vector (an epilogue's input the same for every row: its leading dims are 1)."""
    mt = ir.MemRefType(m.type)
    if mt.rank == 1:
        return m
    flat = ir.MemRefType.get([B.DYN() if B.DYN() in mt.shape else math.prod(mt.shape)], mt.element_type)
    return memref.CollapseShapeOp(flat, m, B.reassociation(list(range(mt.rank)))).result


def _rows(m: ir.Value) -> ir.Value:
    """A contiguous memref as a matrix: its leading dims as rows."""
    mt = ir.MemRefType(m.type)
    if mt.rank == 2:
        return m
    shape = mt.shape
    rows = math.prod(shape[:-1]) if B.DYN() not in shape[:-1] else B.DYN()
    flat = ir.MemRefType.get([rows, shape[-1]], mt.element_type)
    return memref.CollapseShapeOp(flat, m, B.reassociation(list(range(mt.rank - 1)), [mt.rank - 1])).result


def packed_matmul(cx: KernelContext, x: ir.Value, w: ir.Value, out: ir.Value, et: ir.Type,
                  transposed: bool = False, epilogue: Callable[..., ir.Value] | None = None,
                  panels: ir.Value | None = None) -> None:
    """out [R, N] = x [R, K] @ w [K, N] (w given as [N, K] where `transposed`): x packed by register tile once
    (rows past R zero), then for each group of w's panels (`CpuTarget.weight_group`), the group packed (columns
    past N zero) and every chunk of ROW_BLOCK rows multiplied by each of its panels (`packed_matmul_tile`), the
    chunk's real rows and columns stored. The panels of a transposed w are read along K and transposed in
    registers (`pack_panel`).

    Where w is one group wide (known at compile time), x is read in place: the GEMM then reads it once, and packing
    it first was a copy more (x @ w at 2048x1024x32: 150 GFLOP/s with x packed, 215 read in place).

    Where K is longer than `k_span` (or known only at run time), the GEMM goes a span of k at a time, outermost,
    each span's products added onto the output (zeroed first): a chunk's rows over a span then stay in L2 while
    the group's panels pass over them, where over the whole of a long K they came from L3 for every panel.

    `epilogue(y, r0, c0, rows, width)`: what is stored of each tile y of the product (at the last span).
    `panels`: w's panels as the host packed them once ([1, ceil(N / PANEL), K, PANEL]): read as they are.

    Packed, x's register tile has `CpuTarget.packed_rows` rows (its tiles need not divide a 64-row block) and a
    chunk is the whole tiles of ROW_BLOCK rows (60 rows of 6-row tiles)."""
    R, K, N = B.mdim(x, 0), B.mdim(x, 1), B.mdim(w, 0 if transposed else 1)
    k_static, n_static = ir.MemRefType(x.type).shape[1], ir.MemRefType(w.type).shape[0 if transposed else 1]
    span = k_span(cx)
    spans = k_static == B.DYN() or k_static > span
    group = cx.target.weight_group(span if spans else k_static, 1)
    wp = memref.AllocOp(ir.MemRefType.get([1, group, span if spans else k_static, PANEL], et), [], []).result \
        if panels is None else None
    n_panels = B.ceil_div(N, PANEL)
    pack_x = B.DYN() in (k_static, n_static) or -(-n_static // PANEL) > group
    m = cx.target.packed_rows if pack_x else cx.target.tile[0]
    chunk = ROW_BLOCK // m * m if pack_x else ROW_BLOCK
    if pack_x:
        xp = memref.AllocOp(ir.MemRefType.get([B.DYN(), B.DYN(), m], et), [B.ceil_div(R, m), K], []).result
        _pack_rows(x, xp, R, m, cx.target.lanes(32), et)
    xt = B.read(xp if pack_x else x)

    def over_k(k0: ir.Value, kn: ir.Value, add: bool, tail: Callable[..., ir.Value] | None) -> None:
        """out (+)= x[:, k0:k0 + kn] @ w[k0:k0 + kn]: w a group of panels at a time, packed into wp, every chunk of
        x's rows by each panel of the group; `add`: onto out; `tail`: the epilogue, on what is stored."""
        groups = B.loop(0, n_panels, group)
        with ir.InsertionPoint(groups.body):
            p0 = groups.induction_variable
            p1 = B.minsi(B.add(p0, B.c_index(group)), n_panels)
            if panels is None:
                _pack_group(cx, w, wp, p0, p1, k0, kn, N, et, transposed)
            wpt = B.read(wp if panels is None else panels)
            chunks = B.loop(0, R, chunk)
            with ir.InsertionPoint(chunks.body):
                r0 = chunks.induction_variable
                rows = B.minsi(B.c_index(chunk), B.sub(R, r0))
                if pack_x:
                    tile0 = arith.DivUIOp(r0, B.c_index(m)).result
                    ap = B.slice_tensor(xt, [tile0, k0, 0], [B.ceil_div(rows, m), kn, m])
                else:
                    ap = B.slice_tensor(xt, [r0, k0], [rows, kn])
                in_group = B.loop(p0, p1)
                with ir.InsertionPoint(in_group.body):
                    j = in_group.induction_variable
                    panel = B.slice_tensor(wpt, [0, B.sub(j, p0), 0, 0], [1, 1, kn, PANEL], drop=[0, 1]) \
                        if panels is None else B.slice_tensor(wpt, [0, j, k0, 0], [1, 1, kn, PANEL], drop=[0, 1])
                    if pack_x:
                        flat = tensor.CollapseShapeOp(ir.RankedTensorType.get([B.DYN(), PANEL], et),
                                                      cx.packed_matmul_tile(ap, panel, et),
                                                      B.reassociation([0, 1], [2])).result
                    else:
                        flat = cx.matmul_tile(ap, panel, rows, PANEL, et)
                    c0 = B.mul(j, B.c_index(PANEL))
                    width = B.minsi(B.c_index(PANEL), B.sub(N, c0))
                    dst = B.subview(out, [r0, c0], [rows, width])
                    y = B.slice_tensor(flat, [0, 0], [rows, width])
                    if add:  # onto the spans before
                        d = [ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)]
                        y = cx.tile_map([(B.read(dst, writable=True), d), (y, d)], [rows, width], et,
                                        lambda a, b: arith.AddFOp(a, b).result, tag=True)
                    if tail is not None:
                        y = tail(y, r0, c0, rows, width)
                    B.write(y, dst)
                    scf.YieldOp([])
                scf.YieldOp([])
            scf.YieldOp([])

    if not spans:
        over_k(B.c_index(0), K, False, epilogue)
        return
    linalg.fill(B.c_float(0.0, et), outs=[out])
    # every span but the last (with an epilogue; else every span), then the last with it
    last = K if epilogue is None else B.round_down(B.sub(arith.MaxSIOp(K, B.c_index(1)).result, B.c_index(1)), span)
    k_loop = B.loop(0, last, span)
    with ir.InsertionPoint(k_loop.body):
        k0 = k_loop.induction_variable
        over_k(k0, B.minsi(B.c_index(span), B.sub(K, k0)), True, None)
        scf.YieldOp([])
    if epilogue is not None:
        over_k(last, B.sub(K, last), True, epilogue)


def _pieces(start: int, lanes: int, m: int) -> list[tuple[int, int]]:
    """(first lane, lanes) of each run of rows start .. start + lanes that falls in one tile of m rows."""
    out, a = [], 0
    while a < lanes:
        size = min(lanes - a, m - (start + a) % m)
        out.append((a, size))
        a += size
    return out


def k_span(cx: KernelContext) -> int:
    """The k a packed matmul takes at a time: a chunk's packed rows over it fill a quarter of L2 (1 MiB where
    unknown), at least 256."""
    return max(256, cx.target.caches.get(2, 1 << 20) // 4 // (ROW_BLOCK * 4) // 64 * 64)


def _pack_rows(x: ir.Value, xp: ir.Value, R: ir.Value, m: int, lanes: int, et: ir.Type) -> None:
    """xp[t, k, r] = x[t * m + r, k], zero past R. Rows go in groups of lcm(m, lanes) (a whole number of tiles and
    of squares): squares of lanes rows by lanes columns are loaded as vectors, transposed in registers
    (`B.transpose_square`) and each column stored as the pieces the tiles take (a column of 8 rows of 6-row tiles:
    6 rows to one tile, 2 to the next); the columns past the last whole square, the rows past the last whole group,
    and the zero rows go an element at a time (every element so, the pack read x a row of x apart per element, with
    a compare and a select each)."""
    K = B.mdim(x, 1)
    zero = B.c_float(0.0, et)
    square = lanes > 1 and lanes & (lanes - 1) == 0
    group = math.lcm(m, lanes)
    whole = B.round_down(R, group) if square else B.c_index(0)
    if square:
        vt = ir.VectorType.get([lanes], et)
        k_whole = B.round_down(K, lanes)
        groups = B.loop(0, whole, group)
        with ir.InsertionPoint(groups.body):
            r0 = groups.induction_variable
            t0 = arith.DivUIOp(r0, B.c_index(m)).result
            steps = B.loop(0, k_whole, lanes)
            with ir.InsertionPoint(steps.body):
                k0 = steps.induction_variable
                for s in range(0, group, lanes):
                    rows = [vector.LoadOp(vt, x, [B.add(r0, B.c_index(s + i)), k0]).result for i in range(lanes)]
                    for j, col in enumerate(B.transpose_square(rows)):
                        for a, size in _pieces(s, lanes, m):  # rows s + a .. of the group, within one tile
                            t, r = divmod(s + a, m)
                            part = col if size == lanes else vector.ExtractStridedSliceOp(
                                ir.VectorType.get([size], et), col, [a], [size], [1]).result
                            vector.StoreOp(part, xp, [B.add(t0, B.c_index(t)), B.add(k0, B.c_index(j)), B.c_index(r)])
                scf.YieldOp([])
            rest = B.loop(k_whole, K)
            with ir.InsertionPoint(rest.body):
                k = rest.induction_variable
                for i in range(group):
                    r = B.add(r0, B.c_index(i))
                    B.store(B.load(x, r, k), xp, arith.DivUIOp(r, B.c_index(m)).result, k,
                            arith.RemUIOp(r, B.c_index(m)).result)
                scf.YieldOp([])
            scf.YieldOp([])
    tail = B.loop(whole, B.mul(B.ceil_div(R, m), B.c_index(m)))  # the last rows, then zeros to a whole tile
    with ir.InsertionPoint(tail.body):
        r = tail.induction_variable
        inside = B.cmpi("lt", r, R)
        t, at = arith.DivUIOp(r, B.c_index(m)).result, arith.RemUIOp(r, B.c_index(m)).result
        B.each(K, lambda k: B.store(B.select(inside, B.load(x, B.select(inside, r, B.c_index(0)), k), zero),
                                    xp, t, k, at))
        scf.YieldOp([])


def _pack_group(cx: KernelContext, w: ir.Value, wp: ir.Value, p0: ir.Value, p1: ir.Value, k0: ir.Value,
                K: ir.Value, N: ir.Value, et: ir.Type, transposed: bool) -> None:
    """wp[0, j - p0, :K] = rows k0.. k0 + K of w's panel j for p0 <= j < p1: by vectors where the panel's columns
    are all in w, else an element at a time, zero past N."""
    lanes = cx.target.lanes(32)

    def at(kk: ir.Value, col: ir.Value) -> list[ir.Value]:  # w's indices of element [k0 + kk, col]
        k = B.add(k0, kk)
        return [col, k] if transposed else [k, col]

    panels = B.loop(p0, p1)
    with ir.InsertionPoint(panels.body):
        j = panels.induction_variable
        panel = B.sub(j, p0)
        c0 = B.mul(j, B.c_index(PANEL))
        whole = B.if_(B.cmpi("le", B.add(c0, B.c_index(PANEL)), N), has_else=True)
        with ir.InsertionPoint(whole.then_block):
            if PANEL % lanes == 0 and lanes & (lanes - 1) == 0:
                pack_panel(w, wp, B.c_index(0), panel, c0, K, lanes, transposed, at)
            else:
                pack_elements(w, wp, B.c_index(0), panel, c0, K, N, at, et)
            scf.YieldOp([])
        with ir.InsertionPoint(whole.else_block):
            pack_elements(w, wp, B.c_index(0), panel, c0, K, N, at, et)
            scf.YieldOp([])
        scf.YieldOp([])

