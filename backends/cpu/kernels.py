"""One MLIR function ("kernel") per Sparsa op, all in one module: dense ops through `Lowering` (linalg on
tensors, tiled and vectorized by the schedule), the sparse ops as loops over their sparse structure around
dense tiles — grouped GEMM over expert segments reading tokens through the permutation, block-sparse
flash attention visiting only the non-empty key blocks, the fused scan streaming over time, BSR and N:M
matmuls over the stored blocks only.

A kernel takes its operands, then its outputs, as memrefs (symbolic dims dynamic); kernels that split
their work take two more index arguments (part, parts) and do every parts-th work item from `part`, so
the host (jit.py) can run them on several threads at once. Outputs are allocated by the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch_mlir import ir
from torch_mlir.dialects import arith, func, linalg, memref, scf
from torch_mlir.dialects import math as mmath

from sparsa.backends.cpu import build as B
from sparsa.backends.cpu.loops import LoopKernels
from sparsa.backends.cpu.lower import PARALLEL, REDUCTION, CpuLoweringError, Lowering, element_type, exp
from sparsa.ir.core import Operation, Region, Value
from sparsa.ir.dialects import tensor as T
from sparsa.ir.dialects import tensor_reduce as R
from sparsa.ir.dialects import tensor_shape as S
from sparsa.ir.dialects.attn_blocks import EMPTY, FULL, outer_values
from sparsa.ir.types import TensorType

ROWS = 64  # rows of one grouped-GEMM work item (the dispatch block of the cpu pipeline)
PANEL = 32  # columns of one panel of a packed expert weight: [E, K, N] is stored [E, ceil(N / PANEL), K, PANEL]
SCAN_BLOCK = 128  # channels of a fused scan done together: a [.., 128, N] state block and its temporaries in L1
# Row split by the host: the op's dim 0 is symbolic and every operand that has it is cut along it.
ROW_SPLIT = (T.UnaryOp, T.BinaryOp, T.CmpOp, T.WhereOp, T.NotOp, T.CastOp)


@dataclass
class Kernel:
    """One op's function: the IR values it reads and writes, in argument order, and how it splits."""

    name: str
    op: Operation
    inputs: list[Value]
    outputs: list[Value]
    split: str = "none"  # "none", "parts" (takes part, parts) or "rows" (the host cuts dim 0)
    rows: list[bool] = field(default_factory=list)  # with "rows": which inputs are cut
    panels: list[int] = field(default_factory=list)  # inputs the host passes packed in panels (pack_panels)


def memref_type(t: TensorType) -> ir.MemRefType:
    return ir.MemRefType.get([d if isinstance(d, int) else B.DYN() for d in t.shape], element_type(t.dtype))


class Kernels(Lowering, LoopKernels):
    """Builds the kernels of one function into `module`."""

    def __init__(self, module: ir.Module):
        super().__init__()
        self.module = module
        self.kernels: list[Kernel] = []

    # ---- functions ------------------------------------------------------------------------------------
    def function(self, op: Operation, types: list[TensorType], parts: bool) -> tuple:
        """An empty kernel function for `op` over memrefs of `types` (operands, then outputs), with
        (part, parts) index arguments when it splits its work."""
        name = f"k{len(self.kernels)}_{op.NAME.replace('.', '_')}"
        args = [memref_type(t) for t in types] + [ir.IndexType.get()] * (2 if parts else 0)
        with ir.InsertionPoint(self.module.body):
            fn = func.FuncOp(name, ir.FunctionType.get(args, []))
            fn.attributes["llvm.emit_c_interface"] = ir.UnitAttr.get()
            entry = fn.add_entry_block()
        return name, entry

    def kernel(self, op: Operation) -> Kernel:
        """The kernel computing `op` (CpuLoweringError, naming the op and its line, if there is none)."""
        half = {v.type.dtype for v in list(op.operands) + list(op.results)} & {"f16", "bf16"}
        if half:
            raise CpuLoweringError(f"'{op.NAME}' on {half.pop()} is not supported by the cpu backend yet (its "
                                   "kernels are float32; cast to f32 or use the triton target)", op.loc)
        builder = getattr(self, "kernel_" + type(op).__name__, None)
        if builder is not None:
            k = builder(op)
        else:
            k = self.dense(op)
        self.kernels.append(k)
        return k

    def dense(self, op: Operation) -> Kernel:
        """An op of Lowering, on tensor views of its memrefs; written straight into the output."""
        if op.regions and any(not r.empty for r in op.regions):
            hint = " (run the fuse-moe-gating and fuse-moe-dispatch passes first)" if op.NAME == "moe.moe" else " yet"
            raise CpuLoweringError(f"'{op.NAME}' is not supported by the cpu backend{hint}", op.loc)
        inputs = list(op.operands)
        name, entry = self.function(op, [v.type for v in inputs] + [r.type for r in op.results], False)
        with ir.InsertionPoint(entry):
            for v, m in zip(inputs, entry.arguments, strict=False):
                self.values[id(v)] = B.read(m)
            self.lower(op)
            for r, m in zip(op.results, entry.arguments[len(inputs):], strict=True):
                B.write(self.get(r), m)
            func.ReturnOp([])
        return Kernel(name, op, inputs, list(op.results), *self.row_split(op))

    def row_split(self, op: Operation) -> tuple[str, list[bool]]:
        """Whether the host may cut this op along dim 0 (a symbolic dim it only carries through)."""
        out = op.results[0].type if len(op.results) == 1 else None
        if out is None or out.rank == 0 or isinstance(out.shape[0], int) or out.shape[0] is None:
            return "none", []
        cut = [v.type.rank == out.rank and v.type.shape[0] == out.shape[0] for v in op.operands]
        if isinstance(op, ROW_SPLIT):
            return "rows", cut
        if isinstance(op, S.MatmulOp):
            if out.rank == 2:
                cut = [cut[0], False]
            return "rows", cut
        if isinstance(op, R.ReduceOp) and 0 not in {a % op.x.type.rank for a in op.axes}:
            return "rows", cut
        if isinstance(op, R.SoftmaxOp | R.RmsNormOp | R.LayerNormOp) and op.x.type.rank > 1 and \
                (getattr(op, "axis", -1) % op.x.type.rank) != 0:
            return "rows", [cut[0]] + [False] * (len(cut) - 1)
        return "none", []

    # ---- region inlining ----------------------------------------------------------------------------
    def inline(self, region: Region, args: list[ir.Value], scalar: bool) -> list[ir.Value]:
        """The values a region yields, its ops lowered here on `args` (scalars in scalar mode)."""
        saved = self.scalar_mode
        self.scalar_mode = scalar
        try:
            for a, v in zip(region.block.args, args, strict=True):
                self.values[id(a)] = v
            for op in region.block.ops:
                if op.TERMINATOR:
                    return [self.get(v) for v in op.operands]
                self.lower(op)
        finally:
            self.scalar_mode = saved
        raise CpuLoweringError("region without a terminator")

    # ---- MoE: routing -------------------------------------------------------------------------------
    def kernel_RouteOp(self, op: Operation) -> Kernel:
        inputs = [op.logits] + ([op.bias] if op.bias is not None else [])
        name, entry = self.function(op, [v.type for v in inputs] + [r.type for r in op.results], True)
        args = entry.arguments
        logits, bias = args[0], (args[1] if op.bias is not None else None)
        w_out, i_out, part, parts = args[len(inputs):]
        f64 = ir.F64Type.get()
        et = element_type(op.logits.type.dtype)
        with ir.InsertionPoint(entry):
            T_, E = B.mdim(logits, 0), B.mdim(logits, 1)
            score = _alloca(E, f64)
            sel = _alloca(E, f64)
            picked = _alloca(E, ir.IntegerType.get_signless(1))
            G = op.groups
            gscore = _alloca(B.c_index(G), f64) if G > 1 else None
            gkept = _alloca(B.c_index(G), ir.IntegerType.get_signless(1)) if G > 1 else None
            ninf, zero, one = B.c_float(float("-inf"), f64), B.c_float(0.0, f64), B.c_float(1.0, f64)
            tok = B.loop(part, T_, parts)
            with ir.InsertionPoint(tok.body):
                t = tok.induction_variable
                # scores in float64, as the reference computes them
                mx = _fold(E, ninf, lambda e, m: arith.MaximumFOp(m, _ext(B.load(logits, t, e), f64)).result)
                if op.score == "softmax":
                    def exp_at(e: ir.Value) -> ir.Value:
                        return mmath.ExpOp(arith.SubFOp(_ext(B.load(logits, t, e), f64), mx).result).result
                    total = _fold(E, zero, lambda e, s: arith.AddFOp(s, exp_at(e)).result)
                    _each(E, lambda e: B.store(arith.DivFOp(exp_at(e), total).result, score, e))
                else:
                    def sig(e: ir.Value) -> ir.Value:
                        x = _ext(B.load(logits, t, e), f64)
                        return arith.DivFOp(one, arith.AddFOp(one, mmath.ExpOp(arith.NegFOp(x).result)
                                                              .result).result).result
                    _each(E, lambda e: B.store(sig(e), score, e))

                def selection(e: ir.Value) -> None:
                    s = B.load(score, e)
                    if bias is not None:
                        s = arith.AddFOp(s, _ext(B.load(bias, e), f64)).result
                    B.store(s, sel, e)
                    B.store(B.c_int(0, 1), picked, e)
                _each(E, selection)
                if G > 1:
                    self.keep_groups(op, E, sel, picked, gscore, gkept)
                # top-k: k passes of a first-max search over the experts not picked yet
                for j in range(op.k):
                    best = _argmax(E, sel, picked)
                    B.store(B.c_int(1, 1), picked, best)
                    B.store(B.as_i64(best), i_out, t, j)
                    B.store(B.load(score, best), sel, best)  # sel now holds the picked weights' scores
                weights = [B.load(sel, B.as_index(B.load(i_out, t, j))) for j in range(op.k)]
                total = zero
                for w in weights:
                    total = arith.AddFOp(total, w).result
                for j, w in enumerate(weights):
                    if op.renormalize:
                        w = arith.DivFOp(w, total).result
                    w = arith.MulFOp(w, B.c_float(float(op.scale), f64)).result
                    B.store(arith.TruncFOp(et, w).result if et != f64 else w, w_out, t, j)
                scf.YieldOp([])
            func.ReturnOp([])
        return Kernel(name, op, inputs, list(op.results), "parts")

    def keep_groups(self, op: Operation, E: ir.Value, sel: ir.Value, picked: ir.Value, gscore: ir.Value,
                    gkept: ir.Value) -> None:
        """DeepSeek's group-limited routing: score each group by the sum of its best `group_top`
        selection scores, keep the best `groups_kept` groups, and mark the other groups' experts picked."""
        G = op.groups
        size = B.as_index(arith.DivUIOp(E, B.c_index(G)).result)
        f64 = ir.F64Type.get()
        for g in range(G):
            lo = B.mul(B.c_index(g), size)
            total = B.c_float(0.0, f64)
            for _ in range(op.group_top):
                best = _argmax(size, sel, picked, lo)
                B.store(B.c_int(1, 1), picked, best)
                total = arith.AddFOp(total, B.load(sel, best)).result
            B.store(total, gscore, g)
            _each(size, lambda e, lo=lo: B.store(B.c_int(0, 1), picked, B.add(lo, e)))
            B.store(B.c_int(0, 1), gkept, g)
        for _ in range(op.groups_kept):
            best = _argmax(B.c_index(G), gscore, gkept)
            B.store(B.c_int(1, 1), gkept, best)
        for g in range(G):  # experts of dropped groups can no longer be chosen
            dropped = arith.XOrIOp(B.load(gkept, g), B.c_int(1, 1)).result
            lo = B.mul(B.c_index(g), size)
            _each(size, lambda e, lo=lo, dropped=dropped: B.store(dropped, picked, B.add(lo, e)))

    # ---- MoE: dispatch ------------------------------------------------------------------------------
    def kernel_DispatchOp(self, op: Operation) -> Kernel:
        """Counting sort of assignments by expert (stable: token order, then slot order), capacity applied
        in that order; segments padded to `block` with -1. perm is allocated by the host at its upper bound
        T*K + E*(block-1); offsets[E] says how much of it is used."""
        name, entry = self.function(op, [op.experts.type] + [r.type for r in op.results], False)
        experts, perm, offsets = entry.arguments
        i64 = ir.IntegerType.get_signless(64)
        E = op.num_experts
        with ir.InsertionPoint(entry):
            n = B.mul(B.mdim(experts, 0), B.mdim(experts, 1))
            flat = _flatten(experts)
            count = _alloca(B.c_index(E), i64)
            if op.capacity is None:
                cap = B.as_i64(n)
            else:  # ceil(capacity * T * K / E)
                f64 = ir.F64Type.get()
                total = arith.SIToFPOp(f64, B.as_i64(n)).result
                c = arith.MulFOp(total, B.c_float(float(op.capacity) / E, f64)).result
                cap = arith.FPToSIOp(i64, mmath.CeilOp(c).result).result
            zero, one = B.c_int(0), B.c_int(1)
            _each(B.c_index(E), lambda e: B.store(zero, count, e))

            def place(write: bool) -> None:
                loop = B.loop(0, n)
                with ir.InsertionPoint(loop.body):
                    a = loop.induction_variable
                    e = B.as_index(B.load(flat, a))
                    c = B.load(count, e)
                    keep = B.if_(B.cmpi("lt", c, cap))
                    with ir.InsertionPoint(keep.then_block):
                        if write:
                            B.store(B.as_i64(a), perm, B.add(B.as_index(B.load(offsets, e)), B.as_index(c)))
                        B.store(B.add(c, one), count, e)
                        scf.YieldOp([])
                    scf.YieldOp([])

            place(False)
            blk = B.c_int(op.block)
            B.store(zero, offsets, 0)
            running = zero
            for e in range(E):
                c = B.load(count, e)
                padded = B.mul(arith.DivSIOp(B.add(c, B.c_int(op.block - 1)), blk).result, blk)
                running = B.add(running, padded)
                B.store(running, offsets, e + 1)
                B.store(zero, count, e)
            fill = B.loop(0, B.as_index(running))
            with ir.InsertionPoint(fill.body):
                B.store(B.c_int(-1), perm, fill.induction_variable)
                scf.YieldOp([])
            place(True)
            func.ReturnOp([])
        return Kernel(name, op, [op.experts], list(op.results))

    # ---- MoE: grouped GEMM over expert segments -------------------------------------------------------
    def kernel_GroupedMatmulOp(self, op: Operation) -> Kernel:
        return self.grouped(op, list(op.weights), None)

    def kernel_GroupedMatmulCombineOp(self, op: Operation) -> Kernel:
        return self.grouped(op, [op.weight], op.gates)

    def grouped(self, op: Operation, weights: list[Value], gates: Value | None) -> Kernel:
        """Work items are chunks of up to ROWS rows of one expert's segment: the chunk's tokens are read
        through perm (gather), multiplied by each of the expert's weights (tiled GEMMs), the epilogue is
        applied, and the rows are stored at their perm positions — or, with gates, scaled and added into
        this part's slice of the [parts, T, N] output (the host sums the parts).

        Weights that are parameters come packed in panels of PANEL columns (contiguous [K, PANEL] blocks,
        packed once per loaded weights by the host), and an elementwise epilogue runs panel by panel: the
        GEMM then reads B sequentially instead of one row of B per page (TLB misses at large N)."""
        inputs = [op.rows, op.perm, op.offsets] + weights + ([gates] if gates is not None else [])
        rt = op.result.type
        out_type = TensorType(rt.dtype, (None,) + rt.shape) if gates is not None else rt
        panels = _packable(op, weights)
        types = [v.type for v in inputs]
        if panels:
            for i, w in enumerate(weights):
                types[3 + i] = TensorType(w.type.dtype, (w.type.shape[0], None, w.type.shape[1], PANEL))
        name, entry = self.function(op, types + [out_type], True)
        args = entry.arguments
        rows_m, perm, offsets = args[:3]
        w_ms = args[3:3 + len(weights)]
        gates_m = args[3 + len(weights)] if gates is not None else None
        out, part, parts = args[len(inputs):]
        et = element_type(rt.dtype)
        E = weights[0].type.shape[0]
        with ir.InsertionPoint(entry):
            rows_t = B.read(rows_m)
            w_ts = [B.read(w) for w in w_ms]
            D = B.mdim(rows_m, 1)
            n_experts = B.sub(B.mdim(offsets, 0), B.c_index(1)) if not isinstance(E, int) else B.c_index(E)
            chunk = B.c_index(0)
            experts = B.loop(0, n_experts, 1, [chunk])
            with ir.InsertionPoint(experts.body):
                e = experts.induction_variable
                lo, hi = B.as_index(B.load(offsets, e)), B.as_index(B.load(offsets, B.add(e, B.c_index(1))))
                steps = B.loop(lo, hi, ROWS, [experts.inner_iter_args[0]])
                with ir.InsertionPoint(steps.body):
                    start, g = steps.induction_variable, steps.inner_iter_args[0]
                    mine = B.cmpi("eq", arith.RemUIOp(g, parts).result, part)
                    work = B.if_(mine)
                    with ir.InsertionPoint(work.then_block):
                        size = B.minsi(B.c_index(ROWS), B.sub(hi, start))
                        chunk_of = self.panel_chunk if panels else self.grouped_chunk
                        chunk_of(op, rows_t, perm, w_ts, e, start, size, D, out, gates_m, part, et)
                        scf.YieldOp([])
                    scf.YieldOp([B.add(g, B.c_index(1))])
                scf.YieldOp([steps.results[0]])
            func.ReturnOp([])
        return Kernel(name, op, inputs, [op.result], "parts", panels=[3 + i for i in range(len(weights))] if panels
                      else [])

    def panel_chunk(self, op: Operation, rows_t: ir.Value, perm: ir.Value, w_ts: list[ir.Value], e: ir.Value,
                    start: ir.Value, size: ir.Value, D: ir.Value, out: ir.Value, gates: ir.Value | None,
                    part: ir.Value, et: ir.Type) -> None:
        """grouped_chunk on packed weights: per panel of PANEL columns, the GEMMs, the epilogue, the store."""
        real = self.real_rows(perm, start, size)
        has = B.if_(B.cmpi("gt", real, B.c_index(0)))
        with ir.InsertionPoint(has.then_block):
            x = self.gather_rows(op, rows_t, perm, start, real, D, et)
            N = B.mdim(out, 2 if gates is not None else 1)
            pl = B.loop(0, B.mdim(w_ts[0], 1))
            with ir.InsertionPoint(pl.body):
                j = pl.induction_variable
                n0 = B.mul(j, B.c_index(PANEL))
                width = B.minsi(B.c_index(PANEL), B.sub(N, n0))
                tiles = [self.matmul_tile(x, B.slice_tensor(w, [e, j, 0, 0], [1, 1, D, PANEL], drop=[0, 1]), real,
                                          PANEL, et) for w in w_ts]
                self.dim_map = {op.result.type.shape[-1]: PANEL}  # the epilogue sees PANEL columns, not N
                (y,) = self.inline(op.epilogue, tiles, False)
                self.dim_map = {}
                y = B.slice_tensor(y, [0, 0], [real, width])
                if gates is None:
                    B.write(y, B.subview(out, [start, n0], [real, width]))
                else:
                    self.scatter_add(op, y, perm, start, real, width, gates, out, part, n0)
                scf.YieldOp([])
            scf.YieldOp([])

    def real_rows(self, perm: ir.Value, start: ir.Value, size: ir.Value) -> ir.Value:
        """The real rows of a chunk: they come first in a segment; padding (-1) after them is skipped."""
        return _fold(size, B.c_index(0), lambda r, n: B.select(
            B.cmpi("ge", B.load(perm, B.add(start, r)), B.c_int(0)), B.add(n, B.c_index(1)), n))

    def grouped_chunk(self, op: Operation, rows_t: ir.Value, perm: ir.Value, w_ts: list[ir.Value], e: ir.Value,
                      start: ir.Value, size: ir.Value, D: ir.Value, out: ir.Value, gates: ir.Value | None,
                      part: ir.Value, et: ir.Type) -> None:
        real = self.real_rows(perm, start, size)
        has = B.if_(B.cmpi("gt", real, B.c_index(0)))
        with ir.InsertionPoint(has.then_block):
            x = self.gather_rows(op, rows_t, perm, start, real, D, et)
            parts_out = []
            for w in w_ts:
                N = B.mdim(w, 2)
                we = B.slice_tensor(w, [e, 0, 0], [1, D, N], drop=[0])
                parts_out.append(self.matmul_tile(x, we, real, N, et))
            (y,) = self.inline(op.epilogue, parts_out, False)
            N = B.mdim(y, 1)
            if gates is None:
                B.write(y, B.subview(out, [start, 0], [real, N]))
            else:
                self.scatter_add(op, y, perm, start, real, N, gates, out, part, B.c_index(0))
            scf.YieldOp([])

    def gather_rows(self, op: Operation, rows_t: ir.Value, perm: ir.Value, start: ir.Value, n: ir.Value,
                    D: ir.Value, et: ir.Type) -> ir.Value:
        """rows[perm[start + i] // topk] (or rows[start + i] when the rows are already permuted)."""
        if not op.gather:
            return B.slice_tensor(rows_t, [start, 0], [n, D])
        init = B.empty([n, D], et)
        res_t = ir.RankedTensorType.get([B.DYN(), B.DYN()], et)
        d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
        g = linalg.GenericOp([res_t], [], [init], _maps(2, [[d0, d1]]), _iters([PARALLEL, PARALLEL]))
        block = g.regions[0].blocks.append(et)
        with ir.InsertionPoint(block):
            i, j = linalg.IndexOp(0).result, linalg.IndexOp(1).result
            a = B.load(perm, B.add(start, i))
            tok = B.as_index(arith.DivSIOp(a, B.c_int(op.topk)).result)
            linalg.YieldOp([B.extract(rows_t, tok, j)])
        return g.result

    def matmul_tile(self, a: ir.Value, b: ir.Value, m: ir.Value, n: ir.Value, et: ir.Type,
                    init: ir.Value | None = None) -> ir.Value:
        """a [m, k] @ b [k, n] as a tagged linalg matmul the schedule tiles."""
        if init is None:
            init = linalg.fill(B.c_float(0.0, et), outs=[B.empty([m, n], et)])
        d = [ir.AffineDimExpr.get(i) for i in range(3)]
        res_t = init.type
        g = linalg.GenericOp([res_t], [a, b], [init], _maps(3, [[d[0], d[2]], [d[2], d[1]], [d[0], d[1]]]),
                             _iters([PARALLEL, PARALLEL, REDUCTION]))
        block = g.regions[0].blocks.append(et, et, et)
        with ir.InsertionPoint(block):
            x, y, acc = block.arguments
            linalg.YieldOp([arith.AddFOp(acc, arith.MulFOp(x, y).result).result])
        shape = tuple(s if s != B.DYN() else None for s in ir.RankedTensorType(res_t).shape)
        self.tag(g.result, "matmul", TensorType(_dtype(et), shape))
        return g.result

    def scatter_add(self, op: Operation, y: ir.Value, perm: ir.Value, start: ir.Value, n: ir.Value, N: ir.Value,
                    gates: ir.Value, out: ir.Value, part: ir.Value, col0: ir.Value) -> None:
        """out[part, a // K, col0:col0 + N] += gates[a // K, a % K] * y[i] for the chunk's assignments
        a = perm[start + i]."""
        K = B.c_int(op.topk)
        rows = B.loop(0, n)
        with ir.InsertionPoint(rows.body):
            i = rows.induction_variable
            a = B.load(perm, B.add(start, i))
            t, j = B.as_index(arith.DivSIOp(a, K).result), B.as_index(arith.RemSIOp(a, K).result)
            g = B.load(gates, t, j)
            cols = B.loop(0, N)
            with ir.InsertionPoint(cols.body):
                c = cols.induction_variable
                v = arith.MulFOp(g, B.extract(y, i, c)).result
                oc = B.add(col0, c)
                B.store(arith.AddFOp(B.load(out, part, t, oc), v).result, out, part, t, oc)
                scf.YieldOp([])
            scf.YieldOp([])


    # ---- tiles ----------------------------------------------------------------------------------------
    def tile_map(self, inputs: list[tuple[ir.Value, list]], sizes: list[ir.Value], et: ir.Type, body,
                 tag: bool = False) -> ir.Value:
        """An elementwise generic over a tile of `sizes` (inputs with their affine exprs)."""
        rank = len(sizes)
        d = [ir.AffineDimExpr.get(i) for i in range(rank)]
        init = B.empty(sizes, et)
        g = linalg.GenericOp([init.type], [v for v, _ in inputs], [init], _maps(rank, [e for _, e in inputs] + [d]),
                             _iters([PARALLEL] * rank))
        block = g.regions[0].blocks.append(*[ir.RankedTensorType(v.type).element_type for v, _ in inputs], et)
        with ir.InsertionPoint(block):
            linalg.YieldOp([body(*block.arguments[:-1])])
        if tag:
            self.tag(g.result, "elementwise", TensorType(_dtype(et), (None,) * rank))
        return g.result

    def row_reduce(self, x: ir.Value, start: float, combine, tag: bool = False) -> ir.Value:
        """[n, m] -> [n]: combine(acc, v) over each row."""
        et = ir.RankedTensorType(x.type).element_type
        init = linalg.fill(B.c_float(start, et), outs=[B.empty([B.mdim(x, 0)], et)])
        d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
        g = linalg.GenericOp([init.type], [x], [init], _maps(2, [[d0, d1], [d0]]), _iters([PARALLEL, REDUCTION]))
        block = g.regions[0].blocks.append(et, et)
        with ir.InsertionPoint(block):
            v, acc = block.arguments
            linalg.YieldOp([combine(acc, v)])
        if tag:
            self.tag(g.result, "reduction", TensorType(_dtype(et), (None, None)), (0,))
        return g.result

    # ---- attention ------------------------------------------------------------------------------------
    def kernel_AttentionOp(self, op: Operation) -> Kernel:
        """Flash attention per (batch, head, query block): an online softmax over the key blocks the block
        map does not mark EMPTY; FULL blocks skip the mask, PARTIAL ones evaluate it inline on the scores;
        grouped heads read their shared K/V in place; a row with nothing allowed gives zeros. K comes
        transposed ([B, Hk, Dh, Sk], one copy per call by the host): Q @ K^T with K^T's rows contiguous
        runs 20-25% faster than reading K's columns in the register tile."""
        data = []
        for region in (op.mask, op.score):
            if not region.empty:
                data += [v for v in outer_values(region) if all(v is not d for d in data)]
        inputs = [op.q, op.k, op.v] + ([op.block_map] if op.block_map is not None else []) + data
        types = [v.type for v in inputs]
        kt_ = op.k.type  # the host passes K transposed, [B, Hk, Dh, Sk]: Q @ K^T then reads rows of it
        types[1] = TensorType(kt_.dtype, kt_.shape[:2] + (kt_.shape[3], kt_.shape[2]))
        name, entry = self.function(op, types + [op.result.type], True)
        args = entry.arguments
        q, k, v = args[:3]
        bm = args[3] if op.block_map is not None else None
        out, part, parts = args[len(inputs):]
        et = element_type(op.q.type.dtype)
        bq, bk = op.block_q or 64, op.block_k or 64
        masked = not op.mask.empty
        with ir.InsertionPoint(entry):
            for val, m in zip(data, args[len(inputs) - len(data):len(inputs)], strict=True):
                self.values[id(val)] = B.read(m)
            qt, kt, vt = B.read(q), B.read(k), B.read(v)
            Bn, Hq, Sq, Dh = (B.mdim(q, i) for i in range(4))
            Hkv, Sk, Dv = B.mdim(k, 1), B.mdim(k, 3), B.mdim(v, 3)
            rep = arith.DivUIOp(Hq, Hkv).result
            NQ, NK = B.ceil_div(Sq, bq), B.ceil_div(Sk, bk)
            per_b = B.mul(Hq, NQ)
            items = B.loop(part, B.mul(Bn, per_b), parts)
            with ir.InsertionPoint(items.body):
                it = items.induction_variable
                b = arith.DivUIOp(it, per_b).result
                h = arith.RemUIOp(arith.DivUIOp(it, NQ).result, Hq).result
                i = arith.RemUIOp(it, NQ).result
                q0 = B.mul(i, B.c_index(bq))
                nq = B.minsi(B.c_index(bq), B.sub(Sq, q0))
                Q = B.slice_tensor(qt, [b, h, q0, 0], [1, 1, nq, Dh], drop=[0, 1])
                ninf = B.c_float(float("-inf"), et)
                m0 = linalg.fill(ninf, outs=[B.empty([nq], et)])
                l0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty([nq], et)])
                a0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty([nq, Dv], et)])
                keys = B.loop(0, NK, 1, [m0, l0, a0])
                with ir.InsertionPoint(keys.body):
                    j = keys.induction_variable
                    state = list(keys.inner_iter_args)
                    if bm is not None:
                        kind = B.load(bm, arith.RemUIOp(b, B.mdim(bm, 0)).result,
                                      arith.RemUIOp(h, B.mdim(bm, 1)).result, i, j)
                        live = B.if_(B.cmpi("ne", kind, B.c_int(EMPTY, 8)), [s.type for s in state])
                        with ir.InsertionPoint(live.then_block):
                            scf.YieldOp(self.attend(op, Q, kt, vt, state, b, h, q0, nq, j, bk, Sk, Dh, Dv, rep, et,
                                                    kind))
                        with ir.InsertionPoint(live.else_block):
                            scf.YieldOp(state)
                        scf.YieldOp(list(live.results))
                    else:
                        scf.YieldOp(self.attend(op, Q, kt, vt, state, b, h, q0, nq, j, bk, Sk, Dh, Dv, rep, et,
                                                B.c_int(1 if masked else FULL, 8)))
                _, l_fin, acc = keys.results
                zero = B.c_float(0.0, et)
                d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
                o = self.tile_map([(acc, [d0, d1]), (l_fin, [d0])], [nq, Dv], et, lambda a, s: B.select(
                    arith.CmpFOp(2, s, zero).result, arith.DivFOp(a, s).result, zero))
                B.write(o, B.subview(out, [b, h, q0, 0], [1, 1, nq, Dv], drop=[0, 1]))
                scf.YieldOp([])
            func.ReturnOp([])
        return Kernel(name, op, inputs, [op.result], "parts")

    def attend(self, op: Operation, Q: ir.Value, kt: ir.Value, vt: ir.Value, state: list[ir.Value], b: ir.Value,
               h: ir.Value, q0: ir.Value, nq: ir.Value, j: ir.Value, bk: int, Sk: ir.Value, Dh: ir.Value,
               Dv: ir.Value, rep: ir.Value, et: ir.Type, kind: ir.Value) -> list[ir.Value]:
        """One key block of the online softmax: (m, l, acc) -> (m', l', acc')."""
        m, l_, acc = state
        k0 = B.mul(j, B.c_index(bk))
        nk = B.minsi(B.c_index(bk), B.sub(Sk, k0))
        hk = arith.DivUIOp(h, rep).result
        KT = B.slice_tensor(kt, [b, hk, 0, k0], [1, 1, Dh, nk], drop=[0, 1])
        V = B.slice_tensor(vt, [b, hk, k0, 0], [1, 1, nk, Dv], drop=[0, 1])
        S = self.matmul_tile(Q, KT, nq, nk, et)
        if op.mask.empty:
            S = self.scores(op, S, b, h, q0, k0, nq, nk, et, False)
        else:
            full = B.if_(B.cmpi("eq", kind, B.c_int(FULL, 8)), [S.type])
            with ir.InsertionPoint(full.then_block):
                scf.YieldOp([self.scores(op, S, b, h, q0, k0, nq, nk, et, False)])
            with ir.InsertionPoint(full.else_block):
                scf.YieldOp([self.scores(op, S, b, h, q0, k0, nq, nk, et, True)])
            S = full.results[0]
        d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
        ninf, zero = B.c_float(float("-inf"), et), B.c_float(0.0, et)
        mx = self.row_reduce(S, float("-inf"), lambda a, x: arith.MaximumFOp(a, x).result)
        m_new = self.tile_map([(m, [d0]), (mx, [d0])], [nq], et, lambda a, x: arith.MaximumFOp(a, x).result)

        def safe(x: ir.Value) -> ir.Value:  # a row with nothing allowed yet keeps exp() at 0, never NaN
            return B.select(arith.CmpFOp(1, x, ninf).result, zero, x)

        P = self.tile_map([(S, [d0, d1]), (m_new, [d0])], [nq, nk], et,
                          lambda s, mn: exp(arith.SubFOp(s, safe(mn)).result))
        alpha = self.tile_map([(m, [d0]), (m_new, [d0])], [nq], et,
                              lambda mo, mn: exp(arith.SubFOp(mo, safe(mn)).result))
        total = self.row_reduce(P, 0.0, lambda a, x: arith.AddFOp(a, x).result)
        l_new = self.tile_map([(l_, [d0]), (alpha, [d0]), (total, [d0])], [nq], et,
                              lambda s, al, t: arith.AddFOp(arith.MulFOp(s, al).result, t).result)
        scaled = self.tile_map([(acc, [d0, d1]), (alpha, [d0])], [nq, Dv], et, lambda a, al: arith.MulFOp(a, al).result)
        return [m_new, l_new, self.matmul_tile(P, V, nq, Dv, et, init=scaled)]

    def scores(self, op: Operation, S: ir.Value, b: ir.Value, h: ir.Value, q0: ir.Value, k0: ir.Value,
               nq: ir.Value, nk: ir.Value, et: ir.Type, masked: bool) -> ir.Value:
        """scale * s, then the score modifier, then (PARTIAL blocks) -inf where the mask disallows."""
        d0, d1 = ir.AffineDimExpr.get(0), ir.AffineDimExpr.get(1)
        scale = B.c_float(float(op.scale), et)

        def body(s: ir.Value) -> ir.Value:
            s = arith.MulFOp(s, scale).result
            idx = [B.as_i64(b), B.as_i64(h), B.as_i64(B.add(q0, linalg.IndexOp(0).result)),
                   B.as_i64(B.add(k0, linalg.IndexOp(1).result))]
            if not op.score.empty:
                (s,) = self.inline(op.score, [s, *[self.cast_index(op.score, i + 1, x) for i, x in enumerate(idx)]],
                                   True)
            if masked:
                (ok,) = self.inline(op.mask, [self.cast_index(op.mask, i, x) for i, x in enumerate(idx)], True)
                s = B.select(ok, s, B.c_float(float("-inf"), et))
            return s

        return self.tile_map([(S, [d0, d1])], [nq, nk], et, body)

    def cast_index(self, region: Region, arg: int, x: ir.Value) -> ir.Value:
        """An i64 index as the integer type region argument `arg` declares."""
        want = element_type(region.block.args[arg].type.dtype)
        return x if want == x.type else arith.TruncIOp(want, x).result

    # ---- scans ----------------------------------------------------------------------------------------
    def kernel_FusedScanOp(self, op: Operation) -> Kernel:
        """h = a_t * h + b_t streamed over time: per step the producer region makes a_t, b_t from step t of
        the inputs, the consumer reduces h to y_t, stored at step t of the output; h is never stored.

        Where a state dim runs through to the output (Mamba's channels), the kernel takes SCAN_BLOCK of it
        at a time, every time step for one block before the next: the block's state and temporaries stay
        in L1, and blocks are split over threads (part, parts)."""
        inputs = list(op.inputs)
        rank, axis, n = len(op.state), op.axis, op.num_producer_inputs
        y_type = op.consumer.block.terminator.operands[0].type
        channel = _channel_dim(op, y_type)
        name, entry = self.function(op, [v.type for v in inputs] + [op.result.type], True)
        args = entry.arguments
        out, part, parts = args[len(inputs):]
        dt = op.result.type.dtype
        et = element_type(dt)
        with ir.InsertionPoint(entry):
            ts = [B.read(m) for m in args[:len(inputs)]]
            state = TensorType(dt, tuple(op.state))
            sources = self.out_sources(state, [(t, v.type) for t, v in zip(ts, inputs, strict=True)])
            timed = [(t, v) for t, v in zip(ts, inputs, strict=True)
                     if 0 <= axis - (rank - v.type.rank) and v.type.shape[axis - (rank - v.type.rank)] != 1]
            if not timed:
                raise CpuLoweringError("a fused scan needs an input that runs over time", op.loc)
            L = B.mdim(timed[0][0], axis - (rank - timed[0][1].type.rank))
            sizes = [1 if i == axis else (d if isinstance(d, int) else B.mdim(*sources[i])) for i, d in
                     enumerate(state.shape)]
            if channel is None:  # one block: the whole state, on the first thread
                blocks, width = B.select(B.cmpi("eq", part, B.c_index(0)), B.c_index(1), B.c_index(0)), None
            else:
                c, yc = channel
                total = B.as_index(sizes[c])
                blocks = B.ceil_div(total, SCAN_BLOCK)
                self.dim_map = {state.shape[c]: None}
            chunks = B.loop(part, blocks, parts)
            with ir.InsertionPoint(chunks.body):
                views, offs_y, ysz = ts, {}, {}
                block_sizes = list(sizes)
                if channel is not None:
                    c0 = B.mul(chunks.induction_variable, B.c_index(SCAN_BLOCK))
                    width = B.minsi(B.c_index(SCAN_BLOCK), B.sub(total, c0))
                    views = [self.channel_slice(t, v.type, c, rank, c0, width) for t, v in zip(ts, inputs, strict=True)]
                    block_sizes[c] = width
                    offs_y, ysz = {yc: c0}, {yc: width}
                h0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty(block_sizes, et)])
                self.untiled = True
                loop = B.loop(0, L, 1, [h0])
                with ir.InsertionPoint(loop.body):
                    t = loop.induction_variable
                    sliced = [self.time_step(x, v.type, axis, rank, t) for x, v in zip(views, inputs, strict=True)]
                    a, bb = self.inline(op.producer, sliced[:n], False)
                    prod_types = [v.type for v in op.producer.block.terminator.operands]
                    h = loop.inner_iter_args[0]
                    dd = [ir.AffineDimExpr.get(i) for i in range(rank)]
                    step = state.with_shape(tuple(1 if i == axis else d for i, d in enumerate(state.shape)))
                    # updated in place (h is the generic's own output), so the loop carries one buffer
                    new = self.generic(step, [(a, self.broadcast_exprs(prod_types[0], rank)),
                                              (bb, self.broadcast_exprs(prod_types[1], rank))], h,
                                       [PARALLEL] * rank, dd,
                                       lambda x, y, hv: arith.AddFOp(arith.MulFOp(x, hv).result, y).result)
                    (y,) = self.inline(op.consumer, [new] + sliced[n:], False)
                    yt = ir.RankedTensorType(y.type)
                    offs = [t if i == op.out_axis else offs_y.get(i, 0) for i in range(yt.rank)]
                    ysizes = [1 if i == op.out_axis else ysz.get(i, s if s != B.DYN() else B.mdim(y, i))
                              for i, s in enumerate(yt.shape)]
                    B.write(y, B.subview(out, offs, ysizes))
                    scf.YieldOp([new])
                self.untiled = False
                scf.YieldOp([])
            self.dim_map = {}
            func.ReturnOp([])
        return Kernel(name, op, inputs, [op.result], "parts")

    def channel_slice(self, x: ir.Value, t: TensorType, c: int, rank: int, c0: ir.Value, width: ir.Value) -> ir.Value:
        """Channels c0..c0+width of an input right-aligned to the state (an input without them: all of it)."""
        pos = c - (rank - t.rank)
        if pos < 0 or t.shape[pos] == 1:
            return x
        sizes = [width if i == pos else (d if isinstance(d, int) else B.mdim(x, i)) for i, d in enumerate(t.shape)]
        return B.slice_tensor(x, [c0 if i == pos else 0 for i in range(t.rank)], sizes)

    def time_step(self, x: ir.Value, t: TensorType, axis: int, rank: int, step: ir.Value) -> ir.Value:
        """Step `step` of an input right-aligned to the state (inputs without the time axis: all of it)."""
        pos = axis - (rank - t.rank)
        if pos < 0 or t.shape[pos] == 1:
            return x
        sizes = [1 if i == pos else (d if isinstance(d, int) else B.mdim(x, i)) for i, d in enumerate(t.shape)]
        return B.slice_tensor(x, [step if i == pos else 0 for i in range(t.rank)], sizes)

    # ---- sparse weights ---------------------------------------------------------------------------------
    def kernel_BsrMatmulOp(self, op: Operation) -> Kernel:
        """x [M, K] @ W with W in BSR: for each stored block (r, c), out[:, c] += x[:, r] @ block; the
        empty blocks cost nothing. The host passes x and the output as 2-D and splits M across threads."""
        x2 = TensorType(op.x.type.dtype, (None, op.x.type.shape[-1]))
        out2 = TensorType(op.result.type.dtype, (None, op.cols))
        name, entry = self.function(op, [x2, op.row_ptr.type, op.col_idx.type, op.blocks.type, out2], False)
        x, row_ptr, col_idx, blocks, out = entry.arguments
        et = element_type(out2.dtype)
        with ir.InsertionPoint(entry):
            xt, bt = B.read(x), B.read(blocks)
            M = B.mdim(x, 0)
            br, bc = B.mdim(blocks, 1), B.mdim(blocks, 2)
            acc0 = linalg.fill(B.c_float(0.0, et), outs=[B.empty([M, op.cols], et)])
            rows = B.loop(0, B.sub(B.mdim(row_ptr, 0), B.c_index(1)), 1, [acc0])
            with ir.InsertionPoint(rows.body):
                r = rows.induction_variable
                xs = B.slice_tensor(xt, [0, B.mul(r, br)], [M, br])
                stored = B.loop(B.load(row_ptr, r), B.load(row_ptr, B.add(r, B.c_index(1))), 1,
                                [rows.inner_iter_args[0]])
                with ir.InsertionPoint(stored.body):
                    i, acc = stored.induction_variable, stored.inner_iter_args[0]
                    c0 = B.mul(B.as_index(B.load(col_idx, i)), bc)
                    blk = B.slice_tensor(bt, [i, 0, 0], [1, br, bc], drop=[0])
                    cur = B.slice_tensor(acc, [0, c0], [M, bc])
                    new = self.matmul_tile(xs, blk, M, bc, et, init=cur)
                    scf.YieldOp([B.insert_slice(new, acc, [0, c0], [M, bc])])
                scf.YieldOp([stored.results[0]])
            B.write(rows.results[0], out)
            func.ReturnOp([])
        return Kernel(name, op, list(op.operands), [op.result], "rows", [True, False, False, False])

    def kernel_NmMatmulOp(self, op: Operation) -> Kernel:
        """x [M, K] @ W with W stored N:M along K: each output reads only the n kept inputs of every m."""
        x2 = TensorType(op.x.type.dtype, (None, op.x.type.shape[-1]))
        out2 = TensorType(op.result.type.dtype, (None, op.values.type.shape[1]))
        name, entry = self.function(op, [x2, op.values.type, op.indices.type, out2], False)
        x, values, indices, out = entry.arguments
        et = element_type(out2.dtype)
        with ir.InsertionPoint(entry):
            xt, vt, it = B.read(x), B.read(values), B.read(indices)
            M, N = B.mdim(x, 0), B.mdim(values, 1)
            init = linalg.fill(B.c_float(0.0, et), outs=[B.empty([M, N], et)])
            d = [ir.AffineDimExpr.get(i) for i in range(3)]
            g = linalg.GenericOp([init.type], [vt, it], [init], _maps(3, [[d[2], d[1]], [d[2], d[1]], [d[0], d[1]]]),
                                 _iters([PARALLEL, PARALLEL, REDUCTION]))
            block = g.regions[0].blocks.append(et, ir.IntegerType.get_signless(8), et)
            with ir.InsertionPoint(block):
                w, off, acc = block.arguments
                kk = linalg.IndexOp(2).result
                col = B.add(B.mul(arith.DivUIOp(kk, B.c_index(op.n)).result, B.c_index(op.m)), B.as_index(off))
                xv = B.extract(xt, linalg.IndexOp(0).result, col)
                linalg.YieldOp([arith.AddFOp(acc, arith.MulFOp(xv, w).result).result])
            B.write(g.result, out)
            func.ReturnOp([])
        return Kernel(name, op, list(op.operands), [op.result], "rows", [True, False, False])



def _dtype(et: ir.Type) -> str:
    return {"f32": "f32", "f64": "f64", "f16": "f16", "bf16": "bf16"}[str(et)]


def _maps(rank: int, exprs: list[list]) -> ir.ArrayAttr:
    return ir.ArrayAttr.get([ir.AffineMapAttr.get(ir.AffineMap.get(rank, 0, e)) for e in exprs])


def _iters(kinds: list[str]) -> ir.ArrayAttr:
    return ir.ArrayAttr.get([ir.Attribute.parse(k) for k in kinds])


def _packable(op: Operation, weights: list[Value]) -> bool:
    """Whether a grouped GEMM can take its weights packed in panels: they are parameters (packed once per
    loaded weights) with one output width, and the epilogue is elementwise (so it can run a panel at a time)."""
    if any(w.defining_op is None or w.defining_op.NAME != "func.param" for w in weights):
        return False
    if len({w.type.shape[2] for w in weights}) != 1 or weights[0].type.shape[2] != op.result.type.shape[-1]:
        return False
    return all(isinstance(o, ROW_SPLIT + (T.ConstantOp,)) or o.TERMINATOR for o in op.epilogue.block.ops)


def _channel_dim(op: Operation, y: TensorType) -> tuple[int, int] | None:
    """A state dim of a fused scan that the consumer keeps, to cut the work into blocks along: (its axis in
    the state, its axis in the consumer's result). Matched by size (symbol or number), so it must occur once
    in each, other than the time axis, and every input must have it whole or not at all (size 1). The
    last such dim is taken (contiguous blocks of the innermost kept axis)."""
    state = list(op.state)
    rank = len(state)
    for c in reversed(range(rank)):
        d = state[c]
        if c == op.axis or d is None or d == 1 or state.count(d) != 1 or list(y.shape).count(d) != 1:
            continue
        yc = list(y.shape).index(d)
        if yc == op.out_axis:
            continue
        if all(v.type.shape[c - (rank - v.type.rank)] in (1, d) for v in op.inputs if c - (rank - v.type.rank) >= 0):
            return c, yc
    return None


def _alloca(n: ir.Value, et: ir.Type) -> ir.Value:
    return memref.AllocaOp(ir.MemRefType.get([B.DYN()], et), [B.as_index(n)], []).result


def _flatten(m: ir.Value) -> ir.Value:
    mt = ir.MemRefType(m.type)
    n = 1
    for s in mt.shape:
        n = B.DYN() if s == B.DYN() or n == B.DYN() else n * s
    out = ir.MemRefType.get([n], mt.element_type)
    return memref.CollapseShapeOp(out, m, ir.ArrayAttr.get([ir.ArrayAttr.get(
        [ir.IntegerAttr.get(ir.IntegerType.get_signless(64), i) for i in range(mt.rank)])])).result


def _ext(v: ir.Value, to: ir.Type) -> ir.Value:
    return v if v.type == to else arith.ExtFOp(to, v).result


def _each(n: ir.Value, body) -> None:
    loop = B.loop(0, n)
    with ir.InsertionPoint(loop.body):
        body(loop.induction_variable)
        scf.YieldOp([])


def _fold(n: ir.Value, start: ir.Value, body) -> ir.Value:
    loop = B.loop(0, n, 1, [start])
    with ir.InsertionPoint(loop.body):
        scf.YieldOp([body(loop.induction_variable, loop.inner_iter_args[0])])
    return loop.results[0]


def _argmax(n: ir.Value, values: ir.Value, taken: ir.Value, lo: ir.Value | None = None) -> ir.Value:
    """The first index in lo..lo+n of the largest value not yet taken (the lowest index on ties)."""
    f64 = ir.F64Type.get()
    lo = lo if lo is not None else B.c_index(0)
    loop = B.loop(0, n, 1, [B.c_float(float("-inf"), f64), B.c_index(-1)])
    with ir.InsertionPoint(loop.body):
        e = B.add(lo, loop.induction_variable)
        best, at = loop.inner_iter_args
        v = B.load(values, e)
        free = arith.XOrIOp(B.load(taken, e), B.c_int(1, 1)).result
        better = arith.OrIOp(B.cmpi("lt", at, B.c_index(0)), arith.CmpFOp(2, v, best).result).result
        take = arith.AndIOp(free, better).result
        scf.YieldOp([B.select(take, v, best), B.select(take, e, at)])
    return loop.results[1]

