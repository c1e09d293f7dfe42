"""cpu lowerings of MoE weight gradients: `moe.grouped_weight_grad` (dW[e] = X_e^T dY_e over an expert's segment),
and the weight gradients a concat joins (a fused gate_up weight's halves) written in place by one kernel."""

from __future__ import annotations

from torch_mlir import ir
from torch_mlir.dialects import func, linalg, memref, scf, tensor

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.context import KERNELS, PARALLEL, KernelContext, element_type
from sparsa.backends.cpu.moe import _real_rows, gather_rows
from sparsa.backends.cpu.signature import Kernel
from sparsa.backends.cpu.target import PANEL
from sparsa.ir.core import Operation
from sparsa.ir.dialects import moe as M
from sparsa.ir.dialects import tensor_shape as S

# rows of one weight-gradient chunk: each chunk adds X^T dY into the expert's whole [K, N] block, so longer
# chunks pass over that block fewer times
WGRAD_ROWS = 512


@KERNELS.lowers(M.GroupedWeightGradOp)
def grouped_weight_grad_kernel(cx: KernelContext, op: Operation) -> Kernel:
    """dW[e] = X_e^T dY_e: experts split over the parts (each owns its blocks of the output); an expert's
    segment in chunks of ROWS rows, each chunk's rows gathered through perm, transposed, and multiplied into the
    expert's [K, N] block (a tiled GEMM accumulating onto it). `transposed`: dY_e^T X_e into [N, K] blocks, the
    register tile reading dY's chunk as the transposed left operand."""
    return _weight_grads(cx, op, [op], op)


def joined_weight_grads(ops: list[Operation], skip: set[int]) -> dict[int, list[Operation]]:
    """Concats (along the gradient's rows, axis 1) of transposed weight gradients of one dispatch, each read by the
    concat alone: the concat's id -> those gradients. A fused gate_up weight's gradient is its gate and up halves'
    joined: one kernel writes each half in place (`_weight_grads`), where a concat copied 32 MB after them."""
    uses: dict[int, int] = {}
    for op in ops:
        for inner in op.walk():
            for v in inner.operands:
                uses[id(v)] = uses.get(id(v), 0) + 1
    returned = {id(v) for v in ops[-1].operands}
    out: dict[int, list[Operation]] = {}
    for op in ops:
        if not isinstance(op, S.ConcatOp) or op.axis % op.result.type.rank != 1 or id(op) in skip:
            continue
        parts = [v.defining_op for v in op.inputs]
        if all(isinstance(g, M.GroupedWeightGradOp) and g.transposed and uses[id(g.result)] == 1
               and isinstance(g.result.type.shape[1], int) and id(g.result) not in returned and id(g) not in skip
               for g in parts) \
                and len({(id(g.rows), id(g.perm), id(g.offsets), g.topk, g.gather) for g in parts}) == 1:
            out[id(op)] = parts
    return out


def joined_weight_grads_kernel(cx: KernelContext, concat: Operation, grads: list[Operation]) -> Kernel:
    """The gradients `grads` (transposed, of one dispatch) written straight into their rows of the concat's
    result (`joined_weight_grads`)."""
    return _weight_grads(cx, grads[0], grads, concat)


def _weight_grads(cx: KernelContext, op: Operation, grads: list[Operation], made: Operation) -> Kernel:
    """The kernel of the weight gradients `grads` (of one dispatch: `op`'s rows, perm and offsets), each into its
    rows of `made`'s result (`op`'s own, or a concat of their results along axis 1)."""
    inputs = [op.rows, op.perm, op.offsets] + [g.dout for g in grads]
    m = cx.target.tile[0]
    cols_n = op.result.type.shape[2]
    rows = [g.result.type.shape[1] for g in grads]  # each gradient's rows of an expert's block, and where they start
    starts = [sum(rows[:i]) if all(isinstance(r, int) for r in rows[:i]) else None for i in range(len(rows))]
    packed = all(isinstance(r, int) and r % m == 0 for r in rows) and isinstance(cols_n, int) and cols_n % PANEL == 0
    name, entry = cx.function(made, [v.type for v in inputs] + [made.result.type], True,
                              "joined_weight_grads" if made is not op else "")
    rows_m, perm, offsets, *douts, out, part, parts = entry.arguments
    et = element_type(op.result.type.dtype)
    with ir.InsertionPoint(entry):
        rows_t, douts_t = B.read(rows_m), [B.read(d) for d in douts]
        K = B.mdim(rows_m, 1)
        if packed:  # this part's buffers for a chunk's packed copies (_packed_weight_grad)
            bufs = tuple(memref.AllocOp(ir.MemRefType.get([cols // width, WGRAD_ROWS, width], et), [], []).result
                         for cols, width in ((max(rows), m), (cols_n, PANEL)))
        experts = B.loop(part, B.sub(B.mdim(offsets, 0), B.c_index(1)), parts)
        with ir.InsertionPoint(experts.body):
            e = experts.induction_variable
            lo, hi = B.as_index(B.load(offsets, e)), B.as_index(B.load(offsets, B.add(e, B.c_index(1))))
            for g, dout_m, dout_t, at, rows_n in zip(grads, douts, douts_t, starts, rows, strict=True):
                N = B.mdim(dout_m, 1)
                at = B.c_index(0) if at is None else at  # (None only for a gradient alone: made is op)
                block = B.subview(out, [e, at, 0], [1, N, K] if g.transposed else [1, K, N], drop=[0])
                linalg.fill(B.c_float(0.0, et), outs=[block])
                steps = B.loop(lo, hi, WGRAD_ROWS)
                with ir.InsertionPoint(steps.body):
                    start = steps.induction_variable
                    size = B.minsi(B.c_index(WGRAD_ROWS), B.sub(hi, start))
                    real = _real_rows(perm, start, size)
                    has = B.if_(B.cmpi("gt", real, B.c_index(0)))
                    with ir.InsertionPoint(has.then_block):
                        x = gather_rows(cx, g, rows_t, perm, start, real, K, et)  # [real, K]
                        dy = B.slice_tensor(dout_t, [start, 0], [real, N])
                        if packed:
                            left, right = (dy, x) if g.transposed else (x, dy)
                            _packed_weight_grad(cx, left, right, block, real, et, rows_n, cols_n, bufs)
                        else:
                            if g.transposed:
                                acc = cx.matmul_tile(dy, x, N, K, et, init=B.read(block), transpose_a=True)
                            else:
                                xt = linalg.transpose(x, outs=[B.empty([K, real], et)], permutation=[1, 0])
                                acc = cx.matmul_tile(xt, dy, K, N, et, init=B.read(block))
                            B.write(acc, block)
                        scf.YieldOp([])
                    scf.YieldOp([])
            scf.YieldOp([])
        func.ReturnOp([])
    return Kernel(name, made, inputs, [made.result], "parts", work_op=op if made is not op else None)


def _packed_weight_grad(cx: KernelContext, left: ir.Value, right: ir.Value, block: ir.Value, n: ir.Value,
                        et: ir.Type, M: int, Nc: int, bufs: tuple[ir.Value, ir.Value]) -> None:
    """block [M, Nc] += left^T @ right (left [n, M], right [n, Nc]: a chunk of n rows), both packed first: left by
    register tile ([M / m, n, m]), right in panels ([Nc / PANEL, n, PANEL]); then panel by panel, each block
    column panel a tiled GEMM accumulating onto it. Unpacked, a k step read its rows of both a row's length apart
    (2 or 4 KiB: every row in the same few L1 sets), and the GEMM ran at ~65 GFLOP/s a core. The packed copies go
    to `bufs`, allocated once per call (fresh ones per chunk cost page faults: ~1.5 MB each)."""
    m = cx.target.tile[0]
    d = [ir.AffineDimExpr.get(i) for i in range(3)]

    def pack(src: ir.Value, width: int, cols: int, buf: ir.Value) -> ir.Value:  # [n, cols] -> [cols / width, n, width]
        init = B.empty([cols // width, n, width], et)
        g = linalg.GenericOp([init.type], [src], [init], B.maps(3, [[d[1], d[0] * width + d[2]], d]),
                             B.iterators([PARALLEL] * 3))
        body = g.regions[0].blocks.append(et, et)
        with ir.InsertionPoint(body):
            linalg.YieldOp([body.arguments[0]])
        dst = B.subview(buf, [0, 0, 0], [cols // width, n, width])
        B.write(g.result, dst)
        return B.read(dst)

    ap, bp = pack(left, m, M, bufs[0]), pack(right, PANEL, Nc, bufs[1])
    panels = B.loop(0, Nc // PANEL)
    with ir.InsertionPoint(panels.body):
        j = panels.induction_variable
        col = B.mul(j, B.c_index(PANEL))
        dst = B.subview(block, [0, col], [M, PANEL])
        init = tensor.ExpandShapeOp(ir.RankedTensorType.get([M // m, m, PANEL], et), B.read(dst, writable=True),
                                    B.reassociation([0, 1], [2]), [], [M // m, m, PANEL]).result
        acc = cx.packed_matmul_tile(ap, B.slice_tensor(bp, [j, 0, 0], [1, n, PANEL], drop=[0]), et, init)
        whole = tensor.CollapseShapeOp(ir.RankedTensorType.get([M, PANEL], et), acc, B.reassociation([0, 1], [2]))
        B.write(whole.result, dst)
        scf.YieldOp([])
